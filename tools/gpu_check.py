"""One GPU check (scripts/gpu_check.sh): correctness of the fused kernels and of graph decoding, the benchmark
config, an 8-layer GLM-130B-shaped slice per weight format and the full-size INT4 GLM-130B, in <= 8 minutes.

    python tools/gpu_check.py --out docs/results/gpu-h200.json --log docs/results/gpu-h200.log
    python tools/gpu_check.py --dry-run --out /tmp/dry.json   # CPU, tiny shapes, TRITON_INTERPRET=1 (tests)

Every section runs in its own process with its own time limit (a CUDA error poisons a process's context; a hung
kernel cannot be interrupted in-process), so one section's failure or timeout is recorded in the JSON
(sections.<name>.status / .error) and the others still run. The JSON is flat with dotted keys, as benchmark.py
--json; it is rewritten after every section, so a run cut short still leaves what was measured.
"""
import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# name -> seconds allowed on the GPU (sum 455 s: the whole check stays under 8 minutes with process start-ups)
SECTIONS = {"env": 15, "kernels": 90, "graph": 45, "bench": 100, "slice": 125, "full": 80}
DRY_RUN_LIMIT_S = 120

GLM_130B = ["--num-layers", "70", "--hidden-size", "12288", "--inner-hidden-size", "32768", "--vocab-size", "150528",
            "--num-attention-heads", "96", "--max-sequence-length", "2048"]
SLICE_LAYERS = 8
BENCH = ["--num-layers", "32", "--hidden-size", "1536", "--inner-hidden-size", "4096", "--vocab-size", "150528",
         "--num-attention-heads", "12", "--max-sequence-length", "2048"]
TINY = ["--num-layers", "2", "--hidden-size", "128", "--inner-hidden-size", "256", "--vocab-size", "150528",
        "--num-attention-heads", "2", "--max-sequence-length", "256"]
FORMATS = {"fp16": None, "int8": 8, "int4": 4}


def stub_absent_modules() -> list:
    """The check never tokenizes text nor reads YAML: where sentencepiece / pyyaml are not installed (nothing can
    be fetched on the GPU machine), stand-ins that fail on use keep model/ and evaluation/ importable."""
    import importlib.util
    import types
    stubbed = []
    for name in ("sentencepiece", "yaml"):
        if name in sys.modules or importlib.util.find_spec(name) is not None:
            continue
        module = types.ModuleType(name)

        def unavailable(*args, _name=name, **kwargs):
            raise ImportError(f"{_name} is not installed on this machine")
        if name == "sentencepiece":
            module.SentencePieceProcessor = unavailable
        else:
            module.YAMLError = type("YAMLError", (Exception,), {})
            module.safe_load = unavailable
        sys.modules[name] = module
        stubbed.append(name)
    return stubbed


def _with_layers(flags, layers):
    out = list(flags)
    out[out.index("--num-layers") + 1] = str(layers)
    return out


class Context:
    """What a section needs to know: the device, the 16-bit dtype, and the sizes (real, or tiny for --dry-run)."""

    def __init__(self, dry_run: bool, part: Path):
        import torch
        self.dry_run, self.part = dry_run, part
        self.device = torch.device("cpu" if dry_run else "cuda")
        self.dtype16 = torch.bfloat16 if dry_run else torch.float16  # CPU fp16 matmuls are a slow fallback
        self.dtype_flag = "--bf16" if dry_run else "--fp16"

    def checkpoint(self, results: dict) -> None:
        """Write what a section has so far: a section stopped by its time limit still reports it."""
        tmp = self.part.with_suffix(".tmp")
        tmp.write_text(json.dumps(results, default=str))
        os.replace(tmp, self.part)

    def build(self, model_flags, bits=None):
        import initialize
        flags = [*model_flags, self.dtype_flag, "--device", str(self.device), "--random-init"]
        if bits:
            flags += ["--quantization-bit-width", str(bits)]
        return initialize.build_model(initialize.parse_args(None, flags))


# ---------------------------------------------------------------------------------------------------------------
# Sections (each returns a flat dict of results)

def section_env(ctx) -> dict:
    import torch
    from benchmarking.gpu import gpu_config
    from kernels import triton_matmul
    out = {"machine.torch": torch.__version__, "machine.cuda": torch.version.cuda, "run.dry_run": ctx.dry_run,
           "machine.triton": None, "machine.triton_kernels": triton_matmul.available(ctx.device),
           "machine.deepspeed_importable": _importable("deepspeed"),
           "machine.stubbed_modules": ",".join(stub_absent_modules()) or None}
    if triton_matmul.triton_importable():
        import triton
        out["machine.triton"] = triton.__version__
    out.update(gpu_config(ctx.device))
    return out


