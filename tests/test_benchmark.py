"""benchmark.py: the quick mode (demo model) as a smoke test, the FLOP/byte arithmetic, and (slow) the full run.

No timing assertions: the figures depend on the machine and its other tenants.
"""
import json
import os
import subprocess
import sys

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
    for key in required_keys(lengths) | {"machine.read_bandwidth_bytes_per_s", "machine.matmul_peak_bfloat16_flop_per_s",
                                         "run.peak_rss_bytes", "decode.int4.speedup_vs_16bit",
                                         "decode.int8.speedup_vs_16bit"}:
        assert isinstance(results[key], (int, float)) and results[key] > 0, f"{key} = {results[key]!r}"
    for n in lengths:
        assert results[f"prefill.{n}.ms"] > 0
    # weight bytes per decode step shrink with the format
    assert (results["decode.16bit.weight_bytes_per_step"] > results["decode.int8.weight_bytes_per_step"]
            > results["decode.int4.weight_bytes_per_step"])


def test_quick_mode_writes_all_figures(tmp_path, demo_dir):
    out = tmp_path / "bench.json"
    env = {**os.environ, "GLM_DEMO_DIR": demo_dir}
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "benchmark.sh"), "--quick", "--json", str(out)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for n in (128, 512):
        assert f"Encode {n}: " in proc.stdout  # the original's line
    results = json.loads(out.read_text())
    check_results(results, (128, 512))
    assert results["config.quick"] is True and results["config.num_layers"] == 4


def test_flop_and_byte_arithmetic():
    sys.path.insert(0, str(ROOT))
    import torch
    import benchmark
    from model import GLMConfig
    from tests.helpers import load_fixture_model
    cfg = GLMConfig(num_layers=32, hidden_size=1536, num_attention_heads=12, inner_hidden_size=4096, vocab_size=150528)
    per_layer = 4 * 1536 ** 2 + 3 * 4096 * 1536
    assert benchmark.linear_params_per_layer(cfg) == per_layer
    n = 512
    expected = 2 * n * 32 * per_layer + 4 * 32 * n * n * 1536 + 2 * 3 * 1536 * 150528
    assert benchmark.forward_flops(cfg, n, 3) == pytest.approx(expected)
    model = load_fixture_model(torch.bfloat16)
    params = sum(p.numel() for p in model.parameters())
    assert benchmark.weight_bytes(model) == 2 * params


def test_synthetic_multiple_choice_batch_layout():
    sys.path.insert(0, str(ROOT))
    import benchmark
    batch, rows = benchmark.synthetic_multiple_choice(2, 64)
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
