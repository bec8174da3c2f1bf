"""Write a SAT-format checkpoint with random weights for a GLM config (demo and benchmark models; no download).

    python tools/create_random_checkpoint.py --out DIR --num-layers 4 --hidden-size 256 --num-attention-heads 4 \
        --inner-hidden-size 512 --vocab-size 150528 [--model-parallel-size 1] [--dtype fp16] [--seed 1234]

Tensors are generated one at a time and sharded with model/sharding.py, so memory stays near one tensor.
The folder is written under a temporary name and renamed at the end.
"""
import argparse
import json
import os
import shutil
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from model.checkpoint import save_shard  # noqa: E402
from model.errors import UserError, main_entry  # noqa: E402
from model.sharding import shard_tensor  # noqa: E402

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def parameter_shapes(num_layers, hidden, heads, inner, vocab):
    """Unpartitioned shapes of every checkpoint key, in checkpoint order."""
    shapes = {"transformer.word_embeddings.weight": (vocab, hidden)}
    for i in range(num_layers):
        p = f"transformer.layers.{i}."
        shapes.update({
            p + "input_layernorm.weight": (hidden,), p + "input_layernorm.bias": (hidden,),
            p + "attention.query_key_value.weight": (3 * hidden, hidden), p + "attention.query_key_value.bias": (3 * hidden,),
            p + "attention.dense.weight": (hidden, hidden), p + "attention.dense.bias": (hidden,),
            p + "post_attention_layernorm.weight": (hidden,), p + "post_attention_layernorm.bias": (hidden,),
            p + "mlp.dense_h_to_4h.weight": (2 * inner, hidden), p + "mlp.dense_h_to_4h.bias": (2 * inner,),
            p + "mlp.dense_4h_to_h.weight": (hidden, inner), p + "mlp.dense_4h_to_h.bias": (hidden,),
        })
    shapes["transformer.final_layernorm.weight"] = (hidden,)
    shapes["transformer.final_layernorm.bias"] = (hidden,)
    return shapes


def random_tensor(key, shape, gen):
    if "layernorm.weight" in key:
        return 1.0 + 0.1 * torch.randn(shape, generator=gen)
    if key.endswith(".bias"):
        return 0.02 * torch.randn(shape, generator=gen)
    fan_in = shape[1] if len(shape) == 2 else 1
    std = 1.0 if "word_embeddings" in key else fan_in ** -0.5
    return std * torch.randn(shape, generator=gen)


def create_random_checkpoint(out, num_layers, hidden_size, num_attention_heads, inner_hidden_size, vocab_size,
                             model_parallel_size=1, dtype="fp16", seed=1234, iteration="1"):
    if os.path.exists(out):
        raise UserError(f"{out} already exists; remove it or choose another --out")
    tmp = out.rstrip("/") + ".partial"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(os.path.join(tmp, iteration))
    gen = torch.Generator().manual_seed(seed)
    shards = [dict() for _ in range(model_parallel_size)]
    for key, shape in parameter_shapes(num_layers, hidden_size, num_attention_heads, inner_hidden_size, vocab_size).items():
        full = random_tensor(key, shape, gen).to(DTYPES[dtype])
        for r in range(model_parallel_size):
            shards[r][key] = shard_tensor(key, full, r, model_parallel_size).clone()
    for r, sd in enumerate(shards):
        save_shard(os.path.join(tmp, iteration, f"mp_rank_{r:02d}_model_states.pt"), sd)
    with open(os.path.join(tmp, "latest"), "w") as f:
        f.write(iteration)
    config = dict(num_layers=num_layers, hidden_size=hidden_size, num_attention_heads=num_attention_heads,
                  inner_hidden_size=inner_hidden_size, vocab_size=vocab_size,
                  model_parallel_size=model_parallel_size, seed=seed, dtype=dtype)
    with open(os.path.join(tmp, "model_config.json"), "w") as f:
        json.dump(config, f, indent=2)
    os.rename(tmp, out)
    return out


@main_entry
def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--num-layers", type=int, required=True)
    p.add_argument("--hidden-size", type=int, required=True)
    p.add_argument("--num-attention-heads", type=int, required=True)
    p.add_argument("--inner-hidden-size", type=int, required=True)
    p.add_argument("--vocab-size", type=int, default=150528)
    p.add_argument("--model-parallel-size", type=int, default=1)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp16")
    p.add_argument("--seed", type=int, default=1234)
    a = p.parse_args()
    create_random_checkpoint(a.out, a.num_layers, a.hidden_size, a.num_attention_heads, a.inner_hidden_size,
                             a.vocab_size, a.model_parallel_size, a.dtype, a.seed)
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
