"""Fused weight-only matmuls on GPU (Triton): y = x · (q · scale)ᵀ for GLM-130B's stored INT8 [N, K] and packed
INT4 [N, K/2] weights (even column in the high nibble) with one scale per output row, read as stored, once.

Two kernels (kernels/triton_wo_kernels.py), chosen by `choose_config` from the row count:
- rows <= GEMV_MAX_ROWS (decode): `gemv_kernel`, CUDA-core multiply-and-reduce over a weight tile for all rows;
- more rows: `mm_kernel`, tensor-core tiles with the weight tile dequantized to x's dtype in registers (16-row tiles
  for the rest of the decode range, 64/128-row tiles for prefill).
Both split K over several programs when the output alone gives too few programs to fill the GPU (fp32 partials
summed afterwards).

Triton is imported on first use only, so a machine without it (or without a GPU) runs everything else: `available()`
says whether these kernels can run on a device. A failure of any kind (triton does not import, a kernel does not
compile, Triton's launcher cannot be built because the C compiler or Python.h is missing) is reported once per device
by `disable`, with its cause, and the caller (quantization/matmul.py) takes PyTorch's path there from then on.
Under TRITON_INTERPRET=1 (set before triton is imported) they run on CPU
tensors too, which is how tests/test_triton_kernels.py checks them without a GPU.
"""
import dataclasses
import functools
import importlib.util
import os
import subprocess
import sysconfig
import warnings
from typing import Dict, Optional

import torch

GEMV_MAX_ROWS = 4  # above this a 16-row tensor-core tile beats CUDA-core reduction (to be confirmed on the GPU)
DECODE_MAX_ROWS = 16  # the decode range: small tiles and split-K
MAX_SPLIT_K = 8
# Decode reads weights at a low arithmetic intensity: enough programs in flight per SM (split-K where the output
# alone gives too few) keep loads outstanding; prefill tiles only split when there are fewer tiles than SMs.
DECODE_PROGRAMS_PER_SM = 8
ACTIVATION_DTYPES = (torch.float16, torch.bfloat16)


@dataclasses.dataclass(frozen=True)
class Config:
    kernel: str  # "gemv" or "mm"
    block_m: int
    block_n: int
    block_k: int
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 2
    group_m: int = 8


@functools.lru_cache(maxsize=None)
def _kernels():
    if interpreting():
        _fix_interpreter_bf16_dot()
    from kernels import triton_wo_kernels
    return triton_wo_kernels


def _fix_interpreter_bf16_dot() -> None:
    """The interpreter keeps bf16 as raw uint16 bits and hands them to numpy's matmul as integers; convert them to
    fp32 first (debug mode only: compiled kernels never go through the interpreter)."""
    from triton.runtime import interpreter
    import triton.language as tl
    builder = interpreter.InterpreterBuilder
    if getattr(builder, "_glm_bf16_dot_fixed", False):
        return
    original = builder.create_dot

    def create_dot(self, a, b, d, *args, **kwargs):
        def as_fp32(h):
            if h.dtype.scalar != tl.bfloat16:
                return h
            data = interpreter._convert_float(h.data, tl.bfloat16, tl.float32, None).view("float32")
            return interpreter.TensorHandle(data, tl.float32)
        return original(self, as_fp32(a), as_fp32(b), d, *args, **kwargs)

    builder.create_dot = create_dot
    builder._glm_bf16_dot_fixed = True


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


@functools.lru_cache(maxsize=None)
def triton_importable() -> bool:
    return importlib.util.find_spec("triton") is not None


_FAILED: Dict[str, str] = {}  # device -> why the kernels are not used there (warned once)


def available(device: torch.device) -> bool:
    """Whether the kernels run on tensors of this device: CUDA (or any device under the interpreter), triton and the
    kernels import, and they have not failed on this device before."""
    if str(device) in _FAILED or not (interpreting() or (device.type == "cuda" and torch.cuda.is_available())):
        return False
    if not triton_importable():
        return False
    try:
        _kernels()
    except Exception as error:  # triton installed but broken: an ImportError, or whatever its import raised
        disable(device, error)
        return False
    return True


def disable(device: torch.device, error: BaseException) -> None:
    """Stop using the kernels on `device` after `error`: one warning naming the cause, PyTorch's path from now on."""
    key = str(device)
    if key in _FAILED:
        return
    _FAILED[key] = failure_cause(error)
    warnings.warn(f"the fused Triton INT8/INT4 kernels failed on {key}: {_FAILED[key]}; using PyTorch's "
                  f"dequantize-then-matmul path on {key} from now on", RuntimeWarning, stacklevel=3)


def failure_cause(error: BaseException) -> str:
    """One line: what failed, and for a failed build of Triton's launcher what it needs."""
    lines = str(error).strip().splitlines()
    what = f"{type(error).__name__}: {lines[0] if lines else ''}"[:300]
    if isinstance(error, ImportError):
        return f"triton does not import ({what})"
    if isinstance(error, subprocess.CalledProcessError) or "C compiler" in what:
        python_h = os.path.join(sysconfig.get_paths()["include"], "Python.h")
        need = (f"Python.h, missing here ({python_h}; install the python3-dev package)" if not os.path.exists(python_h)
                else "a C compiler (gcc or clang, or $CC) and Python.h")
        return f"Triton could not build its launcher, which needs {need} ({what})"
    return what


