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

import sentencepiece as spm
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from model.errors import main_entry  # noqa: E402
from model.checkpoint import save_shard  # noqa: E402
from tools.build_test_tokenizer import ensure_test_tokenizer, filler_piece  # noqa: E402
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
            partial = ckpt + ".tmp"
            create_random_checkpoint(partial, **DEMO_MODEL, dtype="fp16", seed=1234)
            silence_unused_rows(partial, os.path.join(demo_dir, "ice_text.model"))
            os.rename(partial, ckpt)
    return demo_dir


def silence_unused_rows(ckpt: str, tokenizer_path: str) -> None:
    """Zero the embedding rows of ids that are not real pieces of the test tokenizer (image ids, its ~128k
    filler pieces, padding rows), so the demo's output is made of real words, and scale the others down so the
    random logits are not peaked on one word: still random, but readable."""
    sp = spm.SentencePieceProcessor(model_file=tokenizer_path)
    live = torch.tensor([sp.IdToPiece(i) != filler_piece(i) for i in range(sp.GetPieceSize())])
    path = os.path.join(ckpt, "1", "mp_rank_00_model_states.pt")
    sd = torch.load(path, weights_only=True)["module"]
    emb = sd["transformer.word_embeddings.weight"]
    keep = torch.zeros(emb.shape[0], dtype=torch.bool)
    keep[20000:20000 + len(live)] = live
    keep[150000:150008] = True
    emb[~keep] = 0
    emb[keep] *= 0.5
    # With tied input/output embeddings a random model tends to repeat its last token (its own embedding dominates
    # the residual stream); a negative final LayerNorm gain turns that self-similarity into self-avoidance.
    sd["transformer.final_layernorm.weight"] = -sd["transformer.final_layernorm.weight"].abs()
    save_shard(path, sd)


@main_entry
def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="folder for the demo checkpoint and tokenizer (kept as a cache)")
    ensure_demo(p.parse_args().out)


if __name__ == "__main__":
    main()
