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
  prefill.<n>.mfu                   = model FLOPs/s of the encode forward ÷ measured matmul peak of the dtype its
                                      GEMMs compute in (bf16; fp32 on a CPU without a bf16 GEMM: prefill.compute_dtype)
  eval.flop_fraction                = evaluation FLOPs/s ÷ prefill FLOPs/s at 512 tokens
With --bminf (weight offload), also per format the bytes streamed per token, the streaming bandwidth probed right
  before and after each decode run, and
  offload.<format>.stream_fraction  = streamed bytes per step × steps/s ÷ the better of those two probes, at batch
                                      1, 8 and --offload-batch-size (benchmarking/offload.py)
FLOP counts (docs/performance.md): 2 × linear-layer parameters × tokens + 4 × layers × s² × hidden (attention
scores and weighted sum over the full s × s matrix the kernels compute) + 2 × hidden × vocab per logits row.
Weight bytes per decode step: every parameter's storage once (the output projection is the word embedding).
Times on a shared machine are noisy: decode speed is the median step (mean also written), probes keep their best.
"""
import os
import resource
import time
from typing import Dict

import torch

from benchmarking.arithmetic import weight_bytes
from benchmarking import offload
from benchmarking.gpu import gpu_config, run_graph_decode
from benchmarking.offload import stream_bandwidth
from benchmarking.phases import free, load_model, run_decode, run_encode, run_eval
from benchmarking.probes import AdjacentProbe, best, matmul_peak, read_bandwidth
from benchmarking.report import derive, print_summary, summary_lines, write_json
from benchmarking.timing import CpuLoad
from initialize import initialize
from kernels import cpu
from model import mpu

FORMATS = {"16bit": None, "int8": 8, "int4": 4}


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
    g.add_argument("--load-int8", default=None, help="an INT8 checkpoint from tools/convert_tp.py to time that format "
                   "with (default: quantize --load while loading; with --bminf on CPU the streamed layers are then "
                   "copied from RAM instead of read from the file)")
    g.add_argument("--load-int4", default=None, help="the same for INT4")
    g.add_argument("--offload-batch-size", type=int, default=32,
                   help="with --bminf, the large decode batch timed besides --decode-batch-sizes (default 32)")


class Plan:
    """The sizes of one run (the defaults, or the small --quick ones)."""

    def __init__(self, args):
        quick = args.quick
        self.lengths = args.encode_lengths or ([128, 512] if quick else [512, 1024, 2048])
        self.batches = args.decode_batch_sizes or ([1, 2] if quick else [1, 8])
        if args.bminf and args.offload_batch_size not in self.batches:  # offload: streamed layers reused by a batch
            self.batches = self.batches + [args.offload_batch_size]
        self.prompt = args.prompt_length or (16 if quick else 128)
        self.steps = args.new_tokens or (16 if quick else 128)
        self.eval_samples = args.eval_samples or (1 if quick else 2)
        self.eval_length = args.eval_length or (256 if quick else 512)
        self.bw_bytes, self.bw_repeats = ((256 << 20), 3) if quick else ((1 << 30), 5)
        self.gemm_shapes = [(1024, 1024, 1024)] if quick else [(2048, 2048, 2048), (4096, 4096, 4096), (512, 1536, 8192)]
        if args.device.type == "cuda" and not quick:  # HBM: a buffer far above the caches; the largest GEMMs
            self.bw_bytes = 4 << 30
            self.gemm_shapes = self.gemm_shapes + [(8192, 8192, 8192)]
        self.gemm_repeats = 2 if quick else 3
        default16 = "fp16" if args.device.type == "cuda" else "bf16"
        self.dtype16 = {"bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype16 or default16]
        self.dtype_name = str(self.dtype16).replace("torch.", "")
        # what prefill's GEMMs compute in: bf16 on a CPU without a bf16 GEMM goes through fp32 (kernels.cpu.linear)
        self.prefill_fp32 = (args.device.type == "cpu" and self.dtype16 == torch.bfloat16
                             and not cpu.bf16_gemm_native())


def run_config(args, plan: Plan) -> dict:
    return {"config.num_layers": args.num_layers, "config.hidden_size": args.hidden_size,
            "config.num_attention_heads": args.num_attention_heads, "config.inner_hidden_size": args.inner_hidden_size,
            "config.vocab_size": args.vocab_size, "config.model_parallel_size": args.model_parallel_size,
            "config.dtype16": args.dtype16 or plan.dtype_name, "config.quick": args.quick,
            "machine.device": str(args.device), "machine.threads": torch.get_num_threads(),
            "machine.cpu_count": os.cpu_count(), "machine.torch": torch.__version__,
            "machine.fast_cpu_kernels": args.device.type == "cpu" and cpu.available(),
            "cpu.kernel_tier": cpu.tier() if args.device.type == "cpu" else "none", **gpu_config(args.device)}


def run(args, plan: Plan, results: dict):
    """Every phase, between two rounds of machine probes. Returns (decode figures, bandwidths, matmul peaks)."""
    device = args.device
    bandwidth = read_bandwidth(device, plan.bw_bytes, plan.bw_repeats)
    peak16 = matmul_peak(device, plan.dtype16, plan.gemm_shapes, plan.gemm_repeats)
    peak32 = matmul_peak(device, torch.float32, plan.gemm_shapes if plan.prefill_fp32 else plan.gemm_shapes[:1], 2)

    model = load_model(args, None, plan.dtype16)
    cfg = model.config
    results["model.parameters"] = sum(p.numel() for p in model.parameters())
    results["model.layer_fraction"] = (sum(p.numel() for p in model.transformer.layers.parameters())
                                       / results["model.parameters"])
    run_encode(model, plan.lengths, device, results, cfg)
    run_eval(model, plan.eval_samples, plan.eval_length, device, results, cfg,
             results.get(f"prefill.{min(plan.lengths)}.flop_per_s"))

    decode = {}
    probe = AdjacentProbe(device, plan.bw_bytes // 2)
    for name in args.formats:
        if FORMATS[name] is not None:
            free(model)
            model = load_model(args, FORMATS[name], plan.dtype16)
        nbytes = weight_bytes(model)
        run_decode(model, 1, min(plan.prompt, 8), 4, device, segments=1)  # warm-up (kernel build, first calls)
        streams = args.bminf and model.offload.streams
        for b in plan.batches:
            before = stream_bandwidth(args) if streams else None
            r = decode[(name, b)] = run_decode(model, b, plan.prompt, plan.steps, device, probe, nbytes)
            if streams:  # the disk's (or host link's) bandwidth moves too: probed right before and after the run
                r["stream_bandwidth"] = max(before, stream_bandwidth(args))
            mpu.print_rank_0(f"Decode {name} batch {b}: {r['tokens_per_s']:.2f} tokens/s "
                             f"(median step {r['step_ms_median']:.1f} ms, mean {r['tokens_per_s_mean']:.2f} tokens/s; "
                             f"prefill {plan.prompt} tokens {r['prefill_ms']:.0f} ms)")
        results[f"decode.{name}.weight_bytes_per_step"] = nbytes
        if streams:
            offload.record(model, name, decode, results)
        if (device.type == "cuda" and 1 in plan.batches and mpu.get_model_parallel_world_size() == 1
                and not model.offload.streams):
            run_graph_decode(model, name, plan.prompt, plan.steps, decode, results)
    free(model)
    bandwidth["decode_probes"] = max(probe.all)
    del probe

    for key, value in read_bandwidth(device, plan.bw_bytes, plan.bw_repeats).items():  # the best of all probes
        bandwidth[key] = max(bandwidth[key], value)
    for key, value in matmul_peak(device, plan.dtype16, plan.gemm_shapes, plan.gemm_repeats).items():
        peak16[key] = value if peak16[key] is None else max(peak16[key], value or 0.0)
    return decode, bandwidth, peak16, peak32


def record_machine(results: dict, plan: Plan, bandwidth: dict, peak16: dict, peak32: dict) -> None:
    for key, value in bandwidth.items():
        results[f"machine.read_bandwidth.{key}_bytes_per_s"] = value
    results["machine.read_bandwidth_bytes_per_s"] = max(bandwidth.values())
    for key, value in peak16.items():
        results[f"machine.matmul_peak.{plan.dtype_name}.{key}_flop_per_s"] = value
    results[f"machine.matmul_peak_{plan.dtype_name}_flop_per_s"] = best(peak16)
    for key, value in peak32.items():
        results[f"machine.matmul_peak.fp32.{key}_flop_per_s"] = value
    results["machine.matmul_peak_fp32_flop_per_s"] = best(peak32)


def main(argv=None):
    wall_start = time.time()
    args = initialize(add_benchmark_args, argv)
    plan = Plan(args)
    if args.quantization_bit_width:
        mpu.print_rank_0("> benchmark.py measures every weight format itself; --quantization-bit-width is ignored")
    load = CpuLoad().start()
    results: Dict[str, object] = run_config(args, plan)
    decode, bandwidth, peak16, peak32 = run(args, plan, results)
    record_machine(results, plan, bandwidth, peak16, peak32)
    results["prefill.compute_dtype"] = "float32" if plan.prefill_fp32 else plan.dtype_name
    derive(results, decode, args.formats, plan.lengths, results["machine.read_bandwidth_bytes_per_s"],
           best(peak32) if plan.prefill_fp32 else best(peak16))
    results["run.peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    results["run.seconds"] = time.time() - wall_start
    other = load.stop()
    if other is not None:
        results["run.other_processes_cpu_share"] = other
    print_summary(summary_lines(results, args.formats, plan.lengths, plan.dtype_name, other)
                  + offload.summary_lines(results, args.formats, plan.batches))
    write_json(args.json, results)
    return results


if __name__ == "__main__":
    from model.errors import main_entry
    main_entry(main)()
