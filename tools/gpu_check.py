"""The GPU check (scripts/gpu_check.sh): correctness first (the fused kernels, graph decoding, generate.py's greedy
ids on the SAT fixture), then benchmark.py on the benchmark config, an 8-layer GLM-130B slice per weight format,
the kernels' timings, and the full-size INT4 GLM-130B, in at most 300 s (docs/gpu.md).

    python3 tools/gpu_check.py                        # $OUT/gpu-<gpu>.json and .log ($OUT unset: docs/results/)
    python3 tools/gpu_check.py --sections slice full  # rerun some sections: merged into the existing JSON
    python3 tools/gpu_check.py --dry-run              # CPU, tiny shapes, TRITON_INTERPRET=1 (gpu-dry-run.json)

Every section runs in its own process with its own time limit (a CUDA error poisons a process's context; a hung
kernel cannot be interrupted in-process), so one section's failure or timeout is recorded in the JSON
(sections.<name>.status / .error) and the others still run. The files are named after the GPU the first section
finds (torch.cuda.get_device_name: gpu-h100.json, gpu-h200.json). The JSON is flat with dotted keys, as
benchmark.py --json; it is rewritten after every section, merged with what an earlier run of the same GPU wrote
(the keys of the sections run again are replaced), so a run cut short or a partial rerun keeps everything measured.
Goals are fractions of the read bandwidth and matmul peak measured in the same run (`goals.*`).
"""
import argparse
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tools import gpu_sections  # noqa: E402

# name -> (seconds allowed on the GPU, the key prefixes it writes), in the order they run. The limits add up to
# 295 s; scripts/gpu_check.sh stops everything at 300 s. env's limit covers a cold torch import and CUDA start.
SECTIONS = {
    "env": (30, ("machine.",)),
    "kernels": (25, ("kernels.ok", "kernels.check.")),
    "graph": (40, ("graph.",)),
    "bench": (55, ("bench.",)),
    "slice": (60, ("slice.", "prefill.")),
    "kernel_times": (35, ("kernels.time.", "kernels.machine.")),
    "full": (50, ("full.",)),
}
TOTAL_LIMIT_S = 300
DRY_RUN_LIMIT_S = 120
# name -> (result key, target): fractions of the bandwidth / matmul peak measured in the same run, never ms
GOALS = {
    "full_int4_decode_batch1": ("full.int4.roofline_fraction", 0.70),
    "slice_fp16_decode_batch1": ("slice.fp16.roofline_fraction", 0.80),
    "slice_int8_decode_batch1": ("slice.int8.roofline_fraction", 0.70),
    "slice_int4_decode_batch1": ("slice.int4.roofline_fraction", 0.60),
    "prefill_2048_mfu": ("prefill.2048.mfu", 0.60),
}
SUMMARY = ("kernels.ok", "graph.ok", "graph.fixture.graph_equals_sat", "bench.graph_speedup", "slice.graph_speedup",
           "slice.int4.speedup_vs_fp16", "slice.embedding.roofline_fraction", "full.int4.ms_per_token")


def gpu_kind(name: Optional[str]) -> str:
    """The file-name part for a GPU name: "NVIDIA H100 80GB HBM3" -> h100, "NVIDIA H200" -> h200."""
    if not name:
        return "unknown"
    model = re.search(r"\b([A-Z]{1,2}\d{2,4}[A-Z]?)\b", name.upper().replace("NVIDIA", ""))
    return model.group(1).lower() if model else re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def default_out_dir() -> Path:
    """$OUT (what comes back from a lent GPU machine) when set, else docs/results."""
    return Path(os.environ["OUT"]) if os.environ.get("OUT") else ROOT / "docs" / "results"


# ---------------------------------------------------------------------------------------------------------------
# In a section's process

def run_section(name: str, dry_run: bool, part: Path) -> None:
    """Run one section, write its results to `part`."""
    gpu_sections.stub_absent_modules()
    import initialize
    import torch
    ctx = gpu_sections.Context(dry_run, part)
    ctx.checkpoint({})  # the GPU's name, at once: the check's files are named after it
    initialize.initialize(None, [*gpu_sections.TINY, "--device", str(ctx.device), "--random-init"])
    torch.backends.cuda.matmul.allow_tf32 = False
    if os.environ.get("GLM_GPU_CHECK_FAIL") == name:  # tests: a failing section must not stop the others
        raise RuntimeError(f"injected failure in section {name}")
    fn = getattr(gpu_sections, f"section_{name}")
    ctx.checkpoint(fn(ctx, part) if name == "bench" else fn(ctx))


# ---------------------------------------------------------------------------------------------------------------
# The driver

class _Stopped(Exception):
    """SIGTERM (scripts/gpu_check.sh's overall time limit): stop the running section, keep what was measured."""


def _on_sigterm(signum, frame):
    raise _Stopped()


class Files:
    """Where the JSON and the log go. Until a section has named the GPU, the log is a temporary file in the output
    folder; the JSON is written once the name is known (or at the end, as gpu-unknown.json)."""

    def __init__(self, out: Optional[Path], log: Optional[Path], out_dir: Path, dry_run: bool):
        self.out_dir = out_dir
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.out = out
        self.log = log or (out.with_suffix(".log") if out else None)
        if self.out is None and dry_run:
            self.name("dry-run")
        self.pending_log = None if self.log else out_dir / f"gpu-check-{os.getpid()}.partial.log"
        self.previous: Optional[dict] = None

    def name(self, kind: str) -> None:
        self.out = self.out or self.out_dir / f"gpu-{kind}.json"
        self.log = self.log or self.out.with_suffix(".log")

    def log_path(self) -> Path:
        return self.log or self.pending_log

    def settle_log(self) -> None:
        """Once named: what the temporary log holds goes to the end of the real one."""
        if self.pending_log is not None and self.log is not None and self.pending_log.exists():
            with open(self.log, "a") as log, open(self.pending_log) as pending:
                log.write(pending.read())
            self.pending_log.unlink()
            self.pending_log = None

    def load_previous(self) -> dict:
        if self.previous is None:
            self.previous = json.loads(self.out.read_text()) if self.out and self.out.exists() else {}
        return self.previous


