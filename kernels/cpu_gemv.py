"""Fast CPU kernels for small-batch decoding (bf16 / INT8 / INT4 weights) and the fused one-token decode step.

Batch-1 decoding reads every weight once per token, so its speed is memory bandwidth ÷ weight bytes. PyTorch's
bf16 matrix × vector path reaches only a fraction of this machine's read bandwidth, and at ~40 small ops per layer
its per-op overhead costs as much again. This module provides

* `gemv_bf16(x, w, bias)`, `gemv_int8(x, q, scale, bias)`, `gemv_int4(x, packed, scale, bias)`: y = x Wᵀ (+ b) for
  x bf16 [..., K] with at most MAX_GEMV_ROWS rows (`applies(x)`); W bf16 [N, K], or q int8 [N, K] / packed int4
  [N, K/2] in GLM-130B's stored layout (even column in the high nibble) with one scale per output row.
  fp32 accumulation, one bf16 rounding per output. `kernels.weight_only_linear` and `linear` route to them.
* `linear(x, w, bias)`: `F.linear` that takes the bf16 GEMV kernel when x is a CPU bf16 tensor with few rows.
* `decode_step(model, ...)`: one token per sequence through the whole model, all layers in one C++ call (RoPE +
  KV-cache append + attention, GeGLU, residual + LayerNorm fused); `GLM130B.forward_with_cache` uses it when
  `fast_decode_applies`.

The C++ source (kernels/csrc/cpu_gemv.cpp) is compiled on first use with torch.utils.cpp_extension (cached under
$TORCH_EXTENSIONS_DIR, default ~/.cache/torch_extensions) when the CPU has AVX-512 with BF16. Without those, or
with GLM_CPU_KERNELS=0, or if the build fails, `available()` is False (one warning) and the callers use PyTorch
(and its weight-packed INT8/INT4 kernels, see kernels/__init__.py) instead.
The exact fp32 path of the model never uses these kernels.
"""
import functools
import os
import sys
import warnings
from pathlib import Path
from typing import Optional

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
# The fused one-token decode step

def _mp_world_size() -> int:
    from model import mpu
    return mpu.get_model_parallel_world_size()


def fast_decode_applies(model, tokens: torch.Tensor, attention_mask: torch.Tensor, cache) -> bool:
    """Whether `decode_step` can run this forward_with_cache call: one new token per row, a bf16 CPU model using
    fused attention (--attention sdpa/auto; "plain" keeps SAT's op order) whose linears are all in one kernel format,
    no tensor parallelism, at most MAX_GEMV_ROWS rows, and the mask covering exactly the cached tokens plus the new one."""
    return (tokens.dim() == 2 and tokens.shape[1] == 1 and tokens.shape[0] <= MAX_GEMV_ROWS
            and tokens.device.type == "cpu" and model.dtype == torch.bfloat16 and model._use_sdpa()
            and cache.batch_size == tokens.shape[0] and cache.length < cache.max_length
            and attention_mask.shape[-1] == cache.length + 1 and attention_mask.shape[-2] == 1
            and _mp_world_size() == 1 and available() and _plan(model) is not None)


def _kernel_bits(module) -> Optional[int]:
    """16, 8 or 4 when the decode kernels read this linear's weight as stored; None otherwise."""
    bits = getattr(module, "bits", None) or 16
    dtype_ok = module.weight.dtype == (torch.bfloat16 if bits == 16 else torch.int8)
    layout_ok = getattr(module, "layout", "original") == "original"
    return bits if dtype_ok and layout_ok and module.weight.is_contiguous() and module.bias is not None else None


def _plan(model):
    """The flat tensor lists decode_layers reads, built once per model and rebuilt when its linears or weights are
    replaced (quantize() swaps every linear, loading assigns new tensors: the first and last ones are checked).
    None when the linears are not all in one kernel format."""
    t = model.transformer
    first, last = t.layers[0].attention.query_key_value, t.layers[-1].mlp.dense_4h_to_h
    key = (id(first), id(first.weight), id(last), id(last.weight), id(t.word_embeddings.weight))
    cached = getattr(model, "_fast_decode_plan", None)
    if cached is not None and cached[0] == key:
        return cached[1]
    linears = [m for layer in t.layers for m in (layer.attention.query_key_value, layer.attention.dense,
                                                   layer.mlp.dense_h_to_4h, layer.mlp.dense_4h_to_h)]
    bits = {_kernel_bits(m) for m in linears}
    plan = None
    if len(bits) == 1 and None not in bits:
        next_norms = [layer.input_layernorm for layer in t.layers[1:]] + [t.final_layernorm]
        norms = [p for layer, nxt in zip(t.layers, next_norms)
                 for p in (layer.post_attention_layernorm.weight, layer.post_attention_layernorm.bias,
                           nxt.weight, nxt.bias)]
        plan = {"bits": bits.pop(), "weights": [m.weight for m in linears], "biases": [m.bias for m in linears],
                "scales": [m.weight_scale for m in linears if hasattr(m, "weight_scale")], "norms": norms,
                "alpha": t.layers[0].alpha, "eps": t.final_layernorm.eps}
    model._fast_decode_plan = (key, plan)
    return plan


def decode_step(model, tokens, position_ids, attention_mask, cache) -> torch.Tensor:
    """GLM130B.forward_with_cache for one new token per row, with fused kernels. Returns logits [b, 1, V].

    The embedding and first input_layernorm here, then every layer in one call (glm_cpu::decode_layers: qkv GEMV,
    RoPE + cache append + attention, dense GEMV, x·alpha + attn → LayerNorm, h→4h GEMV, GeGLU, 4h→h GEMV,
    y·alpha + mlp → next LayerNorm), then the logits GEMV. The caller advances the cache."""
    t, plan = model.transformer, _plan(model)
    h = t.word_embeddings(tokens)
    cos, sin = model.rotary.cos_sin(position_ids, h.dtype)  # rounded to bf16 as the unfused path's tables
    ln = t.layers[0].input_layernorm
    x = F.layer_norm(h, ln.normalized_shape, ln.weight, ln.bias, ln.eps)
    x = torch.ops.glm_cpu.decode_layers(x, plan["bits"], plan["weights"], plan["scales"], plan["biases"],
                                        plan["norms"], plan["alpha"], plan["eps"], cache.k, cache.v,
                                        cache.reserve(1), cos.float(), sin.float(),
                                        attention_mask.reshape(attention_mask.shape[0], -1))
    return torch.ops.glm_cpu.gemv_bf16(x, t.word_embeddings.weight, None)