def _importable(name: str) -> bool:
    import importlib.util
    return importlib.util.find_spec(name) is not None


def _kernel_shapes(dry_run, every: bool):
    """(rows, N, K) checked for correctness: tails, odd K (INT8 only), decode and prefill rows; all of them for
    fp16, a few for bf16 (each dtype compiles its own kernels: compile time counts against the section's limit)."""
    if dry_run:
        return [(1, 40, 74), (3, 33, 130), (9, 50, 98), (20, 70, 138)]
    shapes = [(1, 12288, 12288), (3, 1000, 998), (512, 12288, 4096), (8, 36864, 12288), (16, 12288, 32768),
              (64, 4096, 4096), (2048, 4096, 12288), (5, 777, 1534)]
    return shapes if every else shapes[:3]


def _timed_shapes(dry_run):
    """GLM-130B's four linears (TP 1, N x K) at decode rows 1 and 8 (16 for one), and two at prefill rows 2048."""
    if dry_run:
        return [(1, 48, 64), (8, 48, 64), (40, 48, 64)]
    linears = [(36864, 12288), (12288, 12288), (65536, 12288), (12288, 32768)]
    return ([(rows, n, k) for rows in (1, 8) for n, k in linears] + [(16, 12288, 12288)]
            + [(2048, 36864, 12288), (2048, 12288, 32768)])


def section_kernels(ctx) -> dict:
    import torch
    from benchmarking.gpu import hbm_read_bandwidth, matmul_peak_events
    from kernels import triton_matmul as tm
    from quantization.functional import dequantize
    out, ok = {}, True
    for bits in (8, 4):
        for dtype in (torch.float16, torch.bfloat16):
            for rows, n, k in _kernel_shapes(ctx.dry_run, dtype == torch.float16):
                if bits == 8 and not ctx.dry_run and (rows, n, k) == (5, 777, 1534):
                    k = 1535  # odd K for INT8
                key = f"kernels.check.int{bits}.{_dt(dtype)}.{rows}x{n}x{k}"
                try:
                    x, q, scale = _random_case(rows, n, k, bits, dtype, ctx.device)
                    ref = x.double() @ dequantize(q, scale, bits, torch.float64).T
                    y = tm.weight_only_matmul(x, q, scale, bits)
                    err = ((y.double() - ref).abs() / (ref.abs() + 1e-3 * ref.abs().max())).max().item()
                except Exception as e:
                    out[f"{key}.error"], ok = repr(e)[:300], False
                    continue
                out[f"{key}.max_rel_err"] = err
                ok &= err <= (2 ** -10 if dtype == torch.float16 else 2 ** -7)
    out["kernels.ok"] = bool(ok)
    ctx.checkpoint(out)
    bandwidth = hbm_read_bandwidth(ctx.device, (64 << 20) if ctx.dry_run else (4 << 30), 3)["torch_sum"]
    peak = max(matmul_peak_events(ctx.device, ctx.dtype16, [(256, 256, 256)] if ctx.dry_run else [(8192, 8192, 8192)],
                                  2).values())
    out["kernels.machine.read_bandwidth_bytes_per_s"], out["kernels.machine.matmul_peak_flop_per_s"] = bandwidth, peak
    for bits in (8, 4):
        for rows, n, k in _timed_shapes(ctx.dry_run):
            key = f"kernels.time.int{bits}.rows{rows}.{n}x{k}"
            try:
                out.update(_time_kernels(ctx, key, rows, n, k, bits, bandwidth, peak))
            except Exception as e:  # one shape's failure (e.g. a config that does not build) is recorded
                out[f"{key}.error"] = repr(e)[:300]
            ctx.checkpoint(out)
    return out


