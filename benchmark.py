"""Benchmark (the original's benchmark.py, extended): how close inference runs to this machine's limits.

    python benchmark.py $MODEL_ARGS [--json FILE] [--quick] [--formats 16bit int8 int4] ...
    bash scripts/benchmark.sh --json FILE          # the benchmark model (configs/model_glm_bench.sh)

Prints, as the original, `Encode {n}: {ms} ms` for one forward of batch 1 at n = 512, 1024, 2048 tokens (tokens all
ones, positions arange(n), a random attention mask), then:
  decode     tokens/s at batch 1 and batch 8 (128-token prompt, 128 greedy steps) for each weight format
             (16-bit = bf16 on CPU / fp16 on GPU, INT8, INT4), through KVCache + forward_with_cache;
  evaluation scoring throughput on a synthetic multiple-choice batch (ModelForEvaluation.cond_log_prob);
  machine    memory read bandwidth and bf16/fp32 matrix-multiply peak, measured in this process;
  peak RSS.
Derived ratios (written with every raw figure by --json, a flat object with dotted keys):
  decode.<format>.roofline_fraction = weight bytes read per step × steps/s ÷ read bandwidth measured around those
                                      steps (batch 1; median over 4 stretches of steps, each against the better of
                                      the probes just before and after it: other tenants move the machine's bandwidth)
  decode.<format>.roofline_fraction_vs_best_probe = the median step against the best bandwidth of the whole run
  prefill.<n>.mfu                   = model FLOPs/s of the encode forward ÷ measured bf16 matmul peak
  eval.flop_fraction                = evaluation FLOPs/s ÷ prefill FLOPs/s at 512 tokens
FLOP counts (docs/performance.md): 2 × linear-layer parameters × tokens + 4 × layers × s² × hidden (attention
scores and weighted sum over the full s × s matrix the kernels compute) + 2 × hidden × vocab per logits row.
Weight bytes per decode step: every parameter's storage once (the output projection is the word embedding).
Times on a shared machine are noisy: decode speed is the median step (mean also written), probes keep their best.
"""
import gc
import json
import math
import os
import resource
import statistics
import sys
import time
from typing import Dict, List

import torch

from initialize import build_model, initialize
from model import KVCache, mpu

FORMATS = {"16bit": None, "int8": 8, "int4": 4}
MASK_ID, GMASK_ID, SOP_ID = 150000, 150001, 150004


def add_benchmark_args(parser):
    g = parser.add_argument_group("benchmark")
    g.add_argument("--json", default=None, help="write every figure and the derived ratios to this file")
    g.add_argument("--quick", action="store_true",
                   help="small sizes for a smoke test (CI, demo model): figures are not meaningful")
    g.add_argument("--formats", nargs="+", default=list(FORMATS), choices=list(FORMATS))
    g.add_argument("--encode-lengths", nargs="+", type=int, default=None, help="default 512 1024 2048")
    g.add_argument("--decode-batch-sizes", nargs="+", type=int, default=None, help="default 1 8")
    g.add_argument("--prompt-length", type=int, default=None, help="default 128")
    g.add_argument("--new-tokens", type=int, default=None, help="decode steps per run, default 128")
    g.add_argument("--eval-samples", type=int, default=None, help="multiple-choice samples per batch, default 2")
    g.add_argument("--eval-length", type=int, default=None, help="tokens per sample, default 512")
    g.add_argument("--dtype16", choices=["bf16", "fp16"], default=None,
                   help="the 16-bit weight format (default bf16 on CPU, fp16 on GPU); overrides the config's dtype")


# ---------------------------------------------------------------------------------------------------------------
# Timing helpers

def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device) -> float:
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def best_time(fn, device, repeats: int) -> float:
    return min(timed(fn, device) for _ in range(repeats))


class CpuLoad:
    """Share of this machine's CPU time used by OTHER processes between start() and stop() (Linux; else None)."""

    def __init__(self):
        self.start_total = self.start_self = self.start_wall = None

    @staticmethod
    def _busy_jiffies():
        try:
            with open("/proc/stat") as f:
                v = [int(x) for x in f.readline().split()[1:]]
            return v[0] + v[1] + v[2] + v[5] + v[6] + v[7]  # user nice system irq softirq steal
        except (OSError, ValueError, IndexError):
            return None

    def start(self):
        self.start_total, self.start_self, self.start_wall = self._busy_jiffies(), time.process_time(), time.time()
        return self

    def stop(self):
        total = self._busy_jiffies()
        if total is None or self.start_total is None:
            return None
        hz = os.sysconf("SC_CLK_TCK")
        wall = time.time() - self.start_wall
        others = (total - self.start_total) / hz - (time.process_time() - self.start_self)
        return max(0.0, others / (wall * (os.cpu_count() or 1)))


