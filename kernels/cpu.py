"""Fast CPU kernels for small-batch decoding (bf16 / INT8 / INT4 weights) and the fused one-token decode step.

Batch-1 decoding reads every weight once per token, so its speed is memory bandwidth ÷ weight bytes. PyTorch's
bf16 matrix × vector path reaches only a fraction of this machine's read bandwidth, and at ~40 small ops per layer
its per-op overhead costs as much again. This module provides

* `gemv_bf16(x, w, bias)`, `gemv_int8(x, q, scale, bias)`, `gemv_int4(x, packed, scale, bias)`: y = x Wᵀ (+ b) for
  x bf16 [..., K] with at most MAX_GEMV_ROWS rows (`applies(x)`); W bf16 [N, K], or q int8 [N, K] / packed int4
  [N, K/2] in GLM-130B's stored layout (even column in the high nibble) with one scale per output row.
  fp32 accumulation, one bf16 rounding per output. `quantization.weight_only_linear` and `linear` route to them.
* `linear(x, w, bias)`: `F.linear` that takes the bf16 GEMV kernel when x is a CPU bf16 tensor with few rows.
* `decode_layers(x, bits, weights, ...)`: one token per sequence through every layer in one C++ call (RoPE +
  KV-cache append + attention, GeGLU, residual + LayerNorm fused); model/fast_decode.py plans and calls it.

The C++ source (kernels/csrc/) is compiled on first use with torch.utils.cpp_extension (cached under
$TORCH_EXTENSIONS_DIR, default ~/.cache/torch_extensions) when the CPU has AVX-512 with BF16. Without those, or
with GLM_CPU_KERNELS=0, or if the build fails, `available()` is False (one warning) and the callers use PyTorch
(and its weight-packed INT8/INT4 kernels, see quantization/matmul.py) instead.
The exact fp32 path of the model never uses these kernels.
"""
import functools
import os
import sys
import warnings
from pathlib import Path
from typing import List, Optional

import torch
import torch.nn.functional as F

_NAME = "glm_cpu_kernels"
_SOURCE = Path(__file__).resolve().parent / "csrc" / "cpu_gemv.cpp"
_REQUIRED_CPU_FLAGS = ("avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_bf16")
_CFLAGS = ["-O3", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx512bf16", "-mfma", "-mf16c",
           "-std=c++17", "-fopenmp"]
MAX_GEMV_ROWS = 16  # more activation rows than this are a matrix multiply: F.linear / oneDNN is faster there


def _cpu_flags() -> set:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def _built() -> bool:
    try:
        from torch.utils.cpp_extension import _get_build_directory
        return any(Path(_get_build_directory(_NAME, False)).glob("*.so"))
    except Exception:  # a private helper of torch: if it moves, just skip the message
        return True


@functools.lru_cache(maxsize=None)
def available() -> bool:
    """True when the compiled kernels are loaded (built on the first call; later calls are free)."""
    if os.environ.get("GLM_CPU_KERNELS", "1") == "0":
        return False
    missing = [f for f in _REQUIRED_CPU_FLAGS if f not in _cpu_flags()]
    if missing:
        warnings.warn(f"fast CPU decode kernels disabled: this CPU lacks {', '.join(missing)}; using PyTorch ops")
        return False
    try:
        from torch.utils.cpp_extension import load
        if not _built():
            print("> Compiling the fast CPU kernels (once, about 20 s; cached under $TORCH_EXTENSIONS_DIR or "
                  "~/.cache/torch_extensions)", file=sys.stderr, flush=True)
        load(name=_NAME, sources=[str(_SOURCE)], extra_cflags=_CFLAGS, extra_ldflags=["-fopenmp"],
             is_python_module=False,
             verbose=os.environ.get("GLM_CPU_KERNELS_VERBOSE") == "1")
    except Exception as e:  # no compiler, no ninja, ...: stay correct, just slower
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        warnings.warn(f"fast CPU decode kernels unavailable ({first}); using PyTorch ops")
        return False
    return True


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
    """F.linear, through the bf16 GEMV kernel when x is a CPU bf16 tensor with at most MAX_GEMV_ROWS rows."""
    if w.dtype == torch.bfloat16 and w.is_contiguous() and applies(x):
        return torch.ops.glm_cpu.gemv_bf16(x, w, bias)
    return F.linear(x, w, bias)


def read_bandwidth_probe(x: torch.Tensor) -> float:
    """Sum of a contiguous fp32 tensor with wide loads on all threads (for measuring read bandwidth)."""
    if available() and x.dtype == torch.float32 and x.is_contiguous():
        return torch.ops.glm_cpu.read_sum(x)
    return float(x.sum())


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
