"""benchmark.py: the quick mode (demo model) as a smoke test, the FLOP/byte arithmetic, and (slow) the full run.

No timing assertions: the figures depend on the machine and its other tenants.
"""
import json
import os
import re
import subprocess

import pytest

from tests.helpers import ROOT

FORMATS = ("16bit", "int8", "int4")


def required_keys(lengths):
    keys = {f"decode.{f}.{k}" for f in FORMATS for k in ("roofline_fraction", "tokens_per_s")}
    keys |= {f"prefill.{n}.mfu" for n in lengths} | {"eval.flop_fraction"}
    return keys


def check_results(results, lengths):
    missing = required_keys(lengths) - set(results)
    assert not missing, f"missing keys {sorted(missing)}"
    for key in required_keys(lengths) | {"machine.read_bandwidth_bytes_per_s", "machine.matmul_peak_fp32_flop_per_s",
                                         "run.peak_rss_bytes", "decode.int4.speedup_vs_16bit",
                                         "decode.int8.speedup_vs_16bit"}:
        assert isinstance(results[key], (int, float)) and results[key] > 0, f"{key} = {results[key]!r}"
    for n in lengths:
        assert results[f"prefill.{n}.ms"] > 0
    # weight bytes per decode step shrink with the format
    assert (results["decode.16bit.weight_bytes_per_step"] > results["decode.int8.weight_bytes_per_step"]
            > results["decode.int4.weight_bytes_per_step"])


@pytest.mark.parametrize("bf16_gemm", ["native", "absent"])
def test_quick_mode_writes_all_figures(tmp_path, demo_dir, bf16_gemm):
    """Also as on a CPU without a bf16 GEMM (AVX2-only), where the bf16 matmul peak is n/a and prefill computes in
    fp32: its MFU is then taken against the fp32 peak, never left unmeasured."""
    out = tmp_path / "bench.json"
    env = {**os.environ, "GLM_DEMO_DIR": demo_dir, **({"GLM_CPU_BF16_GEMM": "0"} if bf16_gemm == "absent" else {})}
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "benchmark.sh"), "--quick", "--json", str(out)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for n in (128, 512):
        assert f"Encode {n}: " in proc.stdout  # the original's line
    results = json.loads(out.read_text())
    check_results(results, (128, 512))
    from kernels import cpu
    fp32 = bf16_gemm == "absent" or not cpu.bf16_gemm_native()
    assert results["prefill.compute_dtype"] == ("float32" if fp32 else "bfloat16")
    peak = results["machine.matmul_peak_fp32_flop_per_s" if fp32 else "machine.matmul_peak_bfloat16_flop_per_s"]
    assert results["prefill.512.mfu"] == pytest.approx(results["prefill.512.flop_per_s"] / peak)
    assert results["config.quick"] is True and results["config.num_layers"] == 4
    assert results["cpu.kernel_tier"] == cpu.tier()  # the subprocess chose as this one does (same CPU and env)


def test_flop_and_byte_arithmetic():
    import torch
    from benchmarking import arithmetic
    from model import GLMConfig
    from tests.helpers import load_fixture_model
    cfg = GLMConfig(num_layers=32, hidden_size=1536, num_attention_heads=12, inner_hidden_size=4096, vocab_size=150528)
    per_layer = 4 * 1536 ** 2 + 3 * 4096 * 1536
    assert arithmetic.linear_params_per_layer(cfg) == per_layer
    n = 512
    expected = 2 * n * 32 * per_layer + 4 * 32 * n * n * 1536 + 2 * 3 * 1536 * 150528
    assert arithmetic.forward_flops(cfg, n, 3) == pytest.approx(expected)
    model = load_fixture_model(torch.bfloat16)
    params = sum(p.numel() for p in model.parameters())
    assert arithmetic.weight_bytes(model) == 2 * params


def test_synthetic_multiple_choice_batch_layout():
    from benchmarking.phases import synthetic_multiple_choice
    batch, rows = synthetic_multiple_choice(2, 64)
    assert batch["tokens"].shape == (2, 64) and rows == 12
    mask = batch["attention_mask"][0, 0]  # True = blocked
    division = 64 - 12
    assert not mask[:division, :division].any()  # bidirectional context
    assert mask[division, division + 3:].all()  # a choice never sees the others
    assert not mask[division + 3:, :division].any()  # every choice sees the whole context


@pytest.mark.slow
def test_full_benchmark_on_bench_config(tmp_path):
    """`bash scripts/benchmark.sh --json FILE` on the benchmark model (creates it if missing): < 10 minutes here."""
    out = tmp_path / "bench.json"
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "benchmark.sh"), "--json", str(out)], cwd=tmp_path,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads(out.read_text())
    check_results(results, (512, 1024, 2048))
    assert results["config.num_layers"] == 32 and 1.0e9 < results["model.parameters"] < 1.3e9
    assert results["model.layer_fraction"] > 0.75


