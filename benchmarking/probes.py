"""This machine's limits, measured in the benchmark's own process: read bandwidth and matrix-multiply peak.

Every probe is capped in time: a path that turns out pathologically slow on this CPU (e.g. a bf16 matmul without
hardware support falling back to a scalar loop) is measured once at a small size and reported as unavailable
(None, "n/a" in the report) instead of running for minutes.
"""
from typing import Dict, Optional, Sequence, Tuple

import torch

from benchmarking.timing import best_time, best_time_within
from kernels import cpu

SLOW_MATMUL_FLOP_PER_S = 5e9  # below this at a small size, a dtype's matmul is a fallback loop: not a peak
PROBE_CALL_BUDGET_S = 2.0  # no single probe call predicted to take longer than this is run


def _read_fn(x: torch.Tensor):
    if x.device.type == "cpu" and cpu.available():
        return lambda: cpu.read_bandwidth_probe(x)  # its own threads: no OpenMP pool left spinning
    return lambda: x.sum()


def read_bandwidth(device, nbytes: int, repeats: int) -> Dict[str, float]:
    """Best read bandwidth (bytes/s): torch.sum over an fp32 buffer, and on CPU also the kernels' streaming probe
    (on a GPU: benchmarking/gpu.py's HBM probe, timed with CUDA events)."""
    if device.type == "cuda":
        from benchmarking.gpu import hbm_read_bandwidth
        return hbm_read_bandwidth(device, nbytes, repeats)
    x = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
    out = {"torch_sum": nbytes / best_time(lambda: x.sum(), device, repeats)}
    if device.type == "cpu" and cpu.available():
        out["stream_probe"] = nbytes / best_time(_read_fn(x), device, repeats)
    return out


def matmul_peak(device, dtype, shapes: Sequence[Tuple[int, int, int]], repeats: int,
                budget_s: float = PROBE_CALL_BUDGET_S) -> Dict[str, Optional[float]]:
    """Best FLOP/s of torch.mm per (m, k, n) shape; None for shapes skipped as too slow on this machine."""
    if device.type == "cuda":
        from benchmarking.gpu import matmul_peak_events
        return matmul_peak_events(device, dtype, shapes, repeats)
    a = torch.randn(256, 256, device=device).to(dtype)
    torch.mm(a, a)  # the first call of a dtype sets up its kernels (JIT)
    # the best of many short calls: on a loaded machine a few calls can all be descheduled (the threads of one
    # product wait for each other), which made a fast dtype look like a fallback loop; a slow one stops early
    small = 2 * 256 ** 3 / best_time_within(lambda: torch.mm(a, a), device, max_calls=50, max_s=0.5)
    out = {}
    for m, k, n in shapes:
        flops = 2 * m * k * n
        if small < SLOW_MATMUL_FLOP_PER_S or flops / max([small] + [v for v in out.values() if v]) > budget_s:
            out[f"{m}x{k}x{n}"] = None
            continue
        a = torch.randn(m, k, device=device).to(dtype)
        b = torch.randn(k, n, device=device).to(dtype)
        out[f"{m}x{k}x{n}"] = flops / best_time(lambda: torch.mm(a, b), device, repeats)
    return out


def best(values: Dict[str, Optional[float]]) -> Optional[float]:
    measured = [v for v in values.values() if v is not None]
    return max(measured) if measured else None


class AdjacentProbe:
    """Read-bandwidth probes taken right before and after each stretch of decoding (the machine's available
    bandwidth moves with other tenants' load; a ratio needs both figures from the same minutes)."""

    def __init__(self, device, nbytes: int):
        self.device = device
        self.x = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
        self.all = []

    def __call__(self) -> float:
        if self.device.type == "cuda":
            from benchmarking.gpu import device_time
            bw = self.x.numel() * 4 / device_time(lambda: self.x.sum(), self.device, 2, inner=4)
        else:
            bw = self.x.numel() * 4 / best_time(_read_fn(self.x), self.device, 2)
        self.all.append(bw)
        return bw
