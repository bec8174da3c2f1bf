"""Building the CPU kernels (kernels/build.py) survives killed builds: nothing a later run waits on is left behind.

A build is killed mid-compile (SIGKILL to the Python process only, the worst case: its compiler processes keep
running), and the next run must finish, say in one line what it cleaned up, and load the kernels; a lock file and
a build folder left by a builder that is gone are recovered from; a live builder is waited for with one line said.
Each scenario runs in subprocesses with its own TORCH_EXTENSIONS_DIR, seeded with a complete build of the avx2 tier
(the smallest) from the kernel cache this machine's test runs share; a build then compiles only what a scenario
removes from it.
"""
import fcntl
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kernels import build

ROOT = Path(__file__).resolve().parent.parent
TIER = "avx2"
NAME = build.library_name(TIER)
LOAD = f"import sys; sys.path.insert(0, {str(ROOT)!r}); from kernels import cpu; print(cpu.tier())"

pytestmark = pytest.mark.skipif(not build.supported(TIER, build.cpu_flags()), reason="this CPU lacks AVX2")


def _env(root):
    return dict(os.environ, TORCH_EXTENSIONS_DIR=str(root), GLM_CPU_KERNELS=TIER)


def _load(root, timeout=300):
    proc = subprocess.run([sys.executable, "-c", LOAD], env=_env(root), capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split() == [TIER], proc.stdout + proc.stderr[-3000:]
    return proc.stderr


def _dead_pid():
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


# The object the killed build compiles (the tier's own GEMV source: ~10 s to compile, so the build is surely still
# compiling when it is killed 2 s after starting).
OBJECT = "gemv_fma.o"


@pytest.fixture(scope="module")
def ext_root(tmp_path_factory):
    """A private TORCH_EXTENSIONS_DIR holding a complete, installed avx2 build, copied from the shared kernel cache
    (built there first if missing: test_cpu_kernels.py builds it too), under the cache's build lock."""
    root = tmp_path_factory.mktemp("torch_extensions")
    shared_env = dict(os.environ, GLM_CPU_KERNELS=TIER)
    proc = subprocess.run([sys.executable, "-c", LOAD], env=shared_env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and proc.stdout.split() == [TIER], proc.stderr[-3000:]
    shared = build.build_root()
    with build.BuildLock(shared / f"{NAME}.lock", f"CPU kernels ({NAME})"):
        shutil.copytree(shared / NAME, root / NAME, ignore=shutil.ignore_patterns("lock"), symlinks=True)
    assert (root / NAME / "build_key").read_text().strip() == build._build_key(TIER)
    assert (root / NAME / OBJECT).is_file() and (root / NAME / f"{NAME}.so").is_file()
    return root


def test_killed_build_is_recovered(ext_root):
    installed = ext_root / NAME
    (installed / "build_key").unlink()  # the next run must build again ...
    (installed / OBJECT).unlink()  # ... and compile this object from scratch (the others are reused)
    builder = subprocess.Popen([sys.executable, "-c", LOAD], env=_env(ext_root), stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        line = builder.stderr.readline()  # the build announces itself before it starts compiling
        assert line.startswith(f"> Compiling the CPU kernels for tier {TIER}"), line
        work = ext_root / f"{NAME}.build-{builder.pid}"
        deadline = time.time() + 60
        while not (work / "build.ninja").exists() and time.time() < deadline:
            time.sleep(0.1)
        time.sleep(2.0)  # the compiler is running now (this compile takes ~10 s)
        assert builder.poll() is None, "the build finished before it could be killed"
        os.kill(builder.pid, signal.SIGKILL)  # only the Python process: ninja and the compiler live on
        builder.wait(timeout=30)
        assert (work / "lock").exists(), "torch's build lock should be left behind by the killed build"
        # an unfinished build must never be installed: the installed folder is still the one the build started from
        assert not (installed / "build_key").exists() and not (installed / OBJECT).exists()
        assert not list(ext_root.glob(f"{NAME}.old-*"))

        start = time.time()
        err = _load(ext_root)
        assert f"process {builder.pid} stopped while building {NAME}" in err, err
        assert f"> CPU kernels: {TIER}" in err
        assert (ext_root / NAME / f"{NAME}.so").is_file() and (ext_root / NAME / OBJECT).is_file()
        assert (ext_root / NAME / "build_key").read_text().strip() == build._build_key(TIER)
        print(f"rebuilt in {time.time() - start:.1f} s")
        err = _load(ext_root, timeout=120)  # now cached: loads without compiling
        assert "Compiling" not in err and "stopped while building" not in err, err
    finally:
        try:
            os.killpg(builder.pid, signal.SIGKILL)  # the killed build's orphaned compilers, if still running
        except ProcessLookupError:
            pass


def test_leftover_lock_of_a_dead_builder_is_recovered(ext_root):
    if not (ext_root / NAME / f"{NAME}.so").is_file():
        _load(ext_root)
    dead = _dead_pid()
    (ext_root / f"{NAME}.lock").write_text(f"{dead}\n")  # the builder died holding the lock ...
    stale = ext_root / f"{NAME}.build-{dead}"
    stale.mkdir()
    (stale / "lock").write_text("")  # ... with torch's lock in its unfinished build folder
    (ext_root / NAME / "lock").write_text("")  # a torch lock in the installed folder is ignored too
    (ext_root / NAME / "build_key").unlink()  # make the next run (re)build: from the cached objects, no compile
    err = _load(ext_root, timeout=120)
    assert f"process {dead} stopped while building {NAME}" in err, err
    assert not stale.exists() and (ext_root / NAME / "build_key").is_file()


def test_live_builder_is_waited_for_with_one_line(ext_root):
    if not (ext_root / NAME / f"{NAME}.so").is_file():
        _load(ext_root)
    (ext_root / NAME / "build_key").unlink()  # the next run needs the build lock
    lock_path = ext_root / f"{NAME}.lock"
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # this test process is the live builder
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        waiter = subprocess.Popen([sys.executable, "-c", LOAD], env=_env(ext_root), stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True)
        line = waiter.stderr.readline()
        assert line.startswith(f"> Waiting for process {os.getpid()}, which is building"), line
        assert waiter.poll() is None
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
    out, err = waiter.communicate(timeout=120)
    assert waiter.returncode == 0 and out.split() == [TIER], err[-3000:]
    assert "stopped while building" not in err  # a builder that released its lock is not a dead one
