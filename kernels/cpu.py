"""Fast CPU kernels for small-batch decoding (bf16 / INT8 / INT4 weights) and the fused one-token decode step.

Batch-1 decoding reads every weight once per token, so its speed is memory bandwidth ÷ weight bytes. PyTorch's
bf16 matrix × vector path reaches only a fraction of this machine's read bandwidth, and at ~40 small ops per layer
its per-op overhead costs as much again. This module provides

* `gemv_bf16(x, w, bias)`, `gemv_int8(x, q, scale, bias)`, `gemv_int4(x, packed, scale, bias)`: y = x Wᵀ (+ b) for
  x bf16 [..., K] with at most MAX_GEMV_ROWS rows (`applies(x)`); W bf16 [N, K], or q int8 [N, K] / packed int4
  [N, K/2] in GLM-130B's stored layout (even column in the high nibble) with one scale per output row.
  fp32 accumulation, one bf16 rounding per output. `quantization.weight_only_linear` and `linear` route to them.
* `linear(x, w, bias)`: `F.linear` that takes the bf16 GEMV kernel when x is a CPU bf16 tensor with few rows, and
  `linear_in_fp32_blocks` for many rows on a CPU whose PyTorch has no fast bf16 GEMM (`bf16_gemm_native`: AVX2-only
  CPUs; GLM_CPU_BF16_GEMM=0 forces that path).
* `fp16_to_bf16_(dst, src)`: the fp16 → bf16 copy on the calling thread alone (weight offload's reader thread).
* `decode_layers(x, bits, weights, ...)`: one token per sequence through every layer in one C++ call (RoPE +
  KV-cache append + attention, GeGLU, residual + LayerNorm fused); model/fast_decode.py plans and calls it.

The C++ sources (kernels/csrc/) are compiled on first use, one library per instruction-set tier (kernels/build.py):
"avx512bf16" (AVX-512 BF16 dot products), "avx512" (AVX-512F, fp32 FMA), "avx2" (AVX2 + FMA + F16C, fp32 FMA),
cached under $TORCH_EXTENSIONS_DIR (default ~/.cache/torch_extensions). The best tier the CPU runs is loaded;
GLM_CPU_KERNELS=avx2|avx512|avx512bf16 forces one, GLM_CPU_KERNELS=0 none. `tier()` names the loaded tier
("none" when there is none); the choice is printed once to stderr. Every tier has the same ops, including the
fused decode step. Without any (no AVX2, GLM_CPU_KERNELS=0, a failed build) `available()` is False and the callers
use PyTorch (and its weight-packed INT8/INT4 kernels, see quantization/matmul.py) instead.
The exact fp32 path of the model never uses these kernels.
"""
import functools
import os
import threading
from typing import List, Optional

import torch
import torch.nn.functional as F

from kernels import build

MAX_GEMV_ROWS = 16  # more activation rows than this are a matrix multiply: F.linear / oneDNN is faster there


_LOADING = threading.Lock()
_TIER: Optional[str] = None


def tier() -> str:
    """The loaded kernel tier: "avx512bf16", "avx512", "avx2", or "none" (chosen, built and loaded on the first call,
    once even when several threads ask at the same time: weight offload's converter thread may be the first)."""
    global _TIER
    if _TIER is None:
        with _LOADING:
            if _TIER is None:
                _TIER = build.select_and_load(verbose=os.environ.get("GLM_CPU_KERNELS_VERBOSE") == "1")
    return _TIER


def loaded() -> bool:
    """Whether a kernel library has been loaded already (never loads one)."""
    return _TIER not in (None, build.NONE)


@functools.lru_cache(maxsize=None)
def available() -> bool:
    """True when compiled kernels are loaded (of any tier; later calls are free)."""
    return tier() != build.NONE


# ---------------------------------------------------------------------------------------------------------------
# Matrix × vector

