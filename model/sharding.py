"""How every checkpoint tensor is partitioned over tensor-parallel ranks, declared once.

The loader, tools/convert_tp.py and the quantizer all use these rules, which are the layout of the released
8-way GLM-130B checkpoint (and of the original convert_tp.py):
- replicated: LayerNorms, row-parallel biases, rotary inv_freq;
- cols: row-parallel weights split along dim 1 (attention.dense, mlp.dense_4h_to_h);
- glu: dense_h_to_4h weight/bias, whose rank-r shard is cat(A_r, G_r) of the global [A; G] halves;
- rows: everything else along dim 0 (word embeddings by vocab, QKV by whole heads, QKV bias).
"""
from typing import List, Sequence

import torch

REPLICATED, ROWS, COLS, GLU = "replicated", "rows", "cols", "glu"

_REPLICATED_SUFFIXES = (
    "input_layernorm.weight", "input_layernorm.bias",
    "post_attention_layernorm.weight", "post_attention_layernorm.bias",
    "attention.dense.bias", "mlp.dense_4h_to_h.bias",
    "attention.rotary_emb.inv_freq", "final_layernorm.weight", "final_layernorm.bias",
)
_COLS_SUFFIXES = ("attention.dense.weight", "mlp.dense_4h_to_h.weight")
_GLU_SUFFIXES = ("mlp.dense_h_to_4h.weight", "mlp.dense_h_to_4h.bias")
# The four linears that weight-only quantization replaces (their `.weight`, plus `.weight_scale`).
QUANTIZED_LINEARS = ("attention.query_key_value", "attention.dense", "mlp.dense_h_to_4h", "mlp.dense_4h_to_h")


def partition_rule(key: str) -> str:
    """The partition rule of a checkpoint key (quantization scales follow their weight's rows)."""
    if key.endswith(".weight_scale"):
        # A scale has one entry per output row: row-split like the weight's rows, replicated where the weight is
        # split along its columns (each rank recomputes its own scales there, so they are never merged).
        base = key[: -len("_scale")]
        rule = partition_rule(base)
        return REPLICATED if rule == COLS else rule
    if key.endswith(_REPLICATED_SUFFIXES):
        return REPLICATED
    if key.endswith(_COLS_SUFFIXES):
        return COLS
    if key.endswith(_GLU_SUFFIXES):
        return GLU
    return ROWS


def shard_tensor(key: str, full: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    """Rank `rank`'s shard of the unpartitioned tensor `full` (a view when contiguous slicing allows)."""
    rule = partition_rule(key)
    if world == 1 or rule == REPLICATED:
        return full
    if rule == COLS:
        return full.chunk(world, dim=1)[rank]
    if rule == GLU:
        a, g = full.chunk(2, dim=0)
        return torch.cat([a.chunk(world, dim=0)[rank], g.chunk(world, dim=0)[rank]], dim=0)
    return full.chunk(world, dim=0)[rank]


def merge_shards(key: str, shards: Sequence[torch.Tensor]) -> torch.Tensor:
    """The unpartitioned tensor from all ranks' shards, in rank order (inverse of shard_tensor)."""
    rule = partition_rule(key)
    if len(shards) == 1 or rule == REPLICATED:
        return shards[0]
    if rule == COLS:
        return torch.cat(list(shards), dim=1)
    if rule == GLU:
        halves = [s.chunk(2, dim=0) for s in shards]
        return torch.cat([h[0] for h in halves] + [h[1] for h in halves], dim=0)
    return torch.cat(list(shards), dim=0)


def source_ranks_for(target_rank: int, source_world: int, target_world: int) -> List[int]:
    """The source ranks whose shards make up `target_rank`'s shard when going from source_world to target_world."""
    if target_world <= source_world:
        k = source_world // target_world
        return list(range(target_rank * k, (target_rank + 1) * k))
    return [target_rank // (target_world // source_world)]


def local_shard_from_sources(key: str, sources: List[torch.Tensor], target_rank: int,
                             source_world: int, target_world: int) -> torch.Tensor:
    """`target_rank`'s shard given only the overlapping source shards (from source_ranks_for)."""
    rule = partition_rule(key)
    if rule == REPLICATED:
        return sources[0]
    if target_world <= source_world:
        return merge_shards(key, sources)
    n = target_world // source_world
    return shard_tensor(key, sources[0], target_rank % n, n)