def capturing(device: torch.device) -> bool:
    """Whether a CUDA graph is being captured on the current stream (a failure there must reach the capture)."""
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def supports(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, bits: int) -> bool:
    """Whether x [..., K] and this stored weight fit the kernels (fp16/bf16 activations, matching shapes)."""
    k = x.shape[-1]
    cols = k if bits == 8 else k // 2
    return (x.dtype in ACTIVATION_DTYPES and weight.dtype == torch.int8 and weight.dim() == 2
            and weight.shape[1] == cols and (bits == 8 or k % 2 == 0) and scale.shape == (weight.shape[0],)
            and x.device == weight.device == scale.device)


@functools.lru_cache(maxsize=None)
def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # the interpreter: any small number


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def split_k_for(programs: int, k: int, block_k: int, sm_count: int, per_sm: int = DECODE_PROGRAMS_PER_SM) -> int:
    """Splits of K so that about `per_sm` programs per SM run, each split at least one BLOCK_K long."""
    want = _cdiv(per_sm * sm_count, max(1, programs))
    return max(1, min(want, MAX_SPLIT_K, _cdiv(k, block_k)))


def choose_config(rows: int, n: int, k: int, bits: int, sm_count: int) -> Config:
    if rows <= GEMV_MAX_ROWS:
        block_m, block_n = _next_pow2(rows), 32
        block_k = max(64, min(512, 8192 // (block_m * block_n)))
        return Config("gemv", block_m, block_n, block_k,
                      split_k_for(_cdiv(n, block_n), k, block_k, sm_count), num_warps=4, num_stages=2)
    if rows <= DECODE_MAX_ROWS:
        block_n, block_k = 64, 128
        return Config("mm", 16, block_n, block_k, split_k_for(_cdiv(n, block_n), k, block_k, sm_count),
                      num_warps=4, num_stages=3)
    block_m = 64 if rows <= 64 else 128
    programs = _cdiv(rows, block_m) * _cdiv(n, 128)
    return Config("mm", block_m, 128, 64, split_k_for(programs, k, 64, sm_count, 2) if programs < sm_count else 1,
                  num_warps=8, num_stages=3)  # 4 warps spill registers on the INT8 64x128 tile (sm_90 build)


def weight_only_matmul(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, bits: int,
                       config: Optional[Config] = None) -> torch.Tensor:
    """x [..., K] (fp16/bf16) @ (q · scale)ᵀ -> [..., N] in x's dtype; fp32 accumulation, scale applied once."""
    x2 = x.reshape(-1, x.shape[-1]).contiguous()
    m, k = x2.shape
    n = weight.shape[0]
    weight = weight.contiguous()
    if config is None:
        config = choose_config(m, n, k, bits, _sm_count(x.device))
    if config.kernel == "gemv" and m > config.block_m:
        raise ValueError(f"the gemv kernel takes at most block_m={config.block_m} rows, got {m}")
    k_blocks = _cdiv(k, config.block_k)
    k_per_split = _cdiv(k_blocks, config.split_k) * config.block_k
    splits = _cdiv(k, k_per_split)
    if splits == 1:
        out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    else:
        out = torch.empty((splits, m, n), dtype=torch.float32, device=x.device)
    _launch(config, x2, weight, scale, out, m, n, k, k_per_split, splits, bits)
    y = out if splits == 1 else out.sum(0).to(x.dtype)
    return y.reshape(*x.shape[:-1], n)


def _launch(config: Config, x2, weight, scale, out, m, n, k, k_per_split, splits, bits) -> None:
    kernels = _kernels()
    common = dict(BITS=bits, BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k,
                  K_ITERS=k_per_split // config.block_k, num_warps=config.num_warps, num_stages=config.num_stages)
    args = (x2, weight, scale, out, m, n, k, x2.stride(0), weight.stride(0), n, m * n)
    if config.kernel == "gemv":
        kernels.gemv_kernel[(_cdiv(n, config.block_n), splits)](*args, **common)
    else:
        grid = (_cdiv(m, config.block_m) * _cdiv(n, config.block_n), splits)
        kernels.mm_kernel[grid](*args, GROUP_M=config.group_m, **common)


def compile_for_gpu(config: Config, bits: int, x_dtype: str = "fp16", out_dtype: Optional[str] = None,
                    k_iters: int = 8, arch: int = 90):
    """Compile one kernel ahead of time for a CUDA architecture (default sm_90, H100/H200) without a GPU: checks
    that the kernel builds with this triton (not under TRITON_INTERPRET=1, where there is nothing to compile).
    Returns triton's compiled kernel (asm["ptx"], asm["cubin"], metadata)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    kernels = _kernels()
    consts = {"BITS": bits, "BLOCK_M": config.block_m, "BLOCK_N": config.block_n, "BLOCK_K": config.block_k,
              "K_ITERS": k_iters}
    if config.kernel == "mm":
        consts["GROUP_M"] = config.group_m
    signature = {"x_ptr": f"*{x_dtype}", "w_ptr": "*i8", "s_ptr": "*fp16", "out_ptr": f"*{out_dtype or x_dtype}",
                 "M": "i32", "N": "i32", "K": "i32", "stride_xm": "i32", "stride_wn": "i32", "stride_om": "i32",
                 "out_split_stride": "i32", **{name: "constexpr" for name in consts}}
    fn = kernels.gemv_kernel if config.kernel == "gemv" else kernels.mm_kernel
    return triton.compile(ASTSource(fn=fn, signature=signature, constexprs=consts), target=GPUTarget("cuda", arch, 32),
                          options={"num_warps": config.num_warps, "num_stages": config.num_stages})