# ---------------------------------------------------------------------------------------------------------------
# Machine probes

def read_bandwidth(device, nbytes: int, repeats: int) -> Dict[str, float]:
    """Best read bandwidth (bytes/s): torch.sum over an fp32 buffer, and on CPU also the kernels' streaming probe."""
    x = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
    out = {"torch_sum": nbytes / best_time(lambda: x.sum(), device, repeats)}
    if device.type == "cpu":
        from kernels import cpu
        if cpu.available():
            out["stream_probe"] = nbytes / best_time(lambda: cpu.read_bandwidth_probe(x), device, repeats)
    del x
    return out


def matmul_peak(device, dtype, shapes, repeats: int) -> Dict[str, float]:
    """Best FLOP/s of torch.mm per (m, k, n) shape."""
    out = {}
    for m, k, n in shapes:
        a = torch.randn(m, k, device=device).to(dtype)
        b = torch.randn(k, n, device=device).to(dtype)
        out[f"{m}x{k}x{n}"] = 2 * m * k * n / best_time(lambda: torch.mm(a, b), device, repeats)
    return out


# ---------------------------------------------------------------------------------------------------------------
# Model arithmetic

def linear_params_per_layer(cfg) -> int:
    h, f = cfg.hidden_size, cfg.inner_hidden_size
    return 3 * h * h + h * h + 2 * f * h + f * h


def forward_flops(cfg, seq: int, logit_rows: int) -> float:
    """FLOPs of one sequence's forward: linears, attention over the full seq × seq matrix, logits rows."""
    h, layers = cfg.hidden_size, cfg.num_layers
    return (2.0 * seq * layers * linear_params_per_layer(cfg) + 4.0 * layers * seq * seq * h
            + 2.0 * logit_rows * h * cfg.vocab_size)


def weight_bytes(model) -> int:
    """Bytes of every parameter and buffer held by the model (what one decode step reads at least once)."""
    seen, total = set(), 0
    for t in list(model.parameters()) + [b for b in model.buffers() if b is not None]:
        if t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    return total


# ---------------------------------------------------------------------------------------------------------------
# Phases

def run_encode(model, lengths: List[int], device, results: dict, cfg, peak: float):
    gen = torch.Generator().manual_seed(1234)

    def inputs(n):
        tokens = torch.ones(1, n, dtype=torch.long, device=device)
        positions = torch.arange(n, device=device).unsqueeze(0)
        mask = (torch.randn(1, 1, n, n, generator=gen) < 0.5).to(device)  # as the original: a random mask
        return tokens, positions, mask

    warm = inputs(min(lengths))
    timed(lambda: model(*warm), device)  # first call: allocator, kernel selection
    for n in lengths:
        args = inputs(n)
        mpu.barrier()
        t = best_time(lambda: model(*args), device, 2 if n == min(lengths) else 1)
        mpu.barrier()
        mpu.print_rank_0(f"Encode {n}: {t * 1e3:.2f} ms")
        flops = forward_flops(cfg, n, n) / mpu.get_model_parallel_world_size()
        results[f"prefill.{n}.ms"] = t * 1e3
        results[f"prefill.{n}.flops"] = flops
        results[f"prefill.{n}.flop_per_s"] = flops / t
        results[f"prefill.{n}.mfu"] = flops / t / peak


class AdjacentProbe:
    """Read-bandwidth probes taken right before and after each stretch of decoding (the machine's available
    bandwidth moves with other tenants' load; a ratio needs both figures from the same minutes)."""

    def __init__(self, device, nbytes: int):
        self.device = device
        self.x = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
        self.all = []

    def __call__(self) -> float:
        if self.device.type == "cpu":
            from kernels import cpu
            fn = lambda: cpu.read_bandwidth_probe(self.x)  # noqa: E731 (its own threads: no OpenMP left spinning)
        else:
            fn = lambda: self.x.sum()  # noqa: E731
        bw = self.x.numel() * 4 / best_time(fn, self.device, 2)
        self.all.append(bw)
        return bw


