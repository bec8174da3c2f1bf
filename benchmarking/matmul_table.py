"""Time the weight-only matmul paths at decode (M=1) and prefill (M=512) shapes and print a table (milliseconds).

    python benchmarking/matmul_table.py [--rows 1 512] [--shapes 1536x1536 4608x1536 ...] [--seconds 0.3]
                                        [--no-bf16-gemm]

Columns (all bf16 activations, N x K weight):
  dense      F.linear with a bf16 weight (no quantization; PyTorch's own path)
  gemv16     this project's bf16 GEMV kernel (kernels/cpu.py; at most 16 rows)
  deq8+mm    INT8 -> bf16 at every call, GEMM, output times the row scales
  int8 lib   torch.ops.aten._weight_int8pack_mm on the stored int8 matrix
  gemv8      this project's INT8 GEMV kernel on the stored int8 matrix
  deq4+mm    unpack INT4 (CPU kernel layout) -> bf16 at every call, GEMM, output times the row scales
  int4 lib   torch.ops.aten._weight_int4pack_mm_for_cpu on the repacked weight
  gemv4      this project's INT4 GEMV kernel on the stored (original) packed layout
  fp32blk16  the bf16 weight converted a block of rows at a time, fp32 GEMM (kernels.cpu.linear_in_fp32_blocks:
             the path of CPUs without a bf16 GEMM)
  fp32blk8   the same from the INT8 weight (exact q · scale in fp32)
--no-bf16-gemm times everything with oneDNN disabled: PyTorch's bf16 GEMM is then the scalar loop it is on AVX2-only
CPUs (`dense`, `deq*+mm`), which the fp32blk paths replace there.
The quantized layers run gemv8/gemv4 up to 16 rows where available, else the library kernel up to
CPU_KERNEL_MAX_ROWS rows, and dequantize + GEMM above. Cells a path cannot run show "-".
"""
import argparse
import functools
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from kernels import cpu  # noqa: E402
from quantization import matmul  # noqa: E402
from quantization.functional import quantize_weight  # noqa: E402


def time_ms(fn, seconds: float) -> float:
    """Fastest call over repeats filling about `seconds` (the least disturbed by other load on a shared machine)."""
    fn()
    times, start = [], time.perf_counter()
    while time.perf_counter() - start < seconds or len(times) < 3:
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times) * 1e3


def measure(n: int, k: int, m: int, seconds: float) -> dict:
    gen = torch.Generator().manual_seed(0)
    w = (torch.randn(n, k, generator=gen) * k ** -0.5).half()
    x = torch.randn(m, k, generator=gen).bfloat16()
    q8, s8 = quantize_weight(w, 8)
    q4, s4 = quantize_weight(w, 4)
    lib4 = matmul.cpu_int4_block() > 0  # PyTorch packs its int4 layout in a way this project knows
    p4, layout4 = (matmul.to_cpu_int4(q4), "cpu_int4") if lib4 else (q4, "original")
    dense = matmul.dequantized_t(q8, s8, 8, "original", torch.bfloat16).t().contiguous()
    sz = matmul.int4_scales_and_zeros(s4, k, torch.bfloat16)
    s8b, s4b = s8.bfloat16(), s4.bfloat16()
    g = matmul.int4_group_size(k)
    gemv = cpu
    fast = gemv.applies(x)
    paths = {
        "dense": lambda: F.linear(x, dense),
        "gemv16": (lambda: gemv.gemv_bf16(x, dense)) if fast else None,
        "deq8+mm": lambda: torch.mm(x, matmul.dequantized_t(q8, s8, 8, "original", torch.bfloat16, False)) * s8b,
        "int8 lib": lambda: torch.ops.aten._weight_int8pack_mm(x, q8, s8b),
        "gemv8": (lambda: gemv.gemv_int8(x, q8, s8)) if fast else None,
        "deq4+mm": lambda: torch.mm(x, matmul.dequantized_t(p4, s4, 4, layout4, torch.bfloat16, False)) * s4b,
        "int4 lib": (lambda: torch.ops.aten._weight_int4pack_mm_for_cpu(x, p4, g, sz)) if lib4 else None,
        "gemv4": (lambda: gemv.gemv_int4(x, q4, s4)) if fast else None,
        "fp32blk16": lambda: cpu.linear_in_fp32_blocks(x, n, lambda i, j, out: out.copy_(dense[i:j])),
        "fp32blk8": lambda: cpu.linear_in_fp32_blocks(x, n, functools.partial(matmul.dequantized_rows, q8, s8, 8,
                                                                              "original")),
    }
    return {name: (time_ms(fn, seconds) if fn else None) for name, fn in paths.items()}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, nargs="+", default=[1, 512])
    p.add_argument("--shapes", nargs="+", default=["1536x1536", "4608x1536", "8192x1536", "1536x4096", "6144x6144"],
                   help="NxK weight shapes (output x input features)")
    p.add_argument("--seconds", type=float, default=0.3, help="time budget per cell")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--no-bf16-gemm", action="store_true", help="oneDNN off: PyTorch's path on AVX2-only CPUs")
    a = p.parse_args()
    torch.backends.mkldnn.enabled = not a.no_bf16_gemm
    if a.threads:
        torch.set_num_threads(a.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, times in ms (best of repeats)"
          + (", oneDNN off (no bf16 GEMM)" if a.no_bf16_gemm else ""))
    header = None
    for m in a.rows:
        for shape in a.shapes:
            n, k = map(int, shape.split("x"))
            row = measure(n, k, m, a.seconds)
            if header is None:
                header = f"{'M':>5} {'N x K':>11} " + " ".join(f"{c:>9}" for c in row)
                print(header)
            print(f"{m:>5} {shape:>11} " + " ".join("        -" if v is None else f"{v:9.3f}" for v in row.values()),
                  flush=True)


if __name__ == "__main__":
    main()