def applies(x: torch.Tensor) -> bool:
    """Whether the GEMV kernels take this activation: a CPU bf16 tensor with at most MAX_GEMV_ROWS rows."""
    return (x.device.type == "cpu" and x.dtype == torch.bfloat16 and x.dim() >= 1
            and x.numel() // max(x.shape[-1], 1) <= MAX_GEMV_ROWS and available())


def gemv_bf16(x: torch.Tensor, w: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """y = x Wᵀ (+ b) for bf16 W [N, K] (the caller checks `applies(x)`)."""
    return torch.ops.glm_cpu.gemv_bf16(x, w.contiguous(), bias)


def gemv_int8(x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor, bias: Optional[torch.Tensor] = None):
    """y = x (w · scale[:, None])ᵀ (+ b) for int8 w [N, K], GLM-130B's W8A16 layer (the caller checks `applies(x)`)."""
    return torch.ops.glm_cpu.gemv_int8(x, w.contiguous(), scale, bias)


def gemv_int4(x: torch.Tensor, w_packed: torch.Tensor, scale: torch.Tensor, bias: Optional[torch.Tensor] = None):
    """The same for GLM-130B's packed INT4 w [N, K/2] (even column in the high nibble)."""
    return torch.ops.glm_cpu.gemv_int4(x, w_packed.contiguous(), scale, bias)


def linear(x: torch.Tensor, w: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """F.linear, through the bf16 GEMV kernel when x is a CPU bf16 tensor with at most MAX_GEMV_ROWS rows, and in
    fp32 blocks (`linear_in_fp32_blocks`) for more rows on a CPU without a bf16 GEMM."""
    if w.dtype == torch.bfloat16 and w.is_contiguous() and applies(x):
        return torch.ops.glm_cpu.gemv_bf16(x, w, bias)
    if w.dtype == torch.bfloat16 and needs_fp32_gemm(x):
        return linear_in_fp32_blocks(x, w.shape[0], lambda i, j, out: out.copy_(w[i:j]), bias)
    return F.linear(x, w, bias)


# ---------------------------------------------------------------------------------------------------------------
# bf16 matrix multiplies on CPUs without a bf16 GEMM

FP32_BLOCK_ROWS = 256  # weight rows converted at a time: 256 x K fp32 stays in L2 for the GEMM that reads it


def bf16_gemm_native() -> bool:
    """Whether PyTorch's bf16 GEMM runs at speed on this CPU: oneDNN with AVX-512 (BF16 instructions or oneDNN's
    emulation) or AMX. Without (AVX2-only CPUs; `torch.backends.mkldnn` disabled) it is a scalar loop about 100x
    slower than fp32. GLM_CPU_BF16_GEMM=0 treats this CPU as one without (to exercise that path anywhere)."""
    return torch.backends.mkldnn.enabled and _bf16_gemm_supported()


@functools.lru_cache(maxsize=None)
def _bf16_gemm_supported() -> bool:
    if os.environ.get("GLM_CPU_BF16_GEMM", "").strip() == "0":
        return False
    try:
        return torch.backends.mkldnn.is_available() and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a PyTorch without that query: judge by the CPU flags oneDNN needs
        return {"avx512bw", "avx512vl", "avx512dq"} <= build.cpu_flags()


def needs_fp32_gemm(x: torch.Tensor) -> bool:
    """A CPU bf16 activation with more rows than the GEMV kernels take, on a CPU without a fast bf16 GEMM."""
    return (x.device.type == "cpu" and x.dtype == torch.bfloat16
            and x.numel() // max(x.shape[-1], 1) > MAX_GEMV_ROWS and not bf16_gemm_native())


def linear_in_fp32_blocks(x: torch.Tensor, n: int, weight_rows, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """x [..., K] (bf16) times an [n, K] weight transposed, in fp32, rounded once to x's dtype: what a bf16 GEMM
    computes (fp32 accumulation), at fp32 GEMM speed. `weight_rows(i, j, out)` writes weight rows i:j as fp32 into
    out [j - i, K]; rows go through one reused L2-sized buffer, so no fp32 copy of the weight is ever made."""
    x32 = x.reshape(-1, x.shape[-1]).float()
    out = torch.empty(x32.shape[0], n, dtype=torch.float32, device=x.device)
    buf = torch.empty(min(FP32_BLOCK_ROWS, n), x.shape[-1], dtype=torch.float32, device=x.device)
    for i in range(0, n, FP32_BLOCK_ROWS):
        j = min(n, i + FP32_BLOCK_ROWS)
        block = buf[:j - i]
        weight_rows(i, j, block)
        out[:, i:j] = F.linear(x32, block)
    if bias is not None:
        out += bias.float()
    return out.to(x.dtype).view(*x.shape[:-1], n)


def read_bandwidth_probe(x: torch.Tensor) -> float:
    """Sum of a contiguous fp32 tensor with wide loads on all threads (for measuring read bandwidth)."""
    if available() and x.dtype == torch.float32 and x.is_contiguous():
        return torch.ops.glm_cpu.read_sum(x)
    return float(x.sum())


def pool_rest() -> None:
    """The kernels' helper threads sleep now rather than spin for the next call (the caller is about to wait for
    other work that needs the cores: weight offload's reads). Nothing when no kernel library is loaded."""
    if loaded():
        torch.ops.glm_cpu.pool_rest()


def fp16_to_bf16_(dst: torch.Tensor, src: torch.Tensor) -> None:
    """dst.copy_(src) for CPU fp16 `src` into bf16 `dst`, on the calling thread alone (weight offload's reader thread
    converts while the compute threads run: PyTorch's copy would take a second team of threads); elsewise copy_."""
    if (available() and src.dtype == torch.float16 and dst.dtype == torch.bfloat16 and src.is_contiguous()
            and dst.is_contiguous() and src.device.type == dst.device.type == "cpu"):
        torch.ops.glm_cpu.fp16_to_bf16(src, dst)
    else:
        dst.copy_(src)


# ---------------------------------------------------------------------------------------------------------------
# All layers of one decoding step

def decode_layers(x: torch.Tensor, bits: int, weights: List[torch.Tensor], scales: List[torch.Tensor],
                  biases: List[torch.Tensor], norms: List[torch.Tensor], alpha: float, eps: float,
                  k_cache: List[torch.Tensor], v_cache: List[torch.Tensor], pos: int, cos: torch.Tensor,
                  sin: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Every DeepNorm layer for one new token per row, in one call (the caller checks `applies(x)`).

    x: the first input_layernorm's output [b, 1, H] (bf16). Per layer i, its four linears (query_key_value, dense,
    dense_h_to_4h, dense_4h_to_h) are weights/biases[4i + j] (and scales[4i + j] for bits 8 / 4, all in the stored
    layout); norms[4i .. 4i + 3] are post_attention_layernorm weight, bias, then the next layer's input_layernorm
    (the final_layernorm after the last) weight, bias. k_cache/v_cache [b, heads, T, d] per layer get this token's
    post-RoPE keys and values at column `pos`; cos/sin [b, 1, 1, d] fp32; mask [b|1, pos + 1] bool, True = blocked.
    Returns the final-layernormed hidden state [b, 1, H]."""
    return torch.ops.glm_cpu.decode_layers(x, bits, weights, scales, biases, norms, alpha, eps, k_cache, v_cache,
                                           pos, cos, sin, mask)
