"""The sections of the GPU check (tools/gpu_check.py runs each in its own process): what each measures on the GPU,
or on the CPU with tiny shapes and Triton's interpreter for --dry-run. Each returns a flat dict of results (dotted
keys, as benchmark.py --json) and saves what it has so far through `Context.checkpoint`.

Timings that judge kernels against the machine's limits are taken the way decoding runs them: replayed from a
captured CUDA graph (no Python launch cost between kernels), over weights larger than the L2 cache (several copies
of a weight are used in turn), against the read bandwidth and matmul peak measured in the same process.
"""
import json
import math
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FIXTURE = ROOT / "tests" / "data" / "sat-parity-tiny"

GLM_130B = ["--num-layers", "70", "--hidden-size", "12288", "--inner-hidden-size", "32768", "--vocab-size", "150528",
            "--num-attention-heads", "96", "--max-sequence-length", "2048"]
SLICE_LAYERS = 8
SLICE_VOCAB = 1024  # the slice's layers are measured alone: its own logits GEMV reads a negligible embedding
BENCH = ["--num-layers", "32", "--hidden-size", "1536", "--inner-hidden-size", "4096", "--vocab-size", "150528",
         "--num-attention-heads", "12", "--max-sequence-length", "2048"]
TINY = ["--num-layers", "2", "--hidden-size", "128", "--inner-hidden-size", "256", "--vocab-size", "150528",
        "--num-attention-heads", "2", "--max-sequence-length", "256"]
FORMATS = {"fp16": None, "int8": 8, "int4": 4}
TEXT_ONLY = [slice(0, 20000), slice(150000, None)]  # the SAT fixture's greedy restriction (its recorded run's)


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


def with_flag(flags, flag, value):
    out = list(flags)
    out[out.index(flag) + 1] = str(value)
    return out


class Context:
    """What a section needs to know: the device, the 16-bit dtype, the sizes (real, or tiny for --dry-run), and
    where its results go. Every checkpoint carries the GPU's name (the check's files are named after it)."""

    def __init__(self, dry_run: bool, part: Path, device=None):
        import torch
        self.dry_run, self.part = dry_run, part
        self.device = torch.device(device or ("cpu" if dry_run else "cuda"))
        on_gpu = self.device.type == "cuda"
        self.dtype16 = torch.float16 if on_gpu else torch.bfloat16  # CPU fp16 matmuls are a slow fallback
        self.dtype_flag = "--fp16" if on_gpu else "--bf16"
        self.base = {"machine.gpu": torch.cuda.get_device_name(self.device)} if on_gpu else {}

    def checkpoint(self, results: dict) -> None:
        """Write what a section has so far: a section stopped by its time limit still reports it."""
        tmp = self.part.with_suffix(".tmp")
        tmp.write_text(json.dumps({**self.base, **results}, default=str))
        os.replace(tmp, self.part)

    def build(self, model_flags, bits=None):
        import initialize
        flags = [*model_flags, self.dtype_flag, "--device", str(self.device), "--random-init"]
        if bits:
            flags += ["--quantization-bit-width", str(bits)]
        return initialize.build_model(initialize.parse_args(None, flags))

    def machine(self, matmul_shapes=((8192, 8192, 8192),)):
        """(read bandwidth bytes/s, fp16 matmul peak FLOP/s) measured now, in this process."""
        from benchmarking.gpu import hbm_read_bandwidth, matmul_peak_events
        bandwidth = hbm_read_bandwidth(self.device, (64 << 20) if self.dry_run else (4 << 30), 3)["torch_sum"]
        if not matmul_shapes:
            return bandwidth, None
        shapes = [(256, 256, 256)] if self.dry_run else list(matmul_shapes)
        return bandwidth, max(matmul_peak_events(self.device, self.dtype16, shapes, 2).values())

    def l2_bytes(self) -> int:
        import torch
        if self.device.type == "cuda":
            return getattr(torch.cuda.get_device_properties(self.device), "L2_cache_size", 0) or (64 << 20)
        return 0  # a dry run: two copies


