"""Weight-only quantized matmuls: y = x · (q · scale)ᵀ for GLM-130B's INT8 / INT4 layers, and the one function
that chooses their kernel per device, activation dtype, row count and weight layout (`weight_only_linear`).

Stored format (checkpoints, state_dict) is always the original's: int8 [N, K] or packed int4 [N, K/2] (even column
in the high nibble) plus an fp16 scale per row. At run time:
- CPU with this project's kernels (kernels/cpu.py), bf16 activations, at most kernels.cpu.MAX_GEMV_ROWS rows
  (decode): its GEMV kernels, which read the stored layout as it is. They are faster here than PyTorch's
  weight-packed kernels below (benchmarking/matmul_table.py prints both), which stay the path without them.
- Other CPUs, bf16 activations, at most CPU_KERNEL_MAX_ROWS rows: PyTorch's weight-packed kernels.
  INT8 uses the stored int8 matrix as is (`_weight_int8pack_mm`). INT4 uses `_weight_int4pack_mm_for_cpu`, whose
  weight layout differs: `to_cpu_int4` repacks once at load into it (the only resident copy; `from_cpu_int4` gives
  the original bytes back for state_dict) and `int4_scales_and_zeros` gives its group-wise (scale, zero) table.
  That kernel computes (u - 8) · scale + zero for the unsigned nibble u, so u = q + 8 and zero = 0 give q · scale.
- CUDA, fp16/bf16 activations, the stored layout, triton installed: the fused Triton kernels of
  kernels/triton_matmul.py (read the integer weights once, dequantize in registers; a GEMV-like kernel for decode
  rows, a tiled one for prefill). GLM_TRITON_KERNELS=0 (or TRITON_KERNELS = False) keeps the path below instead, and
  so does a failure of the kernels on a device (one warning naming the cause, kernels/triton_matmul.py:disable),
  except during a CUDA graph capture, where the error reaches the capture (generation/graph_decode.py falls back).
- CPUs without a bf16 GEMM (AVX2-only: PyTorch's is a scalar loop there, kernels.cpu.bf16_gemm_native), bf16
  activations, more rows: q · scale exact in fp32, a block of weight rows at a time, fp32 GEMM, rounded once.
- Everything else (more rows = prefill, fp16/fp32 activations, CUDA without triton): dequantize into the activation
  dtype, then a dense GEMM (at prefill the dequantization is a few percent of the GEMM; fp16 is then exactly the
  original's path).
"""
import functools
import os
from typing import Optional

import torch

from kernels import cpu, triton_matmul

# (activation dtype, bits) -> most rows for which the library kernel beats dequantize + GEMM (benchmarking/matmul_table.py)
CPU_KERNEL_MAX_ROWS = {(torch.bfloat16, 8): 12, (torch.bfloat16, 4): 64}
ORIGINAL, CPU_INT4 = "original", "cpu_int4"  # weight layouts: GLM-130B's stored one, PyTorch's CPU int4 kernel's
INT4_GROUP_SIZES = (256, 128, 64, 32)  # group sizes the CPU int4 kernel accepts (all groups carry the row scale)
TRITON_KERNELS = os.environ.get("GLM_TRITON_KERNELS", "1") != "0"  # the fused GPU kernels where they apply


# ---------------------------------------------------------------------------------------------------------------
# The CPU int4 kernel's layout: per block of `block` rows (64 where PyTorch's kernel uses AVX-512, 32 with AVX2),
# for each column k, block/2 bytes; byte j holds the unsigned nibbles u = q + 8 of rows j (low nibble) and
# j + block/2 (high nibble).

