"""Create (once) the BENCHMARK model: a ~1.1 B-parameter GLM with random weights, made locally (no download).

Shape: 32 layers, hidden 1536, 12 heads (head dim 128 as GLM-130B), GeGLU inner 4096, vocab 150528, so about
80 % of the parameters sit in the transformer layers as in the real model. Weights are random; it exists to time
the inference paths on the machine at hand. `configs/model_glm_bench.sh` calls this and uses what it creates:
    <dir>/checkpoint/   SAT-format fp16 checkpoint (about 2.3 GB)
"""
import argparse
import fcntl
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from model.errors import main_entry  # noqa: E402
from tools.create_random_checkpoint import create_random_checkpoint  # noqa: E402

BENCH_MODEL = dict(num_layers=32, hidden_size=1536, num_attention_heads=12, inner_hidden_size=4096, vocab_size=150528)


def ensure_bench_checkpoint(bench_dir: str) -> str:
    """The checkpoint folder under `bench_dir`, created on first use (concurrent callers build it once)."""
    os.makedirs(bench_dir, exist_ok=True)
    ckpt = os.path.join(bench_dir, "checkpoint")
    with open(os.path.join(bench_dir, ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not os.path.isdir(ckpt):
            print(f"> Creating the BENCHMARK model (random weights, ~1.1 B parameters) in {ckpt}", file=sys.stderr)
            start = time.time()
            create_random_checkpoint(ckpt, **BENCH_MODEL, dtype="fp16", seed=1234)
            print(f"> Benchmark checkpoint written in {time.time() - start:.1f}s", file=sys.stderr)
    return ckpt


@main_entry
def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="folder for the benchmark checkpoint (kept as a cache)")
    ensure_bench_checkpoint(p.parse_args().out)


if __name__ == "__main__":
    main()