def run_decode(model, batch: int, prompt: int, steps: int, device, probe=None, nbytes=None,
               segments: int = 4) -> Dict[str, float]:
    """Prefill `prompt` random tokens per row, then `steps` greedy one-token steps in `segments` stretches with a
    bandwidth probe between stretches; per-step times and per-stretch roofline fractions."""
    gen = torch.Generator().manual_seed(batch)
    vocab = model.config.vocab_size
    tokens = torch.randint(20000, min(vocab, 150000), (batch, prompt), generator=gen).to(device)
    positions = torch.arange(prompt, device=device).expand(batch, prompt)
    mask = torch.zeros(1, 1, prompt, prompt, dtype=torch.bool, device=device)  # bidirectional context, as GLM's
    cache = KVCache(model, batch, prompt + steps)
    start = time.perf_counter()
    logits = model.forward_with_cache(tokens, positions, mask, cache,
                                      logits_index=torch.full((batch,), prompt - 1, device=device))
    sync(device)
    prefill = time.perf_counter() - start
    nxt = logits[:, -1].argmax(-1, keepdim=True)
    times, fractions = [], []
    bounds = [round(i * steps / segments) for i in range(segments + 1)]
    bw_before = probe() if probe else None
    for seg in range(segments):
        seg_times = []
        for _ in range(bounds[seg], bounds[seg + 1]):
            length = cache.length
            t0 = time.perf_counter()
            logits = model.forward_with_cache(nxt, torch.full((batch, 1), length, device=device),
                                              torch.zeros(1, 1, 1, length + 1, dtype=torch.bool, device=device), cache)
            nxt = logits[:, -1].argmax(-1, keepdim=True)
            sync(device)
            seg_times.append(time.perf_counter() - t0)
        times += seg_times
        if probe and seg_times:
            bw_after = probe()
            fractions.append(nbytes * len(seg_times) / sum(seg_times) / max(bw_before, bw_after))
            bw_before = bw_after
    median = statistics.median(times)
    out = {"prefill_ms": prefill * 1e3, "step_ms_median": median * 1e3, "step_ms_mean": sum(times) / len(times) * 1e3,
           "tokens_per_s": batch / median, "tokens_per_s_mean": batch * len(times) / sum(times), "steps": steps}
    if fractions:
        out["roofline_fraction"] = statistics.median(fractions)
        out["roofline_fraction_segments"] = fractions
    return out


def synthetic_multiple_choice(samples: int, length: int, choices: int = 4, choice_len: int = 3):
    """A batch as evaluation/dataset.py builds it: context + [gMASK], then one causal `[sop] + choice[:-1]` block
    per choice that sees the whole bidirectional context (block-diagonal mask), `length` tokens per sample."""
    from model.layout import collate_layouts, multiple_choice_sample
    gen = torch.Generator().manual_seed(7)
    text_len = length - 1 - choices * choice_len
    layouts, rows, ids = [], [], []
    for _ in range(samples):
        text = torch.randint(20000, 150000, (text_len,), generator=gen).tolist()
        opts = [torch.randint(20000, 150000, (choice_len,), generator=gen).tolist() for _ in range(choices)]
        layout, r, i = multiple_choice_sample(text, opts, False, GMASK_ID, SOP_ID, use_task_mask=True)
        layouts.append(layout)
        rows.append(r)
        ids.append(i)
    batch = collate_layouts(layouts)
    batch["choice_rows"], batch["choice_ids"] = rows, ids
    return batch, choices * choice_len


def run_eval(model, samples: int, length: int, device, results: dict, cfg):
    from evaluation.model import ModelForEvaluation
    batch, scored_rows = synthetic_multiple_choice(samples, length)
    evaluator = ModelForEvaluation(model)
    evaluator.cond_log_prob(batch)  # warm-up (first use of these shapes)
    t = best_time(lambda: evaluator.cond_log_prob(batch), device, 2)
    flops = samples * forward_flops(cfg, length, scored_rows) / mpu.get_model_parallel_world_size()
    results.update({"eval.samples": samples, "eval.tokens_per_sample": length, "eval.ms": t * 1e3,
                    "eval.flops": flops, "eval.flop_per_s": flops / t, "eval.samples_per_s": samples / t})
    mpu.print_rank_0(f"Evaluation: {samples} multiple-choice samples of {length} tokens in {t * 1e3:.1f} ms "
                     f"({flops / t / 1e12:.3f} TFLOP/s)")


