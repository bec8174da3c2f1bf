"""Create (once) the embedded DEMO model: a tiny GLM with random weights and a locally built test tokenizer.

This is NOT GLM-130B: its weights are random, so its text is gibberish. It exists so that every script runs on a
fresh machine without the 260 GB checkpoint. `configs/model_glm_demo.sh` calls this and uses what it creates:
    <dir>/checkpoint/   SAT-format checkpoint (4 layers, hidden 256, 4 heads, GeGLU 512, vocab 150528)
    <dir>/ice_text.model  SentencePiece test tokenizer padded to icetk's 130000 pieces
"""
import argparse
import fcntl
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from model.errors import main_entry  # noqa: E402
from tools.build_test_tokenizer import ensure_test_tokenizer  # noqa: E402
from tools.create_random_checkpoint import create_random_checkpoint  # noqa: E402

DEMO_MODEL = dict(num_layers=4, hidden_size=256, num_attention_heads=4, inner_hidden_size=512, vocab_size=150528)


def ensure_demo(demo_dir: str) -> str:
    os.makedirs(demo_dir, exist_ok=True)
    with open(os.path.join(demo_dir, ".lock"), "w") as lock:  # concurrent first runs build it once
        fcntl.flock(lock, fcntl.LOCK_EX)
        ensure_test_tokenizer(demo_dir)
        ckpt = os.path.join(demo_dir, "checkpoint")
        if not os.path.isdir(ckpt):
            print(f"> Creating the DEMO model (random weights, not GLM-130B) in {ckpt}", file=sys.stderr)
            create_random_checkpoint(ckpt, **DEMO_MODEL, dtype="fp16", seed=1234)
    return demo_dir


@main_entry
def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="folder for the demo checkpoint and tokenizer (kept as a cache)")
    ensure_demo(p.parse_args().out)


if __name__ == "__main__":
    main()
