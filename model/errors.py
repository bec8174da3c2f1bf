"""Bad user input (files, flags, prompts, YAML, checkpoints) is reported as one line, never a traceback."""
import functools
import sys


class UserError(Exception):
    """An error in what the user gave us; the message says what is wrong and how to fix it."""


def main_entry(fn):
    """Wrap a script's main(): a UserError prints `error: <message>` on stderr and exits with status 2."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except UserError as e:
            print(f"error: {e}", file=sys.stderr, flush=True)
            sys.exit(2)
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr, flush=True)
            sys.exit(130)
    return wrapper
