"""Tensor-parallel layers (Megatron style). Weights are stored [out, in] as in SAT checkpoints: y = x Wᵀ + b."""
import torch
import torch.nn.functional as F
from torch import nn

from kernels import cpu
from model import mpu


def _divide(n: int, world: int, what: str) -> int:
    if n % world:
        raise ValueError(f"{what} ({n}) is not divisible by the model-parallel size {world}")
    return n // world


class VocabParallelEmbedding(nn.Module):
    """Rank r owns the contiguous vocabulary rows [r·V/p, (r+1)·V/p)."""

    def __init__(self, num_embeddings: int, embedding_dim: int, dtype=None, device=None):
        super().__init__()
        world, rank = mpu.get_model_parallel_world_size(), mpu.get_model_parallel_rank()
        self.num_local = _divide(num_embeddings, world, "--vocab-size")
        self.vocab_start = rank * self.num_local
        self.weight = nn.Parameter(torch.empty(self.num_local, embedding_dim, dtype=dtype, device=device),
                                   requires_grad=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if mpu.get_model_parallel_world_size() == 1:
            return F.embedding(ids, self.weight)
        local = (ids >= self.vocab_start) & (ids < self.vocab_start + self.num_local)
        out = F.embedding((ids - self.vocab_start).clamp(0, self.num_local - 1), self.weight)
        out = out * local.unsqueeze(-1).to(out.dtype)
        return mpu.reduce_from_model_parallel_region(out)


class ColumnParallelLinear(nn.Module):
    """Output features split over ranks; each rank returns its slice (no gather: the next layer is row-parallel)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, dtype=None, device=None):
        super().__init__()
        self.in_features = in_features
        self.out_features = _divide(out_features, mpu.get_model_parallel_world_size(), "output size")
        self.weight = nn.Parameter(torch.empty(self.out_features, in_features, dtype=dtype, device=device),
                                   requires_grad=False)
        self.bias = nn.Parameter(torch.empty(self.out_features, dtype=dtype, device=device),
                                 requires_grad=False) if bias else None

    def local_matmul(self, x: torch.Tensor) -> torch.Tensor:
        return cpu.linear(x, self.weight)  # F.linear; a GEMV kernel for few bf16 rows on CPU

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.local_matmul(x)
        return y + self.bias if self.bias is not None else y


class RowParallelLinear(nn.Module):
    """Input features split over ranks; partial products are summed over ranks, then the (replicated) bias added once."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, dtype=None, device=None):
        super().__init__()
        self.in_features = _divide(in_features, mpu.get_model_parallel_world_size(), "input size")
        self.out_features = out_features
        self.weight = nn.Parameter(torch.empty(out_features, self.in_features, dtype=dtype, device=device),
                                   requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype, device=device),
                                 requires_grad=False) if bias else None

    def local_matmul(self, x: torch.Tensor) -> torch.Tensor:
        return cpu.linear(x, self.weight)  # F.linear; a GEMV kernel for few bf16 rows on CPU

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = mpu.reduce_from_model_parallel_region(self.local_matmul(x))
        return y + self.bias if self.bias is not None else y