def to_cpu_int4(packed: torch.Tensor, block: Optional[int] = None) -> torch.Tensor:
    """Original packed int4 [N, K/2] -> uint8 [N, K/2] in the CPU int4 kernel's layout."""
    block = block or cpu_int4_block()
    n, half_k = packed.shape
    b = packed.contiguous().view(torch.uint8) ^ 0x88  # two's-complement nibble q -> unsigned q + 8
    u = torch.stack([b >> 4, b & 0x0F], dim=-1).view(n // block, block, 2 * half_k)
    u = u.transpose(1, 2)  # [blocks, K, block]
    return (u[..., block // 2:] << 4 | u[..., :block // 2]).contiguous().view(n, half_k)


def _cpu_int4_unsigned(p: torch.Tensor) -> torch.Tensor:
    """uint8 [N, K] of the unsigned nibbles u = q + 8 held in the CPU int4 layout."""
    block = cpu_int4_block()
    n, half_k = p.shape
    b = p.view(n // block, 2 * half_k, block // 2)
    return torch.cat([b & 0x0F, b >> 4], dim=-1).transpose(1, 2).reshape(n, 2 * half_k)


def from_cpu_int4(p: torch.Tensor) -> torch.Tensor:
    """Inverse of to_cpu_int4: the original packed int4 bytes (int8 [N, K/2])."""
    u = _cpu_int4_unsigned(p)
    return ((u[:, 0::2] << 4 | u[:, 1::2]) ^ 0x88).view(torch.int8)


@functools.lru_cache(maxsize=None)
def cpu_int4_block() -> int:
    """Rows per block of the layout this PyTorch's CPU int4 kernel packs (it depends on the CPU); 0 when it packs
    neither known way (or has no such kernel): INT4 weights then stay in the original layout."""
    for block in (64, 32):
        try:
            q = torch.randint(-8, 8, (block, 64), dtype=torch.int8, generator=torch.Generator().manual_seed(0))
            packed = (q[:, 0::2] << 4) | (q[:, 1::2] & 0x0F)
            ref = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32) + 8, 1)
            if ref.shape == packed.shape and torch.equal(ref, to_cpu_int4(packed, block)):
                return block
        except (AttributeError, RuntimeError):
            return 0
    return 0


def cpu_int4_supported(n: int, k: int) -> bool:
    """Whether an [n, k] INT4 weight can use the CPU int4 kernel (else it stays in the original layout)."""
    block = cpu_int4_block()
    return block > 0 and n % block == 0 and k % INT4_GROUP_SIZES[-1] == 0


def int4_group_size(k: int) -> int:
    return next(g for g in INT4_GROUP_SIZES if k % g == 0)


def int4_scales_and_zeros(scale: torch.Tensor, k: int, dtype: torch.dtype) -> torch.Tensor:
    """[K/group, N, 2] table of (scale, 0): every group of a row carries that row's scale (symmetric, no offset)."""
    groups = k // int4_group_size(k)
    table = torch.stack([scale.to(dtype), torch.zeros_like(scale, dtype=dtype)], dim=-1)
    return table.unsqueeze(0).expand(groups, -1, -1).contiguous()


# ---------------------------------------------------------------------------------------------------------------
# Matmuls

def _int4_transposed_to(weight: torch.Tensor, layout: str, dtype: torch.dtype) -> torch.Tensor:
    """qᵀ [K, N] in `dtype` from packed INT4 storage (written straight into place: byte-wise transposes are slow)."""
    n, half_k = weight.shape
    k = 2 * half_k
    if layout == CPU_INT4:  # nibble u = q + 8; XOR 0x88 makes both nibbles two's-complement q
        block = cpu_int4_block()
        b = (weight.view(torch.int8) ^ -0x78).view(n // block, k, block // 2).transpose(0, 1)
        out = torch.empty(k, n // block, block, dtype=dtype, device=weight.device)
        out[..., :block // 2], out[..., block // 2:] = (b << 4) >> 4, b >> 4
        return out.view(k, n)
    b = weight.view(torch.int8)
    out = torch.empty(n, half_k, 2, dtype=dtype, device=weight.device)
    out[..., 0], out[..., 1] = b >> 4, (b << 4) >> 4
    return out.view(n, k).t()


def dequantized_t(weight: torch.Tensor, scale: torch.Tensor, bits: int, layout: str, dtype: torch.dtype,
                  apply_scale: bool = True) -> torch.Tensor:
    """The dense weight transposed, (q · scale)ᵀ [K, N] in `dtype` (maybe a transposed view), from any layout.

    With apply_scale, each value is the exact product rounded once to `dtype` (fp16: the original's dequantized
    weight); without, it is q itself (exact in every float dtype)."""
    qt = _int4_transposed_to(weight, layout, dtype) if bits == 4 else weight.to(dtype).t()
    return qt * scale.to(dtype) if apply_scale else qt  # fp16 x fp16 products are exact in fp32, rounded once


def dequantized_rows(weight: torch.Tensor, scale: torch.Tensor, bits: int, layout: str, i: int, j: int,
                      out: torch.Tensor) -> torch.Tensor:
    """Rows i:j of q · scale into the fp32 `out` (every product exact in fp32). CPU_INT4 rows come in whole blocks."""
    q = weight[i:j]
    out.copy_(_int4_transposed_to(q, layout, torch.float32).t() if bits == 4 else q)
    return out.mul_(scale[i:j, None].float())


def resident_layout(weight: torch.Tensor, bits: int) -> str:
    """The layout a quantized weight [N, K or K/2] (stored layout, real values) is best kept in on its device:
    "cpu_int4" for INT4 on a CPU whose matmuls go through PyTorch's int4 kernel (no kernels/cpu.py kernels, shape
    supported), else "original" (this project's kernels and the dequantizing path read the stored layout)."""
    if (bits == 4 and weight.device.type == "cpu" and not cpu.available()
            and cpu_int4_supported(weight.shape[0], 2 * weight.shape[1])):
        return CPU_INT4
    return ORIGINAL


def uses_cpu_kernel(x: torch.Tensor, bits: int) -> bool:
    """Whether PyTorch's weight-packed CPU kernel takes x (checked after this project's GEMV kernels)."""
    rows = x.numel() // max(1, x.shape[-1])
    return x.device.type == "cpu" and rows <= CPU_KERNEL_MAX_ROWS.get((x.dtype, bits), 0)


def _triton_device(x: torch.Tensor) -> bool:
    return x.device.type == "cuda"


def uses_triton(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, bits: int, layout: str) -> bool:
    """Whether the fused Triton kernels take this matmul: a CUDA fp16/bf16 activation, the stored layout, triton."""
    return (TRITON_KERNELS and layout == ORIGINAL and _triton_device(x) and triton_matmul.available(x.device)
            and triton_matmul.supports(x, weight, scale, bits))


def weight_only_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, bits: int,
                       layout: str = ORIGINAL, scales_and_zeros: Optional[torch.Tensor] = None) -> torch.Tensor:
    """x [..., K] @ (q · scale)ᵀ -> [..., N] in x's dtype (no bias)."""
    if uses_triton(x, weight, scale, bits, layout):
        try:
            return triton_matmul.weight_only_matmul(x, weight, scale, bits)
        except torch.OutOfMemoryError:
            raise
        except Exception as error:
            if triton_matmul.capturing(x.device):
                raise
            triton_matmul.disable(x.device, error)
    if layout == ORIGINAL and cpu.applies(x):
        return (cpu.gemv_int8 if bits == 8 else cpu.gemv_int4)(x, weight, scale)
    x2 = x.reshape(-1, x.shape[-1])
    if uses_cpu_kernel(x, bits) and bits == 8:
        y = torch.ops.aten._weight_int8pack_mm(x2.contiguous(), weight, scale.to(x.dtype))
    elif uses_cpu_kernel(x, bits) and layout == CPU_INT4:
        if scales_and_zeros is None or scales_and_zeros.dtype != x.dtype:
            scales_and_zeros = int4_scales_and_zeros(scale, x.shape[-1], x.dtype)
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2.contiguous(), weight, int4_group_size(x.shape[-1]),
                                                       scales_and_zeros)
    elif cpu.needs_fp32_gemm(x):  # a CPU without a bf16 GEMM: exact fp32 q · scale, a block of rows at a time
        y = cpu.linear_in_fp32_blocks(x2, weight.shape[0], functools.partial(dequantized_rows, weight, scale, bits,
                                                                             layout))
    elif x.dtype == torch.float16:  # the original's arithmetic: fp16 weight q·scale, fp16 GEMM (x·q could overflow)
        y = torch.mm(x2, dequantized_t(weight, scale, bits, layout, x.dtype))
    else:  # q is exact in bf16/fp32: one pass less over the weight by scaling the [M, N] output instead
        y = torch.mm(x2, dequantized_t(weight, scale, bits, layout, x.dtype, apply_scale=False)) * scale.to(x.dtype)
    return y.reshape(*x.shape[:-1], y.shape[-1])
