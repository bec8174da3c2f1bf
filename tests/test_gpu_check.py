"""tools/gpu_check.py (scripts/gpu_check.sh): the CPU dry run (tiny shapes, Triton's interpreter, every section in
its own time-boxed process) writes gpu-dry-run.json and .log under $OUT and merges a rerun into them; failures and
timeouts of one section are recorded while the others run; the planned budget fits 300 s with correctness first;
and the sections' GPU-only code (graph capture, replayed timing, the layout on the device) runs on the fake GPU of
tests/fake_cuda.py."""
import json
import os
import subprocess
import sys

import pytest

from tests.fake_cuda import fake_gpu  # noqa: F401  (fixture)
from tests.helpers import ROOT, background_process, finished
from tools import gpu_check, gpu_sections

SECTION_KEYS = {
    "env": ["machine.torch", "machine.triton"],
    "kernels": ["kernels.ok"],
    "graph": ["graph.ok", "graph.int4.ids_equal_loop", "graph.fixture.graph_equals_sat"],
    "bench": ["bench.decode.int4.tokens_per_s", "bench.graph_speedup"],
    "slice": [f"slice.{f}.roofline_fraction" for f in ("fp16", "int8", "int4")]
             + ["slice.int4.speedup_vs_fp16", "slice.embedding.roofline_fraction", "prefill.16.mfu"],
    "kernel_times": ["kernels.time.int4.rows1.48x64.fused_us", "kernels.time.int8.rows8.48x64.alt_us"],
    "full": ["full.int4.ms_per_token", "full.int4.roofline_fraction"],
}


def _command(*args):
    return ["bash", str(ROOT / "scripts" / "gpu_check.sh"), "--dry-run", *args]


