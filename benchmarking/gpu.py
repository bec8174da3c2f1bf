"""GPU pieces of the benchmark: CUDA-event timing, timing of calls replayed from one CUDA graph, the HBM
read-bandwidth probe, and the timing of the static-cache decode step (generation/graph_decode.py) eagerly and as a
replayed CUDA graph. On CPU the same functions run with wall-clock timing (tools/gpu_check.py --dry-run checks them
there)."""
import time
from typing import Callable, Dict, Sequence

import torch

from benchmarking.timing import sync
from generation.graph_decode import DeviceSampler, OneTokenStep, StaticKVCache, StepRunner, slots_for
from model import mpu


def device_time(fn: Callable[[], object], device, repeats: int, inner: int = 1) -> float:
    """Best seconds per call of fn over `repeats` rounds of `inner` calls (CUDA events on a GPU)."""
    device = torch.device(device)
    best = float("inf")
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(inner):
                fn()
            end.record()
            end.synchronize()
            seconds = start.elapsed_time(end) / 1e3
        else:
            t0 = time.perf_counter()
            for _ in range(inner):
                fn()
            seconds = time.perf_counter() - t0
        best = min(best, seconds / inner)
    return best


def replayed_time(calls: Sequence[Callable[[], object]], device, repeats: int = 3) -> float:
    """Best seconds per call when `calls` run one after another: on CUDA captured once in a CUDA graph and replayed
    (no Python launch cost between the kernels, as in graph decoding), eagerly elsewhere. Each call runs once first
    (kernel compilation, first-use allocations)."""
    device = torch.device(device)
    for call in calls:
        call()
    if device.type != "cuda":
        return device_time(lambda: [call() for call in calls], device, repeats) / len(calls)
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        for call in calls:
            call()
    torch.cuda.current_stream(device).wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for call in calls:
            call()
    graph.replay()
    return device_time(graph.replay, device, repeats) / len(calls)


def hbm_read_bandwidth(device, nbytes: int = 4 << 30, repeats: int = 5) -> Dict[str, float]:
    """Read bandwidth (bytes/s) of a reduction over an fp16 buffer far larger than the GPU's caches."""
    x = torch.ones(nbytes // 2, dtype=torch.float16, device=device)
    return {"torch_sum": nbytes / device_time(lambda: x.sum(dtype=torch.float32), device, repeats, inner=4)}


def matmul_peak_events(device, dtype, shapes, repeats: int = 3) -> Dict[str, float]:
    """Best FLOP/s of torch.mm per (m, k, n) shape, timed with CUDA events."""
    out = {}
    for m, k, n in shapes:
        a = torch.randn(m, k, device=device).to(dtype)
        b = torch.randn(k, n, device=device).to(dtype)
        torch.mm(a, b)
        out[f"{m}x{k}x{n}"] = 2 * m * k * n / device_time(lambda: torch.mm(a, b), device, repeats, inner=5)
    return out


def _random_ids(batch: int, prompt: int, vocab: int, device) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, prompt), generator=torch.Generator().manual_seed(batch)).to(device)


@torch.inference_mode()
def time_static_decode(model, batch: int, prompt: int, steps: int, use_graph: bool) -> Dict[str, float]:
    """Greedy decoding through OneTokenStep (eager, or replayed from a CUDA graph): prefill `prompt` random tokens,
    then `steps` timed tokens, each followed by the host read of the chosen ids (as the decoding loop does)."""
    device = model.transformer.final_layernorm.weight.device
    length = prompt + steps + 1
    cache = StaticKVCache(model, batch, length)
    positions = torch.arange(length, device=device).expand(batch, length)
    mask = torch.zeros(1, 1, length, length, dtype=torch.bool, device=device)
    sampler = DeviceSampler(batch, model.config.vocab_size, device, top_k=1)
    step = OneTokenStep(model, cache, positions, mask, sampler)
    tokens = _random_ids(batch, prompt, model.config.vocab_size, device)
    logits = model.forward_with_cache(tokens, positions[:, :prompt], mask[:, :, :prompt, :prompt], cache,
                                      logits_index=torch.full((batch,), prompt - 1, device=device))
    step.tokens.copy_(sampler(logits[:, -1]).clamp_min(0)[:, None])
    runner = StepRunner(step, step.state(), device, use_graph)

    def one_step():
        runner(slots_for(cache.length, cache.max_length))
        cache.length += 1
    one_step()  # capture (graph) or first call
    step.ids.cpu()
    sync(device)
    t0 = time.perf_counter()
    ids = []
    for _ in range(steps - 1):
        one_step()
        ids.append(step.ids.cpu())
    seconds = (time.perf_counter() - t0) / max(1, steps - 1)
    return {"ms_per_token": seconds * 1e3, "tokens_per_s": batch / seconds, "steps": steps - 1,
            "ids": torch.stack(ids, dim=1) if ids else None}


def gpu_config(device) -> dict:
    """The GPU's name, memory, SMs, CUDA and triton versions, whether the fused kernels run (empty on CPU)."""
    if device.type != "cuda":
        return {}
    from kernels import triton_matmul
    props = torch.cuda.get_device_properties(device)
    triton_version = None
    if triton_matmul.triton_importable():
        import triton
        triton_version = triton.__version__
    return {"machine.gpu": props.name, "machine.gpu_memory_bytes": props.total_memory,
            "machine.gpu_sms": props.multi_processor_count, "machine.cuda": torch.version.cuda,
            "machine.gpu_l2_bytes": getattr(props, "L2_cache_size", None),
            "machine.triton": triton_version, "machine.triton_kernels": triton_matmul.available(device)}


def run_graph_decode(model, name: str, prompt: int, steps: int, decode: dict, results: dict) -> None:
    """CUDA: batch-1 greedy decoding through the static-cache step, eager and replayed from a CUDA graph; the
    speed-up of the graph over the decoding loop's step (decode.<format>.step_ms_median)."""
    for use_graph, key in ((False, "static_eager"), (True, "graph")):
        r = time_static_decode(model, 1, prompt, steps, use_graph)
        results[f"decode.{name}.{key}.ms_per_token"] = r["ms_per_token"]
        results[f"decode.{name}.{key}.tokens_per_s"] = r["tokens_per_s"]
    graph_ms = results[f"decode.{name}.graph.ms_per_token"]
    results[f"decode.{name}.graph_speedup"] = decode[(name, 1)]["step_ms_median"] / graph_ms
    results[f"decode.{name}.graph_speedup_vs_static_eager"] = results[f"decode.{name}.static_eager.ms_per_token"] / graph_ms
    mpu.print_rank_0(f"Decode {name} batch 1, CUDA graph: {graph_ms:.2f} ms/token "
                     f"({results[f'decode.{name}.graph_speedup']:.2f}x the decoding loop)")
