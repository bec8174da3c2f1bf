"""Offload figures (--bminf): the streaming bandwidth, measured in the benchmark's process, and per weight format the
bytes streamed per token and the fraction of that bandwidth decoding reaches.

    offload.<format>[.batch<b>].stream_bandwidth_bytes_per_s   the streaming bandwidth, the better of two probes
                          taken right before and after that decode run (a disk's bandwidth moves by ±20 % from one
                          second to the next here): CPU, sequential reads of the streamed checkpoint file, its pages
                          dropped from the cache before and after each read (what the streamer does); GPU, pinned
                          host → device copies, timed with CUDA events
    offload.stream_bandwidth_bytes_per_s            the best of all those probes
    offload.<format>.streamed_bytes_per_step        the streamed layers' weights (read once per forward)
    offload.<format>[.batch<b>].streamed_bytes_per_token = that ÷ batch
    offload.<format>[.batch<b>].stream_fraction     = streamed bytes per step × steps/s ÷ that run's bandwidth
    offload.<format>[.batch<b>].streaming_limit_tokens_per_s = batch × bandwidth ÷ streamed bytes per step
"""
import os
import time
from typing import Dict

import torch

from model import mpu
from model.checkpoint import list_shards
from model.offload import READ_CHUNK, read_into

STREAM_PROBE_BYTES = 1 << 30


def file_read_bandwidth(path: str, nbytes: int = STREAM_PROBE_BYTES, repeats: int = 2) -> float:
    """Best bytes/s of reading the first `nbytes` of `path` sequentially in READ_CHUNK preads, from the disk: the
    file's cached pages are dropped before each pass and each chunk's after it is read."""
    buf = torch.empty(READ_CHUNK, dtype=torch.uint8)
    fd = os.open(path, os.O_RDONLY)
    try:
        size = min(nbytes, os.fstat(fd).st_size) // READ_CHUNK * READ_CHUNK
        best = 0.0
        for _ in range(repeats):
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            start = time.perf_counter()
            for offset in range(0, size, READ_CHUNK):
                read_into(fd, buf, offset)
                os.posix_fadvise(fd, offset, READ_CHUNK, os.POSIX_FADV_DONTNEED)
            best = max(best, size / (time.perf_counter() - start))
        return best
    finally:
        os.close(fd)


def pinned_copy_bandwidth(device, nbytes: int = STREAM_PROBE_BYTES // 4, repeats: int = 3) -> float:
    """Best bytes/s of a pinned host → device copy (CUDA events)."""
    from benchmarking.gpu import device_time
    host = torch.empty(nbytes, dtype=torch.uint8).pin_memory()
    dev = torch.empty(nbytes, dtype=torch.uint8, device=device)
    return nbytes / device_time(lambda: dev.copy_(host, non_blocking=True), device, repeats)


def stream_bandwidth(args) -> float:
    """The bandwidth streamed layers come at: the checkpoint file's (CPU) or the host link's (GPU)."""
    if args.device.type == "cuda":
        return pinned_copy_bandwidth(args.device)
    return file_read_bandwidth(list_shards(args.load)[mpu.get_model_parallel_rank()])


def record(model, name: str, decode: Dict[tuple, dict], results: dict) -> None:
    """The offload figures of one weight format from its decode runs (each holding `stream_bandwidth`, the better of
    the probes right before and after it), and the best probe so far as `offload.stream_bandwidth_bytes_per_s`."""
    plan = model.offload.plan
    per_step = plan.streamed_bytes
    results[f"offload.{name}.streamed_layers"] = len(plan.streamed)
    results[f"offload.{name}.resident_layers"] = plan.num_layers - len(plan.streamed)
    results[f"offload.{name}.streamed_bytes_per_step"] = per_step
    results[f"offload.{name}.weights_held_bytes"] = plan.resident_bytes
    for (fmt, b), r in decode.items():
        if fmt != name:
            continue
        prefix = f"offload.{name}" if b == 1 else f"offload.{name}.batch{b}"
        bandwidth, steps_per_s = r["stream_bandwidth"], r["tokens_per_s"] / b
        results[f"{prefix}.tokens_per_s"] = r["tokens_per_s"]
        results[f"{prefix}.streamed_bytes_per_token"] = per_step / b
        results[f"{prefix}.stream_bandwidth_bytes_per_s"] = bandwidth
        results[f"{prefix}.stream_fraction"] = per_step * steps_per_s / bandwidth
        results[f"{prefix}.streaming_limit_tokens_per_s"] = b * bandwidth / per_step
        results["offload.stream_bandwidth_bytes_per_s"] = max(bandwidth,
                                                              results.get("offload.stream_bandwidth_bytes_per_s", 0.0))


def summary_lines(results: dict, formats, batches) -> list:
    bw = results.get("offload.stream_bandwidth_bytes_per_s")
    if bw is None:
        return []
    lines = [f"Offload: streaming bandwidth up to {bw / 1e9:.2f} GB/s (probed before and after every decode run; "
             f"each run is measured against its own two probes)"]
    for name in formats:
        if f"offload.{name}.streamed_layers" not in results:
            continue
        parts = []
        for b in batches:
            prefix = f"offload.{name}" if b == 1 else f"offload.{name}.batch{b}"
            if f"{prefix}.tokens_per_s" in results:
                parts.append(f"batch {b} {results[f'{prefix}.tokens_per_s']:.2f} tokens/s = "
                             f"{results[f'{prefix}.stream_fraction']:.2f} of the streaming limit "
                             f"({results[f'{prefix}.streaming_limit_tokens_per_s']:.2f})")
        lines.append(f"Offload {name}: {results[f'offload.{name}.streamed_layers']} layers streamed "
                     f"({results[f'offload.{name}.streamed_bytes_per_step'] / 1e9:.2f} GB per step); "
                     + "; ".join(parts))
    return lines
