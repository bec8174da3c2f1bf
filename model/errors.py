"""Bad user input (files, flags, prompts, YAML, checkpoints) is reported as one line, never a traceback."""
import functools
import sys


class UserError(Exception):
    """An error in what the user gave us; the message says what is wrong and how to fix it."""


def main_entry(fn):
    """Wrap a script's main(): a UserError prints `error: <message>` on stderr and exits with status 2.

    Whatever way main() ends, torch.distributed (if it was initialised) is destroyed before the interpreter exits,
    after a final barrier when main() returned (model/mpu.py destroy_model_parallel says why every process needs it).
    """
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from model import mpu  # here, not at the top: model/__init__ imports modules that import this one
        try:
            with mpu.destroy_model_parallel_at_exit():
                return fn(*args, **kwargs)
        except UserError as e:
            print(f"error: {e}", file=sys.stderr, flush=True)
            sys.exit(2)
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr, flush=True)
            sys.exit(130)
    return wrapper