# ---------------------------------------------------------------------------------------------------------------
# env: versions and the GPU

def section_env(ctx) -> dict:
    import torch
    from benchmarking.gpu import gpu_config
    from kernels import triton_matmul
    out = {"machine.torch": torch.__version__, "machine.cuda": torch.version.cuda, "machine.triton": None,
           "machine.triton_kernels": triton_matmul.available(ctx.device),
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


# ---------------------------------------------------------------------------------------------------------------
# kernels: correctness of the fused kernels

def _kernel_shapes(dry_run, fp16: bool):
    """(rows, N, K) checked: one row with split-K, tails in N and K, the 16-row decode tiles with split-K, prefill
    tiles, odd K (INT8 only); two of them for bf16 (each dtype compiles its own kernels)."""
    if dry_run:
        return [(1, 40, 74), (3, 33, 130), (9, 50, 98), (20, 70, 138)] if fp16 else [(1, 40, 74)]
    shapes = [(1, 12288, 12288), (3, 1000, 998), (16, 12288, 32768), (512, 4096, 4096), (5, 777, 1534)]
    return shapes if fp16 else [shapes[0], shapes[3]]


def section_kernels(ctx) -> dict:
    """The fused kernels against the exact reference (dequantize in float64, then matmul), INT8/INT4, fp16/bf16."""
    import torch
    from kernels import triton_matmul as tm
    from quantization.functional import dequantize
    out, ok = {}, True
    for bits in (8, 4):
        for dtype in (torch.float16, torch.bfloat16):
            for rows, n, k in _kernel_shapes(ctx.dry_run, dtype == torch.float16):
                if bits == 8 and not ctx.dry_run and k == 1534:
                    k = 1535  # odd K for INT8
                key = f"kernels.check.int{bits}.{str(dtype).replace('torch.', '')}.{rows}x{n}x{k}"
                try:
                    x, q, scale = random_case(rows, n, k, bits, dtype, ctx.device)
                    ref = x.double() @ dequantize(q, scale, bits, torch.float64).T
                    y = tm.weight_only_matmul(x, q, scale, bits)
                    err = ((y.double() - ref).abs() / (ref.abs() + 1e-3 * ref.abs().max())).max().item()
                except Exception as e:  # one shape's failure is recorded; the others still run
                    out[f"{key}.error"], ok = repr(e)[:300], False
                    continue
                out[f"{key}.max_rel_err"] = err
                ok &= err <= (2 ** -10 if dtype == torch.float16 else 2 ** -7)
                ctx.checkpoint(out)
    out["kernels.ok"] = bool(ok)
    return out


def random_case(rows, n, k, bits, dtype, device):
    import torch
    gen = torch.Generator(device=device).manual_seed(rows * 7 + n)
    q = torch.randint(-128, 128, (n, k if bits == 8 else k // 2), dtype=torch.int8, device=device, generator=gen)
    scale = (torch.rand(n, device=device, generator=gen) * 0.01 + 1e-3).half()
    x = torch.randn(rows, k, device=device, generator=gen).to(dtype)
    return x, q, scale


# ---------------------------------------------------------------------------------------------------------------
# graph: greedy ids, graph vs eager vs the decoding loop, through generate.py's layout on the device

def section_graph(ctx) -> dict:
    """Per weight format on a 4-layer model of the benchmark config: the CUDA-graph static decoder vs the same step
    run eagerly (must be equal) and vs the decoding loop (recorded; fp16 near-ties may differ), the layout built on
    the device as generate.py builds it. Then the SAT fixture in fp32 on the device: the loop's and the graph's
    greedy ids against SAT's own CPU fp32 run."""
    import torch
    from generation import BaseStrategy, batch_filling_sequence, generation_layout
    from generation.graph_decode import static_filling_sequence
    flags = TINY if ctx.dry_run else with_flag(BENCH, "--num-layers", 4)
    out, ok = {}, True
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(20000, 60000, (n,), generator=gen).tolist() + [150001, 150004] for n in (5, 11, 8)]
    seqs, lengths, layout = generation_layout(prompts, [len(p) - 2 for p in prompts], [True] * 3, 12, ctx.device)
    seqs = seqs.to(ctx.device)
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
    out.update(fixture_parity(ctx))
    out["graph.ok"] = bool(ok and out["graph.fixture.loop_equals_sat"] and out["graph.fixture.graph_equals_sat"])
    return out


def fixture_parity(ctx) -> dict:
    """generate.py's greedy decoding of the SAT fixture (fp32, loaded on the device) against SAT's recorded ids."""
    import initialize
    from generation import BaseStrategy, batch_filling_sequence, generation_layout
    from generation.graph_decode import static_filling_sequence
    config = json.loads((FIXTURE / "ckpt" / "model_config.json").read_text())
    case = json.loads((FIXTURE / "cases.json").read_text())["gen"]
    flags = ["--num-layers", config["num_layers"], "--hidden-size", config["hidden_size"], "--inner-hidden-size",
             config["inner_hidden_size"], "--vocab-size", config["vocab_size"], "--num-attention-heads",
             config["num_attention_heads"], "--max-sequence-length", config["max_sequence_length"],
             "--load", FIXTURE / "ckpt", "--fp32", "--device", ctx.device]
    model = initialize.build_model(initialize.parse_args(None, [str(f) for f in flags]))
    prompt, expected = case["prompt"], case["generated"]
    seqs, lengths, layout = generation_layout([prompt], [len(prompt) - 2], [True], len(expected), ctx.device)
    seqs = seqs.to(ctx.device)
    out = {}
    for key, run in (("loop", batch_filling_sequence), ("graph", static_filling_sequence)):
        tokens, _ = run(model, seqs, lengths, BaseStrategy(top_k=1, end_tokens=[], invalid_slices=TEXT_ONLY), layout)
        out[f"graph.fixture.{key}_equals_sat"] = tokens[0, 0, len(prompt):].tolist() == expected
    return out


# ---------------------------------------------------------------------------------------------------------------
# bench: benchmark.py on the benchmark config

def section_bench(ctx, part: Path) -> dict:
    """benchmark.py itself on the benchmark config (random weights on the device); its keys under bench.*."""
    import subprocess
    flags = TINY if ctx.dry_run else BENCH
    json_path = part.with_suffix(".bench.json")
    cmd = [sys.executable, str(ROOT / "tools" / "gpu_check.py"), "--benchmark", *flags, "--random-init",
           "--device", str(ctx.device), "--json", str(json_path)]
    if not ctx.dry_run:  # fewer steps and lengths than the defaults: the section's time limit
        cmd += ["--new-tokens", "64", "--encode-lengths", "512", "2048"]
    else:
        cmd += ["--quick", "--encode-lengths", "16", "--decode-batch-sizes", "1", "--prompt-length", "4",
                "--new-tokens", "4", "--eval-length", "32"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    print(proc.stdout[-20000:], proc.stderr[-20000:], sep="\n")
    if proc.returncode != 0:
        raise RuntimeError(f"benchmark.py exited {proc.returncode}: {last_line(proc.stderr)}")
    results = json.loads(json_path.read_text())
    json_path.unlink()
    out = {f"bench.{k}": v for k, v in results.items()}
    out["bench.graph_speedup"] = results.get("decode.16bit.graph_speedup")
    return out


def last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1][:500] if lines else ""


# ---------------------------------------------------------------------------------------------------------------
# slice: 8 layers at GLM-130B's width, layers alone; the embedding's logits GEMV apart

def section_slice(ctx) -> dict:
    """Per format, 8 layers of GLM-130B's shape with a negligible vocabulary (the layers alone): batch-1 graph decode
    against the read bandwidth of this process, INT4 also at batch 8, the fp16 step also eagerly (the graph's
    effect at scale), fp16 prefill 512/2048 MFU against the fp16 matmul peak of this process. Apart: the logits
    GEMV over GLM-130B's real 150528 x 12288 fp16 embedding, batch 1, replayed from a graph."""
    import torch
    flags = TINY if ctx.dry_run else with_flag(with_flag(GLM_130B, "--num-layers", SLICE_LAYERS), "--vocab-size",
                                                   SLICE_VOCAB)
    bandwidth, peak = ctx.machine(((8192, 8192, 8192), (4096, 4096, 4096)))
    out = {"slice.layers": SLICE_LAYERS, "slice.machine.read_bandwidth_bytes_per_s": bandwidth,
           "slice.machine.matmul_peak_flop_per_s": peak}
    ctx.checkpoint(out)
    steps = 4 if ctx.dry_run else 48
    for name, bits in FORMATS.items():
        try:
            out.update(_slice_format(ctx, flags, name, bits, bandwidth, peak, steps))
        except Exception as e:  # e.g. out of memory in one format: the others still run
            out[f"slice.{name}.error"] = repr(e)[:300]
        if ctx.device.type == "cuda":
            torch.cuda.empty_cache()
        ctx.checkpoint(out)
    for name in ("int8", "int4"):
        if f"slice.{name}.ms_per_token" in out and "slice.fp16.ms_per_token" in out:
            out[f"slice.{name}.speedup_vs_fp16"] = out["slice.fp16.ms_per_token"] / out[f"slice.{name}.ms_per_token"]
    for n in _prefill_lengths(ctx):
        out[f"prefill.{n}.mfu"] = out.get(f"slice.fp16.prefill.{n}.mfu")
    out.update(_embedding_logits(ctx, bandwidth))
    return out


def _prefill_lengths(ctx):
    return [16] if ctx.dry_run else [512, 2048]


def _slice_format(ctx, flags, name, bits, bandwidth, peak, steps) -> dict:
    from benchmarking.arithmetic import forward_flops
    from benchmarking.gpu import time_static_decode
    model = ctx.build(flags, bits)
    layer_bytes = _tensor_bytes(model.transformer.layers)
    out = decode_figures(model, ctx, f"slice.{name}", layer_bytes, bandwidth, (1, 8) if bits == 4 else (1,), steps)
    if bits is None:
        eager = time_static_decode(model, 1, 8 if ctx.dry_run else 128, steps // 2, use_graph=False)
        out[f"slice.{name}.eager_ms_per_token"] = eager["ms_per_token"]
        out["slice.graph_speedup"] = eager["ms_per_token"] / out[f"slice.{name}.ms_per_token"]
        for n in _prefill_lengths(ctx):
            t = _prefill_seconds(model, n, ctx.device)
            out[f"slice.{name}.prefill.{n}.ms"] = t * 1e3
            out[f"slice.{name}.prefill.{n}.mfu"] = forward_flops(model.config, n, n) / t / peak
    return out


def _tensor_bytes(module) -> int:
    return sum(t.numel() * t.element_size() for t in list(module.parameters()) + list(module.buffers()))


def decode_figures(model, ctx, prefix, nbytes, bandwidth, batches, steps) -> dict:
    """Greedy decoding through the captured step: ms per token, tokens/s, and at batch 1 the roofline fraction
    (`nbytes` read per step, against `bandwidth`)."""
    from benchmarking.gpu import time_static_decode
    out = {f"{prefix}.weight_bytes": nbytes}
    prompt = 8 if ctx.dry_run else 128
    for b in batches:
        r = time_static_decode(model, b, prompt, steps, use_graph=True)
        key = prefix if b == 1 else f"{prefix}.batch{b}"
        out[f"{key}.ms_per_token"], out[f"{key}.tokens_per_s"] = r["ms_per_token"], r["tokens_per_s"]
        if b == 1:
            out[f"{prefix}.roofline_fraction"] = nbytes / (r["ms_per_token"] / 1e3) / bandwidth
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


def _embedding_logits(ctx, bandwidth) -> dict:
    """The batch-1 logits GEMV over GLM-130B's embedding (fp16), replayed from a graph: what a slice leaves out."""
    import torch
    from benchmarking.gpu import replayed_time
    from kernels import cpu
    vocab, hidden = (4096, 128) if ctx.dry_run else (150528, 12288)
    weight = torch.randn(vocab, hidden, device=ctx.device).to(ctx.dtype16)
    h = torch.randn(1, 1, hidden, device=ctx.device).to(ctx.dtype16)
    seconds = replayed_time([lambda: cpu.linear(h, weight)], ctx.device, 3)
    nbytes = weight.numel() * weight.element_size()
    return {"slice.embedding.bytes": nbytes, "slice.embedding.logits_us": seconds * 1e6,
            "slice.embedding.roofline_fraction": nbytes / seconds / bandwidth}


# ---------------------------------------------------------------------------------------------------------------
# kernel_times: GLM-130B's linears, replayed from a graph over weights larger than L2

def timed_shapes(dry_run):
    """GLM-130B's four linears (TP 1, N x K) at decode rows 1 and 8 (16 for one), and two at prefill rows 2048."""
    if dry_run:
        return [(1, 48, 64), (8, 48, 64), (40, 48, 64)]
    linears = [(36864, 12288), (12288, 12288), (65536, 12288), (12288, 32768)]
    return ([(rows, n, k) for rows in (1, 8) for n, k in linears] + [(16, 12288, 12288)]
            + [(2048, 36864, 12288), (2048, 12288, 32768)])


def section_kernel_times(ctx) -> dict:
    """Per shape: the fused kernel (its default config and, for decode rows, the other decode kernel), the
    dequantize-then-GEMM path and the dense fp16 GEMM, each replayed from a CUDA graph over enough copies of the
    weight to exceed the L2 cache several times, against this process's bandwidth and matmul peak."""
    bandwidth, peak = ctx.machine()
    out = {"kernels.machine.read_bandwidth_bytes_per_s": bandwidth, "kernels.machine.matmul_peak_flop_per_s": peak,
           "kernels.machine.l2_bytes": ctx.l2_bytes()}
    for bits in (4, 8):
        for rows, n, k in timed_shapes(ctx.dry_run):
            key = f"kernels.time.int{bits}.rows{rows}.{n}x{k}"
            try:
                out.update(_time_kernels(ctx, key, rows, n, k, bits, bandwidth, peak))
            except Exception as e:  # one shape's failure (e.g. a config that does not build) is recorded
                out[f"{key}.error"] = repr(e)[:300]
            ctx.checkpoint(out)
    return out


def weight_copies(nbytes: int, l2_bytes: int) -> int:
    """Copies of a weight to use in turn so that the bytes read between two reads of one copy exceed L2 4x over
    (2 to 16: GLM-130B's smallest timed weight, 12288 x 12288 in INT4, is 75 MB)."""
    return min(16, max(2, math.ceil(4 * l2_bytes / max(1, nbytes))))


def _time_kernels(ctx, key, rows, n, k, bits, bandwidth, peak) -> dict:
    import torch
    from benchmarking.gpu import replayed_time
    from kernels import triton_matmul as tm
    from quantization import matmul
    from quantization.functional import dequantize
    x, q, scale = random_case(rows, n, k, bits, ctx.dtype16, ctx.device)
    copies = weight_copies(q.numel(), ctx.l2_bytes())
    qs = [q] + [q.clone() for _ in range(copies - 1)]
    dense = dequantize(q, scale, bits, ctx.dtype16)
    denses = [dense] + [dense.clone() for _ in range(weight_copies(dense.numel() * 2, ctx.l2_bytes()) - 1)]

    def timed(fn, weights):
        return replayed_time([lambda w=w: fn(w) for w in weights], ctx.device, 3)
    fused = timed(lambda w: tm.weight_only_matmul(x, w, scale, bits), qs)
    dequant = timed(lambda w: torch.mm(x, matmul.dequantized_t(w, scale, bits, matmul.ORIGINAL, x.dtype)), qs[:2])
    fp16 = timed(lambda w: torch.mm(x, w.t()), denses)
    out = {f"{key}.fused_us": fused * 1e6, f"{key}.dequantize_mm_us": dequant * 1e6, f"{key}.fp16_mm_us": fp16 * 1e6,
           f"{key}.config": repr(tm.choose_config(rows, n, k, bits, tm._sm_count(x.device))),
           f"{key}.weight_copies": copies}
    if bits == 8:  # PyTorch's own W8A16 kernel reads this very layout (int8 [N, K], a scale per row), where it exists
        try:
            out[f"{key}.torch_int8pack_us"] = timed(
                lambda w: torch.ops.aten._weight_int8pack_mm(x, w, scale.to(x.dtype)), qs) * 1e6
        except (RuntimeError, NotImplementedError, AttributeError) as e:
            out[f"{key}.torch_int8pack"] = f"unavailable: {repr(e)[:120]}"
    if rows > tm.DECODE_MAX_ROWS:
        out[f"{key}.mfu"] = 2 * rows * n * k / fused / peak
        out[f"{key}.fp16_mfu"] = 2 * rows * n * k / fp16 / peak
        return out
    out[f"{key}.roofline_fraction"] = q.numel() / fused / bandwidth
    out[f"{key}.fp16_roofline_fraction"] = 2 * n * k / fp16 / bandwidth
    alt = _alternative_config(tm, rows, n, k, x)
    out[f"{key}.alt_config"] = repr(alt)
    y, y_alt = tm.weight_only_matmul(x, q, scale, bits), tm.weight_only_matmul(x, q, scale, bits, alt)
    out[f"{key}.alt_vs_fused_max_rel"] = ((y_alt.float() - y.float()).abs().max() / y.float().abs().max()).item()
    out[f"{key}.alt_us"] = timed(lambda w: tm.weight_only_matmul(x, w, scale, bits, alt), qs) * 1e6
    return out


def _alternative_config(tm, rows, n, k, x):
    """The other decode kernel for the same rows (gemv <-> 16-row tensor-core tiles): measures the switch point."""
    sms = tm._sm_count(x.device)
    if rows <= tm.GEMV_MAX_ROWS:
        return tm.Config("mm", 16, 64, 128, tm.split_k_for(-(-n // 64), k, 128, sms), num_stages=3)
    block_m = 1 << max(0, (rows - 1).bit_length())
    block_k = max(32, 4096 // (block_m * 32))
    return tm.Config("gemv", block_m, 32, block_k, tm.split_k_for(-(-n // 32), k, block_k, sms))


# ---------------------------------------------------------------------------------------------------------------
# full: GLM-130B in INT4

def section_full(ctx) -> dict:
    """The full-size GLM-130B in INT4, random weights created on the GPU (~67 GB): batch-1 graph decode against the
    read bandwidth of this process (every weight byte, the embedding's logits GEMV included, is read per token)."""
    import torch
    from benchmarking.arithmetic import weight_bytes
    flags = TINY if ctx.dry_run else GLM_130B
    bandwidth, _ = ctx.machine(())
    start = time.perf_counter()
    model = ctx.build(flags, 4)
    if ctx.device.type == "cuda":
        torch.cuda.synchronize()
    out = {"full.int4.init_s": time.perf_counter() - start, "full.machine.read_bandwidth_bytes_per_s": bandwidth}
    ctx.checkpoint(out)
    out.update(decode_figures(model, ctx, "full.int4", weight_bytes(model), bandwidth, (1,), 4 if ctx.dry_run else 32))
    if ctx.device.type == "cuda":
        out["full.int4.gpu_max_allocated_bytes"] = torch.cuda.max_memory_allocated()
    return out