def test_probes_skip_paths_too_slow_for_this_machine(monkeypatch):
    """A matmul slower than SLOW_MATMUL_FLOP_PER_S at a small size (a fallback loop) is reported as unmeasured,
    and no probe call predicted beyond the budget is run, so the benchmark finishes on any CPU."""
    import torch
    from benchmarking import probes
    device = torch.device("cpu")
    shapes = [(64, 64, 64), (4096, 4096, 8192)]
    fast = probes.matmul_peak(device, torch.float32, shapes, 1, budget_s=0.05)
    assert fast["64x64x64"] > 0 and fast["4096x4096x8192"] is None  # ~0.27 TFLOP: far beyond 0.05 s on 2 cores
    monkeypatch.setattr(probes, "SLOW_MATMUL_FLOP_PER_S", float("inf"))
    slow = probes.matmul_peak(device, torch.float32, shapes, 1)
    assert slow == {"64x64x64": None, "4096x4096x8192": None} and probes.best(slow) is None


def test_phases_over_budget_are_reported_not_run(monkeypatch, capsys):
    import torch
    from benchmarking import phases, report
    from tests.helpers import load_fixture_model
    model = load_fixture_model(torch.float32)
    monkeypatch.setattr(phases, "PHASE_BUDGET_S", 0.0)
    results = {}
    phases.run_encode(model, [16, 32], torch.device("cpu"), results, model.config)
    phases.run_eval(model, 1, 32, torch.device("cpu"), results, model.config, prefill_rate=1.0)
    out = capsys.readouterr().out
    assert "Encode 16: n/a" in out and "Encode 32: n/a" in out and "Evaluation: n/a" in out
    assert not any(k.startswith(("prefill.", "eval.")) for k in results)
    results.update({"machine.read_bandwidth_bytes_per_s": 1e9, "run.peak_rss_bytes": 1 << 30, "run.seconds": 1.0})
    report.derive(results, {}, [], [16, 32], 1e9, None)
    lines = report.summary_lines(results, [], [16, 32], "bfloat16", None)
    assert "Prefill 16: MFU n/a" in lines and "Evaluation: n/a of the prefill FLOP rate" in lines


def test_quick_mode_with_offload_reports_the_streaming_figures(tmp_path, demo_dir):
    """--bminf with every layer streamed (the demo's fp16 file read into bf16 slots): per batch, the streaming
    bandwidth probed around that run, the bytes per token and the fraction of that bandwidth decoding reached."""
    out = tmp_path / "bench.json"
    env = {**os.environ, "GLM_DEMO_DIR": demo_dir}
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "benchmark.sh"), "--quick", "--formats", "16bit",
                           "--bminf", "--bminf-memory-limit", "0", "--offload-batch-size", "4",
                           "--encode-lengths", "128", "--json", str(out)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "> BMInf activated, memory limit: 0 GB" in proc.stdout
    results = json.loads(out.read_text())
    layers = results["config.num_layers"]
    assert results["offload.16bit.streamed_layers"] == layers and results["offload.16bit.resident_layers"] == 0
    per_step = results["offload.16bit.streamed_bytes_per_step"]
    h, inner = results["config.hidden_size"], results["config.inner_hidden_size"]
    assert per_step == layers * 2 * (4 * h * h + 3 * inner * h)  # bf16 query_key_value, dense, GeGLU's two
    probes = []
    for b, prefix in ((1, "offload.16bit"), (2, "offload.16bit.batch2"), (4, "offload.16bit.batch4")):
        bw, tps = results[f"{prefix}.stream_bandwidth_bytes_per_s"], results[f"{prefix}.tokens_per_s"]
        assert bw > 0 and tps == results[f"decode.16bit{'' if b == 1 else f'.batch{b}'}.tokens_per_s"]
        assert results[f"{prefix}.streamed_bytes_per_token"] == per_step / b
        assert results[f"{prefix}.stream_fraction"] == pytest.approx(per_step * tps / b / bw)
        assert results[f"{prefix}.streaming_limit_tokens_per_s"] == pytest.approx(b * bw / per_step)
        probes.append(bw)
    assert results["offload.stream_bandwidth_bytes_per_s"] == max(probes)
    assert "Offload: streaming bandwidth up to" in proc.stdout
    assert re.search(r"Offload 16bit: \d+ layers streamed .* batch 1 [\d.]+ tokens/s = [\d.]+ of the streaming limit",
                     proc.stdout), proc.stdout[-2000:]