def load_model(args, bits, dtype):
    args.quantization_bit_width = bits
    args.from_quantized_checkpoint = False
    args.params_dtype = dtype
    return build_model(args)


def free(model):
    del model
    gc.collect()


# ---------------------------------------------------------------------------------------------------------------

def main(argv=None):
    wall_start = time.time()
    args = initialize(add_benchmark_args, argv)
    device = args.device
    quick = args.quick
    lengths = args.encode_lengths or ([128, 512] if quick else [512, 1024, 2048])
    batches = args.decode_batch_sizes or ([1, 2] if quick else [1, 8])
    prompt = args.prompt_length or (16 if quick else 128)
    steps = args.new_tokens or (16 if quick else 128)
    eval_samples = args.eval_samples or (1 if quick else 2)
    eval_length = args.eval_length or (256 if quick else 512)
    dtype16 = {"bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype16 or ("fp16" if device.type == "cuda" else "bf16")]
    if args.quantization_bit_width:
        mpu.print_rank_0("> benchmark.py measures every weight format itself; --quantization-bit-width is ignored")
    load = CpuLoad().start()
    results: Dict[str, object] = {
        "config.num_layers": args.num_layers, "config.hidden_size": args.hidden_size,
        "config.num_attention_heads": args.num_attention_heads, "config.inner_hidden_size": args.inner_hidden_size,
        "config.vocab_size": args.vocab_size, "config.model_parallel_size": args.model_parallel_size,
        "config.dtype16": args.dtype16 or str(dtype16).replace("torch.", ""), "config.quick": quick,
        "machine.device": str(device), "machine.threads": torch.get_num_threads(),
        "machine.cpu_count": os.cpu_count(), "machine.torch": torch.__version__,
    }
    if device.type == "cpu":
        from kernels import cpu
        results["machine.fast_cpu_kernels"] = cpu.available()

    # Machine limits, measured in this process (again after the runs; the best of all probes is used).
    bw_bytes, bw_repeats = ((256 << 20), 3) if quick else ((1 << 30), 5)
    gemm_shapes = [(1024, 1024, 1024)] if quick else [(2048, 2048, 2048), (4096, 4096, 4096), (512, 1536, 8192)]
    bandwidth = read_bandwidth(device, bw_bytes, bw_repeats)
    peak_bf16 = matmul_peak(device, dtype16, gemm_shapes, 2 if quick else 3)
    peak_fp32 = matmul_peak(device, torch.float32, gemm_shapes[:1], 2)

    model = load_model(args, None, dtype16)
    cfg = model.config
    results["model.parameters"] = sum(p.numel() for p in model.parameters())
    results["model.layer_fraction"] = (sum(p.numel() for p in model.transformer.layers.parameters())
                                       / results["model.parameters"])
    peak = max(peak_bf16.values())
    run_encode(model, lengths, device, results, cfg, peak)
    run_eval(model, eval_samples, eval_length, device, results, cfg)

    decode = {}
    probe = AdjacentProbe(device, bw_bytes // 2)
    for name in args.formats:
        if FORMATS[name] is not None:
            free(model)
            model = load_model(args, FORMATS[name], dtype16)
        nbytes = weight_bytes(model)
        run_decode(model, 1, min(prompt, 8), 4, device, segments=1)  # warm-up (kernel build, first calls)
        for b in batches:
            r = run_decode(model, b, prompt, steps, device, probe, nbytes)
            decode[(name, b)] = r
            mpu.print_rank_0(f"Decode {name} batch {b}: {r['tokens_per_s']:.2f} tokens/s "
                             f"(median step {r['step_ms_median']:.1f} ms, mean {r['tokens_per_s_mean']:.2f} tokens/s; "
                             f"prefill {prompt} tokens {r['prefill_ms']:.0f} ms)")
        results[f"decode.{name}.weight_bytes_per_step"] = nbytes
    free(model)
    bandwidth["decode_probes"] = max(probe.all)
    del probe

    bw_end = read_bandwidth(device, bw_bytes, bw_repeats)
    for key, value in bw_end.items():
        bandwidth[key] = max(bandwidth[key], value)
    for key, value in matmul_peak(device, dtype16, gemm_shapes, 2 if quick else 3).items():
        peak_bf16[key] = max(peak_bf16[key], value)
    bw = max(bandwidth.values())
    new_peak = max(peak_bf16.values())
    for n in lengths:  # the peak may have risen with the second probe: ratios use the best one
        results[f"prefill.{n}.mfu"] = results[f"prefill.{n}.flop_per_s"] / new_peak
    peak = new_peak

    for key, value in bandwidth.items():
        results[f"machine.read_bandwidth.{key}_bytes_per_s"] = value
    results["machine.read_bandwidth_bytes_per_s"] = bw
    for key, value in peak_bf16.items():
        results[f"machine.matmul_peak.{str(dtype16).replace('torch.', '')}.{key}_flop_per_s"] = value
    results[f"machine.matmul_peak_{str(dtype16).replace('torch.', '')}_flop_per_s"] = peak
    for key, value in peak_fp32.items():
        results[f"machine.matmul_peak.fp32.{key}_flop_per_s"] = value
    results["machine.matmul_peak_fp32_flop_per_s"] = max(peak_fp32.values())

    for (name, b), r in decode.items():
        nbytes = results[f"decode.{name}.weight_bytes_per_step"]
        prefix = f"decode.{name}" if b == 1 else f"decode.{name}.batch{b}"
        for key, value in r.items():
            results[f"{prefix}.{key}"] = value
        # roofline_fraction (from run_decode): each stretch of steps against the probes taken around it;
        # _vs_best_probe: the median step against the best bandwidth seen in the whole run (the stricter figure).
        results[f"{prefix}.roofline_fraction_vs_best_probe"] = nbytes * (r["tokens_per_s"] / b) / bw
        results[f"{prefix}.roofline_tokens_per_s"] = b * bw / nbytes
    if ("16bit", 1) in decode:
        base = decode[("16bit", 1)]["tokens_per_s"]
        for name in args.formats:
            if name != "16bit" and (name, 1) in decode:
                results[f"decode.{name}.speedup_vs_16bit"] = decode[(name, 1)]["tokens_per_s"] / base
    ref_n = 512 if 512 in lengths else lengths[0]
    results["eval.flop_fraction"] = results["eval.flop_per_s"] / results[f"prefill.{ref_n}.flop_per_s"]
    results["eval.flop_fraction_reference_length"] = ref_n
    results["run.peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    results["run.seconds"] = time.time() - wall_start
    other = load.stop()
    if other is not None:
        results["run.other_processes_cpu_share"] = other

    summary = [f"Read bandwidth {bw / 1e9:.1f} GB/s; {str(dtype16).replace('torch.', '')} matmul peak "
               f"{peak / 1e12:.3f} TFLOP/s; fp32 {results['machine.matmul_peak_fp32_flop_per_s'] / 1e12:.3f} TFLOP/s"]
    for name in args.formats:
        if f"decode.{name}.roofline_fraction" in results:
            extra = (f", {results[f'decode.{name}.speedup_vs_16bit']:.2f}x 16-bit"
                     if f"decode.{name}.speedup_vs_16bit" in results else "")
            summary.append(f"Decode {name}: {results[f'decode.{name}.tokens_per_s']:.2f} tokens/s = "
                           f"{results[f'decode.{name}.roofline_fraction']:.2f} of its bandwidth roofline "
                           f"({results[f'decode.{name}.roofline_fraction_vs_best_probe']:.2f} of the run's best "
                           f"probe){extra}")
    for n in lengths:
        summary.append(f"Prefill {n}: MFU {results[f'prefill.{n}.mfu']:.2f}")
    summary.append(f"Evaluation: {results['eval.flop_fraction']:.2f} of the prefill FLOP rate")
    summary.append(f"Peak RSS {results['run.peak_rss_bytes'] / 2**30:.2f} GiB; {results['run.seconds']:.0f} s"
                   + (f"; other processes used {other:.0%} of the CPUs meanwhile" if other is not None else ""))
    for line in summary:
        mpu.print_rank_0(line)
    if args.json and mpu.get_model_parallel_rank() == 0 and (not torch.distributed.is_initialized()
                                                              or torch.distributed.get_rank() == 0):
        with open(args.json, "w") as f:
            json.dump({k: results[k] for k in sorted(results)}, f, indent=1)
        mpu.print_rank_0(f"> wrote {args.json}")
    return results


if __name__ == "__main__":
    from model.errors import main_entry
    main_entry(main)()
