"""tools/gpu_check.py (scripts/gpu_check.sh) in its CPU dry-run mode: tiny shapes, Triton's interpreter, every
section in its own time-boxed process; the JSON carries the keys issue 12 asks for; failures and timeouts of one
section are recorded while the others run."""
import json
import subprocess
import sys

from tests.helpers import ROOT
from tools import gpu_check

SECTION_KEYS = {
    "env": ["machine.torch", "machine.triton"],
    "kernels": ["kernels.ok"],
    "graph": ["graph.ok", "graph.int4.ids_equal_loop"],
    "bench": ["bench.decode.int4.tokens_per_s", "bench.graph_speedup"],
    "slice": [f"slice.{f}.roofline_fraction" for f in ("fp16", "int8", "int4")] + ["slice.int4.speedup_vs_fp16"],
    "full": ["full.int4.ms_per_token", "full.int4.roofline_fraction"],
}


def test_dry_run_writes_every_section(tmp_path):
    out = tmp_path / "dry.json"
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), "--dry-run", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    results = json.loads(out.read_text())
    assert proc.returncode == 0, (proc.stdout[-2000:], proc.stderr[-2000:], results)
    for section, keys in SECTION_KEYS.items():
        assert results[f"sections.{section}.status"] == "ok"
        for key in keys:
            assert key in results, key
    assert results["kernels.ok"] is True and results["graph.ok"] is True and results["run.dry_run"] is True
    assert all(results[f"graph.{f}.ids_equal_static_eager"] for f in ("fp16", "int8", "int4"))
    assert results["full.int4.ms_per_token"] > 0 and results["slice.int4.speedup_vs_fp16"] > 0
    assert (tmp_path / "dry.log").read_text().count("=== section") == 2 * len(SECTION_KEYS)


def test_a_failing_section_is_recorded_and_the_others_run(tmp_path, monkeypatch):
    monkeypatch.setenv("GLM_GPU_CHECK_FAIL", "kernels")
    out = tmp_path / "r.json"
    results = gpu_check.drive(out, tmp_path / "r.log", True, ["env", "kernels", "graph"])
    assert results["sections.kernels.status"] == "failed"
    assert "injected failure" in results["sections.kernels.error"]
    assert results["sections.env.status"] == results["sections.graph.status"] == "ok"
    assert results["graph.ok"] is True and results["run.ok"] is False
    assert json.loads(out.read_text())["sections.kernels.status"] == "failed"


def test_a_section_over_its_time_limit_is_recorded(tmp_path, monkeypatch):
    monkeypatch.setattr(gpu_check, "DRY_RUN_LIMIT_S", 0.2)
    results = gpu_check.drive(tmp_path / "t.json", tmp_path / "t.log", True, ["env"])
    assert results["sections.env.status"] == "timeout" and results["run.ok"] is False


def test_gpu_budget_fits_eight_minutes():
    assert sum(gpu_check.SECTIONS.values()) <= 460


def test_inference_path_does_not_import_deepspeed():
    """The GPU machine has no deepspeed: importing what the check runs must not need it."""
    code = ("import sys, builtins; real = builtins.__import__\n"
            "def guard(name, *a, **k):\n"
            "    if name.split('.')[0] == 'deepspeed': raise ImportError('no deepspeed here')\n"
            "    return real(name, *a, **k)\n"
            "builtins.__import__ = guard\n"
            "import initialize, benchmark, generation.graph_decode, benchmarking.gpu, tools.gpu_check, evaluation.model\n"
            "import quantization, kernels.triton_matmul\n")
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=120)


def test_benchmark_graph_decode_phase_runs_eagerly_on_cpu():
    """benchmark.py's CUDA-only graph phase, run eagerly on a tiny random model: its keys and ratios."""
    import initialize
    from benchmarking.gpu import run_graph_decode
    args = initialize.parse_args(None, [*gpu_check.TINY, "--bf16", "--device", "cpu", "--random-init"])
    model = initialize.build_model(args)
    results = {}
    run_graph_decode(model, "16bit", 4, 3, {("16bit", 1): {"step_ms_median": 5.0}}, results)
    for key in ("graph.ms_per_token", "static_eager.ms_per_token", "graph_speedup", "graph_speedup_vs_static_eager"):
        assert results[f"decode.16bit.{key}"] > 0


def test_sigterm_stops_the_running_section_and_keeps_the_json(tmp_path):
    """scripts/gpu_check.sh's overall limit sends SIGTERM: the section's processes end, the JSON says where."""
    import signal
    import time
    out, log = tmp_path / "s.json", tmp_path / "s.log"
    proc = subprocess.Popen([sys.executable, str(ROOT / "tools" / "gpu_check.py"), "--dry-run", "--sections", "env",
                             "kernels", "--out", str(out)], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while time.time() < deadline and not (log.exists() and "=== section env" in log.read_text()):
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 1
    results = json.loads(out.read_text())
    assert results["sections.env.status"] in ("stopped", "ok") and results["run.ok"] is False
    assert "sections.kernels.status" not in results or results["sections.kernels.status"] == "stopped"