def _script(out_dir, *args):
    env = {**os.environ, "OUT": str(out_dir)}
    return subprocess.run(_command(*args), cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module", autouse=True)
def dry_run_in_background(request, tmp_path_factory):
    """The full dry run starts with this module and runs while the module's other tests do (it is a chain of
    single-threaded processes, ~20 s: the machine's other core runs it); the tests that read it come last in the
    module and wait for it through `dry_run`. Not started when none of them is selected."""
    if not any(getattr(item, "module", None) is request.module and "dry_run" in item.fixturenames
               for item in request.session.items):
        yield None
        return
    out_dir, logs = tmp_path_factory.mktemp("out"), tmp_path_factory.mktemp("dry_run_output")
    with background_process(_command(), logs, env={**os.environ, "OUT": str(out_dir)}) as proc:
        yield out_dir, logs, proc


@pytest.fixture(scope="module")
def dry_run(dry_run_in_background):
    out_dir, logs, proc = dry_run_in_background
    return out_dir, finished(proc, logs, timeout=300)


def test_the_planned_budget_fits_300_s_with_correctness_first():
    limits = [limit for limit, _ in gpu_check.SECTIONS.values()]
    assert sum(limits) <= gpu_check.TOTAL_LIMIT_S - 5
    assert list(gpu_check.SECTIONS)[:5] == ["env", "kernels", "graph", "bench", "slice"]
    assert list(gpu_check.SECTIONS)[-1] == "full"
    assert gpu_check.SECTIONS["env"][0] + gpu_check.SECTIONS["kernels"][0] <= 60  # the first results in 60 s
    script = (ROOT / "scripts" / "gpu_check.sh").read_text()
    assert f"timeout --signal=TERM --kill-after=10 {gpu_check.TOTAL_LIMIT_S} python3 tools/gpu_check.py" in script


def test_files_are_named_after_the_gpu():
    assert gpu_check.gpu_kind("NVIDIA H100 80GB HBM3") == "h100"
    assert gpu_check.gpu_kind("NVIDIA H200") == "h200"
    assert gpu_check.gpu_kind("NVIDIA A100-SXM4-80GB") == "a100"
    assert gpu_check.gpu_kind("NVIDIA GeForce RTX 3090") == "nvidia-geforce-rtx-3090"
    assert gpu_check.gpu_kind(None) == "unknown"


def test_goals_are_fractions_of_what_the_run_measured():
    results = {"full.int4.roofline_fraction": 0.75, "full.int4.weight_bytes": 67e9,
               "full.machine.read_bandwidth_bytes_per_s": 3.0e12, "slice.int8.roofline_fraction": 0.5}
    goals = gpu_check.goals(results)
    assert goals["goals.full_int4_decode_batch1.met"] is True and goals["goals.slice_int8_decode_batch1.met"] is False
    assert goals["goals.slice_fp16_decode_batch1.met"] is None
    assert goals["goals.full_int4_decode_batch1.target_ms_per_token"] == pytest.approx(67e9 / (0.7 * 3e12) * 1e3)


def test_a_failing_section_is_recorded_and_the_others_run(tmp_path, monkeypatch):
    monkeypatch.setenv("GLM_GPU_CHECK_FAIL", "kernels")
    results, out = gpu_check.drive(["env", "kernels"], True, out=tmp_path / "r.json")
    assert results["sections.kernels.status"] == "failed"
    assert "injected failure" in results["sections.kernels.error"]
    assert results["sections.env.status"] == "ok" and results["run.ok"] is False
    assert json.loads(out.read_text())["sections.kernels.status"] == "failed"


def test_a_section_over_its_time_limit_is_recorded(tmp_path, monkeypatch):
    monkeypatch.setattr(gpu_check, "DRY_RUN_LIMIT_S", 0.2)
    results, _ = gpu_check.drive(["env"], True, out=tmp_path / "t.json")
    assert results["sections.env.status"] == "timeout" and results["run.ok"] is False


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
    args = initialize.parse_args(None, [*gpu_sections.TINY, "--bf16", "--device", "cpu", "--random-init"])
    model = initialize.build_model(args)
    results = {}
    run_graph_decode(model, "16bit", 4, 3, {("16bit", 1): {"step_ms_median": 5.0}}, results)
    for key in ("graph.ms_per_token", "static_eager.ms_per_token", "graph_speedup", "graph_speedup_vs_static_eager"):
        assert results[f"decode.16bit.{key}"] > 0


@pytest.mark.parametrize("name", ["graph", "slice", "kernel_times", "full"])
def test_sections_on_the_fake_gpu(name, fake_gpu, tmp_path):
    """The sections' CUDA code at tiny sizes on a CUDA device that does not exist: graph capture of the decode step,
    kernels replayed from a graph, the layout built on the device, the fixture loaded there."""
    import initialize
    initialize.initialize(None, [*gpu_sections.TINY, "--device", "cuda", "--random-init"])
    ctx = gpu_sections.Context(True, tmp_path / "part", device="cuda")
    out = getattr(gpu_sections, f"section_{name}")(ctx)
    assert not any(k.endswith(".error") for k in out), out
    assert fake_gpu.captures > 0 and fake_gpu.replays > 0
    expected = {"graph": "graph.ok", "slice": "slice.int4.batch8.ms_per_token",
                "kernel_times": "kernels.time.int4.rows1.48x64.alt_us", "full": "full.int4.roofline_fraction"}[name]
    assert out[expected]
    assert json.loads((tmp_path / "part").read_text())["machine.gpu"] == "Fake CUDA device (tests/fake_cuda.py)"


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


# The tests that read the background dry run: last, so that the tests above run while it does.
def test_dry_run_writes_every_section_under_out(dry_run):
    out_dir, proc = dry_run
    results = json.loads((out_dir / "gpu-dry-run.json").read_text())
    assert proc.returncode == 0, (proc.stdout[-2000:], proc.stderr[-2000:], results)
    assert sorted(p.name for p in out_dir.iterdir()) == ["gpu-dry-run.json", "gpu-dry-run.log"]  # nothing else left
    for section, keys in SECTION_KEYS.items():
        assert results[f"sections.{section}.status"] == "ok"
        for key in keys:
            assert key in results, key
    assert results["kernels.ok"] is True and results["graph.ok"] is True and results["run.dry_run"] is True
    assert all(results[f"graph.{f}.ids_equal_static_eager"] for f in ("fp16", "int8", "int4"))
    assert results["graph.fixture.loop_equals_sat"] is True
    assert results["full.int4.ms_per_token"] > 0 and results["slice.int4.speedup_vs_fp16"] > 0
    for name, (key, target) in gpu_check.GOALS.items():
        assert results[f"goals.{name}.target"] == target and results[f"goals.{name}.measured"] == results.get(key)
    assert results["goals.full_int4_decode_batch1.target_ms_per_token"] > 0
    assert (out_dir / "gpu-dry-run.log").read_text().count("=== section") == 2 * len(SECTION_KEYS)


def test_a_rerun_of_some_sections_merges_into_the_json(dry_run):
    """The rerun sections' keys are replaced (a stale one disappears), the others are kept, the log grows."""
    out_dir, _ = dry_run
    path = out_dir / "gpu-dry-run.json"
    before = json.loads(path.read_text())
    path.write_text(json.dumps({**before, "graph.stale": 1, "slice.kept": 2}))
    proc = _script(out_dir, "--sections", "graph")
    after = json.loads(path.read_text())
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "graph.stale" not in after and after["slice.kept"] == 2 and after["run.sections"] == "graph"
    assert after["sections.graph.seconds"] != before["sections.graph.seconds"]
    assert {k: v for k, v in after.items() if k.startswith(("bench.", "full.", "kernels."))} == \
        {k: v for k, v in before.items() if k.startswith(("bench.", "full.", "kernels."))}
    assert (out_dir / "gpu-dry-run.log").read_text().count("=== section") == 2 * (len(SECTION_KEYS) + 1)