def _time_kernels(ctx, key, rows, n, k, bits, bandwidth, peak) -> dict:
    """One shape: the fused kernel (its default config and, for decode rows, the other decode kernel), the
    dequantize-then-GEMM path, and the dense 16-bit GEMM."""
    import torch
    from benchmarking.gpu import device_time
    from kernels import triton_matmul as tm
    from quantization import matmul
    from quantization.functional import dequantize
    reps = 1 if ctx.dry_run else 3
    x, q, scale = _random_case(rows, n, k, bits, ctx.dtype16, ctx.device)
    dense = dequantize(q, scale, bits, ctx.dtype16)
    fused = device_time(lambda: tm.weight_only_matmul(x, q, scale, bits), ctx.device, reps, inner=3)
    dequant = device_time(lambda: torch.mm(x, matmul.dequantized_t(q, scale, bits, matmul.ORIGINAL, x.dtype)),
                          ctx.device, reps, inner=3)
    fp16 = device_time(lambda: torch.mm(x, dense.t()), ctx.device, reps, inner=3)
    out = {f"{key}.fused_us": fused * 1e6, f"{key}.dequantize_mm_us": dequant * 1e6, f"{key}.fp16_mm_us": fp16 * 1e6,
           f"{key}.config": repr(_config_for(tm, rows, n, k, bits, x))}
    if bits == 8:  # PyTorch's own W8A16 kernel reads this very layout (int8 [N, K], a scale per row), where it exists
        try:
            int8pack = torch.ops.aten._weight_int8pack_mm
            out[f"{key}.torch_int8pack_us"] = device_time(lambda: int8pack(x, q, scale.to(x.dtype)), ctx.device,
                                                          reps, inner=3) * 1e6
        except (RuntimeError, NotImplementedError, AttributeError) as e:
            out[f"{key}.torch_int8pack"] = f"unavailable: {repr(e)[:120]}"
    if rows > tm.DECODE_MAX_ROWS:
        out[f"{key}.mfu"] = 2 * rows * n * k / fused / peak
        out[f"{key}.fp16_mfu"] = 2 * rows * n * k / fp16 / peak
        return out
    out[f"{key}.roofline_fraction"] = q.numel() / fused / bandwidth
    out[f"{key}.fp16_roofline_fraction"] = 2 * n * k / fp16 / bandwidth
    alt = _alternative_config(tm, rows, n, k, bits, x)
    out[f"{key}.alt_config"] = repr(alt)
    y, y_alt = tm.weight_only_matmul(x, q, scale, bits), tm.weight_only_matmul(x, q, scale, bits, alt)
    out[f"{key}.alt_vs_fused_max_rel"] = ((y_alt.float() - y.float()).abs().max() / y.float().abs().max()).item()
    out[f"{key}.alt_us"] = device_time(lambda: tm.weight_only_matmul(x, q, scale, bits, alt), ctx.device, reps,
                                       inner=3) * 1e6
    return out


def _dt(dtype) -> str:
    return str(dtype).replace("torch.", "")


