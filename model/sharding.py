"""How every checkpoint tensor is partitioned over tensor-parallel ranks and whether it is quantized: one table.

The loader's shapes (model/layers.py: Column/RowParallelLinear, VocabParallelEmbedding), tools/convert_tp.py, the
quantizer and tools/create_random_checkpoint.py all follow `PARTITIONS` (tests/test_sharding.py checks that the
model's layers agree with it). These are the layout of the released 8-way GLM-130B checkpoint (and of the
original convert_tp.py):
- replicated: LayerNorms, row-parallel biases, rotary inv_freq;
- cols: row-parallel weights split along dim 1 (attention.dense, mlp.dense_4h_to_h);
- glu: dense_h_to_4h weight/bias, whose rank-r shard is cat(A_r, G_r) of the global [A; G] halves;
- rows: word embeddings by vocabulary, QKV weight and bias by whole heads.
Quantized: the weights of the four big linears of each layer (their `.weight_scale` follows the weight's rows).
"""
from dataclasses import dataclass
from typing import List, Optional, Sequence

import torch

from model.errors import UserError

REPLICATED, ROWS, COLS, GLU = "replicated", "rows", "cols", "glu"


@dataclass(frozen=True)
class Partition:
    rule: str  # REPLICATED, ROWS, COLS or GLU
    quantized: bool = False  # weight-only quantization replaces this weight by int8 storage + `_scale`
    blocks: int = 1  # the split dimension holds this many equal blocks that must each divide over the ranks

    @property
    def split_dim(self) -> Optional[int]:
        return None if self.rule == REPLICATED else 1 if self.rule == COLS else 0


_REPLICATED = Partition(REPLICATED)
# Checkpoint key suffixes (after `transformer.` or `transformer.layers.<i>.`).
PARTITIONS = {
    "word_embeddings.weight": Partition(ROWS),
    "input_layernorm.weight": _REPLICATED, "input_layernorm.bias": _REPLICATED,
    "attention.query_key_value.weight": Partition(ROWS, quantized=True, blocks=3),
    "attention.query_key_value.bias": Partition(ROWS, blocks=3),
    "attention.dense.weight": Partition(COLS, quantized=True),
    "attention.dense.bias": _REPLICATED,
    "rotary_emb.inv_freq": _REPLICATED,  # per layer in the original convert_tp; SAT's mixin key too
    "post_attention_layernorm.weight": _REPLICATED, "post_attention_layernorm.bias": _REPLICATED,
    "mlp.dense_h_to_4h.weight": Partition(GLU, quantized=True, blocks=2),
    "mlp.dense_h_to_4h.bias": Partition(GLU, blocks=2),
    "mlp.dense_4h_to_h.weight": Partition(COLS, quantized=True),
    "mlp.dense_4h_to_h.bias": _REPLICATED,
    "final_layernorm.weight": _REPLICATED, "final_layernorm.bias": _REPLICATED,
}
QUANTIZED_WEIGHTS = tuple(k for k, p in PARTITIONS.items() if p.quantized)
# The four linears that weight-only quantization replaces (module names).
QUANTIZED_LINEARS = tuple(k[: -len(".weight")] for k in QUANTIZED_WEIGHTS)


def partition(key: str) -> Partition:
    """The partition of a checkpoint key (a quantization scale: its weight's rows; replicated where the weight is
    split along its columns, since each rank computes its own scales there and they are never merged)."""
    if key.endswith(".weight_scale"):
        weight = partition(key[: -len("_scale")])
        return _REPLICATED if weight.rule == COLS else Partition(weight.rule, blocks=weight.blocks)
    for suffix, part in PARTITIONS.items():
        if key == suffix or key.endswith("." + suffix):
            return part
    raise UserError(f"checkpoint key {key!r} is not a GLM-130B tensor (model/sharding.py lists how each one is "
                    f"partitioned)")


def is_quantized_weight(key: str) -> bool:
    return key.endswith(QUANTIZED_WEIGHTS)


def shard_tensor(key: str, full: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    """Rank `rank`'s shard of the unpartitioned tensor `full` (a view when contiguous slicing allows)."""
    rule = partition(key).rule
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
    rule = partition(key).rule
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
    rule = partition(key).rule
    if rule == REPLICATED:
        return sources[0]
    if target_world <= source_world:
        return merge_shards(key, sources)
    n = target_world // source_world
    return shard_tensor(key, sources[0], target_rank % n, n)