def merged(previous: dict, results: dict, sections) -> dict:
    """An earlier run's results without the keys of the sections run now (nor its run.* keys), updated with this
    run's, and the goals computed over the whole."""
    owned = tuple(p for name in sections for p in SECTIONS[name][1]) + tuple(f"sections.{n}." for n in sections)
    out = {k: v for k, v in previous.items() if not k.startswith(owned + ("run.", "goals."))}
    out.update(results)
    out.update(goals(out))
    return out


def goals(results: dict) -> dict:
    """goals.<name>.{target, measured, met}; for the full model also the ms per token the target means on the
    bandwidth this run measured."""
    out = {}
    for name, (key, target) in GOALS.items():
        measured = results.get(key)
        out[f"goals.{name}.target"] = target
        out[f"goals.{name}.measured"] = measured
        out[f"goals.{name}.met"] = None if measured is None else bool(measured >= target)
    nbytes, bandwidth = results.get("full.int4.weight_bytes"), results.get("full.machine.read_bandwidth_bytes_per_s")
    if nbytes and bandwidth:
        target = GOALS["full_int4_decode_batch1"][1]
        out["goals.full_int4_decode_batch1.target_ms_per_token"] = nbytes / (target * bandwidth) * 1e3
    return out


def _write(path: Path, results: dict) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps({k: results[k] for k in sorted(results)}, indent=1, default=str))
    os.replace(tmp, path)


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
        return "failed", f"exit {proc.returncode}: {gpu_sections.last_line(stderr)}"
    return "ok", None


def drive(sections, dry_run: bool, out: Optional[Path] = None, log: Optional[Path] = None,
          out_dir: Optional[Path] = None):
    """Run the sections in order; returns (results of the whole JSON, its path)."""
    env = dict(os.environ)
    if dry_run:
        env["TRITON_INTERPRET"] = "1"
        env.setdefault("GLM_CPU_KERNELS", "0")  # no C++ build in a dry run: PyTorch's CPU paths
    files = Files(out, log, out_dir or default_out_dir(), dry_run)
    results = {"run.started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "run.dry_run": dry_run,
               "run.sections": ",".join(sections)}
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        for name in sections:
            if not _drive_section(name, dry_run, env, files, results):
                break
    except _Stopped:  # between two sections
        results["run.stopped"] = True
    finally:
        signal.signal(signal.SIGTERM, previous)
    files.name(gpu_kind(results.get("machine.gpu")))
    files.settle_log()
    whole = merged(files.load_previous(), results, _ran(results))
    whole["run.ok"] = (all(whole[k] == "ok" for k in whole if k.startswith("sections.") and k.endswith(".status"))
                       and bool(whole.get("kernels.ok", True)) and bool(whole.get("graph.ok", True))
                       and not any(k.endswith(".error") for k in whole))
    _write(files.out, whole)
    return whole, files.out


def _drive_section(name, dry_run, env, files: Files, results: dict) -> bool:
    """Run one section, add its results and status, rewrite the JSON (once its name is known). False when stopped."""
    limit = DRY_RUN_LIMIT_S if dry_run else SECTIONS[name][0]
    part = files.out_dir / f"gpu-check-{os.getpid()}.{name}.part"
    part.unlink(missing_ok=True)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--section", name, "--part", str(part)]
    cmd += ["--dry-run"] if dry_run else []
    start = time.perf_counter()
    stopped = False
    with open(files.log_path(), "a") as log_file:
        log_file.write(f"=== section {name} (limit {limit} s)\n")
        log_file.flush()
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
    if results.get("machine.gpu") and files.out is None:
        files.name(gpu_kind(results["machine.gpu"]))
    if files.out is not None:
        files.settle_log()
        _write(files.out, merged(files.load_previous(), results, _ran(results)))
    return not stopped


def _ran(results: dict):
    return [name for name in SECTIONS if f"sections.{name}.status" in results]


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--benchmark"]:  # benchmark.py, with the stand-ins of stub_absent_modules
        gpu_sections.stub_absent_modules()
        import benchmark
        benchmark.main(argv[1:])
        return 0
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out-dir", default=None, help="default: $OUT when set, else docs/results")
    p.add_argument("--out", default=None, help="the JSON's path (default: <out-dir>/gpu-<gpu>.json)")
    p.add_argument("--log", default=None, help="default: the JSON's path with .log")
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes, Triton's interpreter")
    p.add_argument("--sections", nargs="+", default=list(SECTIONS), choices=list(SECTIONS))
    p.add_argument("--section", default=None, help=argparse.SUPPRESS)
    p.add_argument("--part", default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.section:
        run_section(a.section, a.dry_run, Path(a.part))
        return 0
    results, out = drive(a.sections, a.dry_run, Path(a.out) if a.out else None, Path(a.log) if a.log else None,
                         Path(a.out_dir) if a.out_dir else None)
    for key in SUMMARY:
        print(f"{key} = {results.get(key)}")
    for name in GOALS:
        print(f"goal {name}: {results.get(f'goals.{name}.measured')} (target {GOALS[name][1]}, "
              f"met: {results.get(f'goals.{name}.met')})")
    for name in a.sections:
        print(f"section {name}: {results.get(f'sections.{name}.status')} {results.get(f'sections.{name}.error') or ''}")
    print(f"> wrote {out}")
    return 0 if results["run.ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