def _random_case(rows, n, k, bits, dtype, device):
    import torch
    gen = torch.Generator(device=device).manual_seed(rows * 7 + n)
    q = torch.randint(-128, 128, (n, k if bits == 8 else k // 2), dtype=torch.int8, device=device, generator=gen)
    scale = (torch.rand(n, device=device, generator=gen) * 0.01 + 1e-3).half()
    x = torch.randn(rows, k, device=device, generator=gen).to(dtype)
    return x, q, scale


def _config_for(tm, rows, n, k, bits, x):
    return tm.choose_config(rows, n, k, bits, tm._sm_count(x.device))


def _alternative_config(tm, rows, n, k, bits, x):
    """The other decode kernel for the same rows (gemv <-> 16-row tensor-core tiles): measures the switch point."""
    sms = tm._sm_count(x.device)
    if rows <= tm.GEMV_MAX_ROWS:
        return tm.Config("mm", 16, 64, 128, tm.split_k_for(-(-n // 64), k, 128, sms), num_stages=3)
    block_m = 1 << max(0, (rows - 1).bit_length())
    block_k = max(32, 4096 // (block_m * 32))
    return tm.Config("gemv", block_m, 32, block_k, tm.split_k_for(-(-n // 32), k, block_k, sms))


def section_graph(ctx) -> dict:
    """Greedy ids: the CUDA-graph static decoder vs the existing eager decoding loop (and vs the static step run
    eagerly), per weight format, on a small random model on the device."""
    import torch
    from generation import BaseStrategy, batch_filling_sequence, generation_layout
    from generation.graph_decode import static_filling_sequence
    flags = TINY if ctx.dry_run else _with_layers(BENCH, 4)
    out, ok = {}, True
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(20000, 60000, (n,), generator=gen).tolist() + [150001, 150004] for n in (5, 11, 8)]
    seqs, lengths, cpu_layout = generation_layout(prompts, [len(p) - 2 for p in prompts], [True] * 3, 12)
    seqs = seqs.to(ctx.device)

    def layout(s):  # the layout built on the CPU, handed over on the device
        return tuple(t.to(ctx.device) for t in cpu_layout(s.cpu()))
    for name, bits in FORMATS.items():
        model = ctx.build(flags, bits)
        strategy = lambda: BaseStrategy(top_k=1, end_tokens=[150005])
        loop, _ = batch_filling_sequence(model, seqs, lengths, strategy(), layout)
        graph, _ = static_filling_sequence(model, seqs, lengths, strategy(), layout, use_graph=True)
        eager, _ = static_filling_sequence(model, seqs, lengths, strategy(), layout, use_graph=False)
        out[f"graph.{name}.ids_equal_loop"] = graph.tolist() == loop.tolist()
        out[f"graph.{name}.ids_equal_static_eager"] = graph.tolist() == eager.tolist()
        ok &= out[f"graph.{name}.ids_equal_static_eager"]
        del model
        ctx.checkpoint(out)
    out["graph.ok"] = bool(ok)  # vs the loop, a near-tie can flip in fp16 (different summation): recorded only
    return out


def section_bench(ctx, part: Path) -> dict:
    """benchmark.py itself on the benchmark config (random weights on the device); its keys under bench.*."""
    flags = TINY if ctx.dry_run else BENCH
    json_path = part.with_suffix(".bench.json")
    cmd = [sys.executable, str(Path(__file__).resolve()), "--benchmark", *flags, "--random-init",
           "--device", str(ctx.device), "--json", str(json_path)]
    if not ctx.dry_run:
        cmd += ["--new-tokens", "64"]  # half the default steps: room in the section's time limit
    else:
        cmd += ["--quick", "--encode-lengths", "16", "--decode-batch-sizes", "1", "--prompt-length", "4",
                "--new-tokens", "4", "--eval-length", "32"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    print(proc.stdout[-20000:], proc.stderr[-20000:], sep="\n")
    if proc.returncode != 0:
        raise RuntimeError(f"benchmark.py exited {proc.returncode}: {_last_line(proc.stderr)}")
    results = json.loads(json_path.read_text())
    out = {f"bench.{k}": v for k, v in results.items()}
    out["bench.graph_speedup"] = results.get("decode.16bit.graph_speedup")
    return out


def _decode_figures(model, ctx, prefix, bandwidth, batches, steps) -> dict:
    from benchmarking.arithmetic import weight_bytes
    from benchmarking.gpu import time_static_decode
    nbytes = weight_bytes(model)
    out = {f"{prefix}.weight_bytes": nbytes}
    prompt = 8 if ctx.dry_run else 128
    for b in batches:
        r = time_static_decode(model, b, prompt, steps, use_graph=True)
        key = prefix if b == 1 else f"{prefix}.batch{b}"
        out[f"{key}.ms_per_token"], out[f"{key}.tokens_per_s"] = r["ms_per_token"], r["tokens_per_s"]
        if b == 1:
            out[f"{prefix}.roofline_fraction"] = nbytes / (r["ms_per_token"] / 1e3) / bandwidth
    return out


def section_slice(ctx) -> dict:
    """8 layers of GLM-130B's shape + its embedding, per format: batch 1/8 graph decode against the measured HBM
    roofline, eager static step (graph effect at scale), prefill 512/2048 MFU against the measured matmul peak."""
    import torch
    from benchmarking.gpu import hbm_read_bandwidth, matmul_peak_events
    flags = TINY if ctx.dry_run else _with_layers(GLM_130B, SLICE_LAYERS)
    bandwidth = hbm_read_bandwidth(ctx.device, (64 << 20) if ctx.dry_run else (4 << 30), 3)["torch_sum"]
    peak = max(matmul_peak_events(ctx.device, ctx.dtype16,
                                  [(256, 256, 256)] if ctx.dry_run else [(8192, 8192, 8192), (4096, 4096, 4096)],
                                  2).values())
    out = {"slice.layers": SLICE_LAYERS, "slice.machine.read_bandwidth_bytes_per_s": bandwidth,
           "slice.machine.matmul_peak_flop_per_s": peak}
    steps = 4 if ctx.dry_run else 48
    lengths = [16] if ctx.dry_run else [512, 2048]
    for name, bits in FORMATS.items():
        try:
            out.update(_slice_format(ctx, flags, name, bits, bandwidth, peak, steps, lengths))
        except Exception as e:  # e.g. out of memory in one format: the others still run
            out[f"slice.{name}.error"] = repr(e)[:300]
        if ctx.device.type == "cuda":
            torch.cuda.empty_cache()
        ctx.checkpoint(out)
    for name in ("int8", "int4"):
        if f"slice.{name}.ms_per_token" in out and "slice.fp16.ms_per_token" in out:
            out[f"slice.{name}.speedup_vs_fp16"] = out["slice.fp16.ms_per_token"] / out[f"slice.{name}.ms_per_token"]
    for n in lengths:
        out[f"prefill.{n}.mfu"] = out.get(f"slice.fp16.prefill.{n}.mfu")
    return out


def _slice_format(ctx, flags, name, bits, bandwidth, peak, steps, lengths) -> dict:
    from benchmarking.arithmetic import forward_flops
    from benchmarking.gpu import time_static_decode
    model = ctx.build(flags, bits)
    out = _decode_figures(model, ctx, f"slice.{name}", bandwidth, (1, 8), steps)
    eager = time_static_decode(model, 1, 8 if ctx.dry_run else 128, steps // 2, use_graph=False)
    out[f"slice.{name}.eager_ms_per_token"] = eager["ms_per_token"]
    for n in lengths:
        t = _prefill_seconds(model, n, ctx.device)
        out[f"slice.{name}.prefill.{n}.ms"] = t * 1e3
        out[f"slice.{name}.prefill.{n}.mfu"] = forward_flops(model.config, n, n) / t / peak
    return out


def _prefill_seconds(model, n: int, device) -> float:
    """One forward of n tokens (batch 1, logits of every row: the original's encode), after a warm-up."""
    import torch
    from benchmarking.gpu import device_time
    tokens = torch.ones(1, n, dtype=torch.long, device=device)
    positions = torch.arange(n, device=device)[None]
    mask = torch.zeros(1, 1, n, n, dtype=torch.bool, device=device)
    model.logits(tokens, positions, mask)  # kernel compilation, first-use allocations
    return device_time(lambda: model.logits(tokens, positions, mask), device, 2)


def section_full(ctx) -> dict:
    """The full-size GLM-130B in INT4, random weights created on the GPU (~67 GB): batch-1 graph decode."""
    import torch
    from benchmarking.gpu import hbm_read_bandwidth
    flags = TINY if ctx.dry_run else GLM_130B
    bandwidth = hbm_read_bandwidth(ctx.device, (64 << 20) if ctx.dry_run else (4 << 30), 3)["torch_sum"]
    start = time.perf_counter()
    model = ctx.build(flags, 4)
    if ctx.device.type == "cuda":
        torch.cuda.synchronize()
    out = {"full.int4.init_s": time.perf_counter() - start, "full.machine.read_bandwidth_bytes_per_s": bandwidth}
    out.update(_decode_figures(model, ctx, "full.int4", bandwidth, (1,), 4 if ctx.dry_run else 32))
    if ctx.device.type == "cuda":
        out["full.int4.gpu_max_allocated_bytes"] = torch.cuda.max_memory_allocated()
    return out


# ---------------------------------------------------------------------------------------------------------------
# Driver

def run_section(name: str, dry_run: bool, part: Path) -> None:
    """In the section's own process: run it, write its results to `part`."""
    stub_absent_modules()
    import initialize
    import torch
    ctx = Context(dry_run, part)
    initialize.initialize(None, [*TINY, "--device", str(ctx.device), "--random-init"])
    torch.backends.cuda.matmul.allow_tf32 = False
    if os.environ.get("GLM_GPU_CHECK_FAIL") == name:  # tests: a failing section must not stop the others
        raise RuntimeError(f"injected failure in section {name}")
    fn = globals()[f"section_{name}"]
    ctx.checkpoint(fn(ctx, part) if name == "bench" else fn(ctx))


def _last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1][:500] if lines else ""


def _write(path: Path, results: dict) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps({k: results[k] for k in sorted(results)}, indent=1, default=str))
    os.replace(tmp, path)


class _Stopped(Exception):
    """SIGTERM (scripts/gpu_check.sh's overall time limit): stop the running section, keep what was measured."""


def _on_sigterm(signum, frame):
    raise _Stopped()


def _run_process(cmd, env, limit: float, log_file):
    """(status, error) of one section process, run in its own process group so that a timeout or a stop also ends
    the processes it started (benchmark.py in the bench section) and frees the GPU for the next section."""
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log_file, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        _, stderr = proc.communicate(timeout=limit)
    except (subprocess.TimeoutExpired, _Stopped) as e:
        os.killpg(proc.pid, signal.SIGKILL)
        _, stderr = proc.communicate()
        log_file.write(stderr or "")
        if isinstance(e, _Stopped):
            raise
        return "timeout", f"over {limit} s"
    log_file.write(stderr)
    if proc.returncode != 0:
        return "failed", f"exit {proc.returncode}: {_last_line(stderr)}"
    return "ok", None


def drive(out: Path, log: Path, dry_run: bool, sections) -> dict:
    env = dict(os.environ)
    if dry_run:
        env["TRITON_INTERPRET"] = "1"
        env.setdefault("GLM_CPU_KERNELS", "0")  # no C++ build in a dry run: PyTorch's CPU paths
    results = {"run.started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "run.dry_run": dry_run}
    out.parent.mkdir(parents=True, exist_ok=True)
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        with open(log, "w") as log_file:
            for name in sections:
                if not _drive_section(name, dry_run, env, out, log_file, results):
                    break
    except _Stopped:  # between two sections
        results["run.stopped"] = True
    finally:
        signal.signal(signal.SIGTERM, previous)
    results["run.ok"] = (all(results.get(f"sections.{n}.status") == "ok" for n in sections)
                         and bool(results.get("kernels.ok", True)) and bool(results.get("graph.ok", True))
                         and not any(k.endswith(".error") for k in results))
    _write(out, results)
    return results


def _drive_section(name, dry_run, env, out: Path, log_file, results: dict) -> bool:
    """Run one section, merge its results and status into `results`, rewrite the JSON. False when stopped."""
    limit = DRY_RUN_LIMIT_S if dry_run else SECTIONS[name]
    part = out.with_name(f".{out.name}.{name}.part")
    part.unlink(missing_ok=True)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--section", name, "--part", str(part)]
    cmd += ["--dry-run"] if dry_run else []
    log_file.write(f"=== section {name} (limit {limit} s)\n")
    log_file.flush()
    start = time.perf_counter()
    stopped = False
    try:
        status, error = _run_process(cmd, env, limit, log_file)
    except _Stopped:
        status, error, stopped = "stopped", "the overall time limit stopped the check here", True
    if part.exists():
        results.update(json.loads(part.read_text()))
        part.unlink()
    elif status == "ok":
        status, error = "failed", "no results written"
    results[f"sections.{name}.status"] = status
    results[f"sections.{name}.seconds"] = time.perf_counter() - start
    if error:
        results[f"sections.{name}.error"] = error
    log_file.write(f"=== section {name}: {status} in {results[f'sections.{name}.seconds']:.1f} s"
                   f"{'' if error is None else ': ' + error}\n")
    log_file.flush()
    _write(out, results)
    return not stopped


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--benchmark"]:  # benchmark.py, with the stand-ins of stub_absent_modules
        stub_absent_modules()
        import benchmark
        benchmark.main(argv[1:])
        return 0
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(ROOT / "docs" / "results" / "gpu-h200.json"))
    p.add_argument("--log", default=None, help="default: the --out path with .log")
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes, Triton's interpreter")
    p.add_argument("--sections", nargs="+", default=list(SECTIONS), choices=list(SECTIONS))
    p.add_argument("--section", default=None, help=argparse.SUPPRESS)
    p.add_argument("--part", default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.section:
        run_section(a.section, a.dry_run, Path(a.part))
        return 0
    out = Path(a.out)
    results = drive(out, Path(a.log) if a.log else out.with_suffix(".log"), a.dry_run, a.sections)
    for key in ("kernels.ok", "graph.ok", "bench.graph_speedup", "slice.fp16.roofline_fraction",
                "slice.int8.roofline_fraction", "slice.int4.roofline_fraction", "slice.int4.speedup_vs_fp16",
                "prefill.2048.mfu", "full.int4.ms_per_token", "full.int4.roofline_fraction"):
        print(f"{key} = {results.get(key)}")
    for name in a.sections:
        print(f"section {name}: {results.get(f'sections.{name}.status')} {results.get(f'sections.{name}.error') or ''}")
    print(f"> wrote {out}")
    return 0 if results["run.ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
