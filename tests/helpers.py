"""Shared test helpers: the SAT parity fixture, tiny models, and real multi-process launches."""
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
FIXTURE_DIR = ROOT / "tests" / "data" / "sat-parity-tiny"
CASES = ("gmask_prompt", "mask_infill", "batch2_mixed", "multichoice_long")


def fixture_config(exact_rope=False):
    from model import GLMConfig
    c = json.loads((FIXTURE_DIR / "ckpt" / "model_config.json").read_text())
    return GLMConfig(num_layers=c["num_layers"], hidden_size=c["hidden_size"],
                     num_attention_heads=c["num_attention_heads"], inner_hidden_size=c["inner_hidden_size"],
                     vocab_size=c["vocab_size"], max_sequence_length=c["max_sequence_length"], exact_rope=exact_rope)


def fixture_model_args(mp=1, dtype_flag="--fp32", extra=()):
    """Command-line flags of initialize.py that build the fixture model."""
    c = json.loads((FIXTURE_DIR / "ckpt" / "model_config.json").read_text())
    ckpt = FIXTURE_DIR / ("ckpt" if mp == 1 else f"ckpt_tp{mp}")
    return ["--model-parallel-size", str(mp), "--num-layers", str(c["num_layers"]),
            "--hidden-size", str(c["hidden_size"]), "--inner-hidden-size", str(c["inner_hidden_size"]),
            "--vocab-size", str(c["vocab_size"]), "--num-attention-heads", str(c["num_attention_heads"]),
            "--max-sequence-length", str(c["max_sequence_length"]), "--load", str(ckpt), dtype_flag, *extra]


def load_fixture_model(dtype=torch.float32, exact_rope=False, attention="plain", ckpt="ckpt", mp_rank=0, mp_size=1):
    from model import GLM130B
    from model.checkpoint import load_checkpoint
    model = GLM130B(fixture_config(exact_rope), dtype=dtype, device="meta", attention=attention)
    load_checkpoint(model, str(FIXTURE_DIR / ckpt), mp_rank, mp_size)
    return model.eval()


def fixture_cases():
    return json.loads((FIXTURE_DIR / "cases.json").read_text())


def case_inputs(case):
    return (torch.tensor(case["tokens"]), torch.tensor(case["position_ids"]),
            torch.tensor(case["attention_mask_true_means_masked"]).bool())


def reference(run):
    return np.load(FIXTURE_DIR / f"{run}.npz")


def logits_error(logits, ref, name):
    """Max |difference| to the fixture at its stored columns, and of the full-vocabulary logsumexp."""
    logits = logits.float()
    cols = torch.tensor(ref["cols"])
    d_cols = (logits[..., cols] - torch.tensor(ref[f"{name}.logits_cols"])).abs().max().item()
    d_lse = (torch.logsumexp(logits, -1) - torch.tensor(ref[f"{name}.logsumexp"])).abs().max().item()
    return max(d_cols, d_lse)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(script, args, nprocs=2, timeout=300, env=None, cwd=ROOT):
    """Run `script` under torchrun with `nprocs` real processes (gloo on CPU); returns the CompletedProcess."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nprocs),
           "--master_addr", "127.0.0.1", "--master_port", str(free_port()), str(script), *map(str, args)]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run(cmd, cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout)



@contextlib.contextmanager
def background_process(args, logs: Path, **popen):
    """`args` started in its own process group, its stdout and stderr into logs/stdout and logs/stderr; the group is
    killed on leaving if it still runs. Yields the Popen (`finished` waits for it)."""
    with open(logs / "stdout", "w") as stdout, open(logs / "stderr", "w") as stderr:
        proc = subprocess.Popen(args, cwd=ROOT, stdout=stdout, stderr=stderr, start_new_session=True, **popen)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def finished(proc, logs: Path, timeout: float) -> subprocess.CompletedProcess:
    """Waits for a `background_process` and returns it as a CompletedProcess with its logged output."""
    returncode = proc.wait(timeout=timeout)
    return subprocess.CompletedProcess(proc.args, returncode, (logs / "stdout").read_text(),
                                       (logs / "stderr").read_text())


def file_modes_bind():
    """preexec_fn making file modes bind a child even when the tests run as root: it drops CAP_DAC_OVERRIDE and
    CAP_DAC_READ_SEARCH from its capability bounding set, so the program it execs has neither. None when not
    root (the modes already bind)."""
    if os.geteuid() != 0:
        return None
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)

    def drop():
        for cap in (1, 2):  # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH
            if libc.prctl(24, cap, 0, 0, 0) != 0:  # PR_CAPBSET_DROP
                raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")
    return drop
