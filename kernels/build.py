"""Choosing, building and loading one tier of the compiled CPU kernels (kernels/csrc/).

Tiers, best first, each a separately compiled library registering the same ops under torch.ops.glm_cpu (so one
tier is loaded per process):

  avx512bf16  AVX-512 F/BW/VL/DQ + BF16: bf16 dot products (vdpbf16ps)          gemv_avx512bf16.cpp
  avx512      AVX-512 F/BW/VL/DQ: bf16 widened to fp32 + FMA on 16 lanes, INT8 by     gemv_fma.cpp
              16-bit integer products, INT4 by byte products
  avx2        AVX2 + FMA + F16C: the same on 8 lanes                              gemv_fma.cpp
  none        PyTorch ops

`GLM_CPU_KERNELS` picks one: unset, "1" or "auto" = the best this CPU runs (read from /proc/cpuinfo); a tier name
forces it (one warning and the best supported lower tier, or PyTorch, if this CPU cannot run it); "0" = PyTorch.

Building is safe against killed builds: each build runs in a private folder (`<name>.build-<pid>`) and is renamed
into place (`<name>/`, with a `build_key` of the sources and flags) only when it is complete, so an interrupted
build never leaves anything a later run would wait on or load. An flock (released by the kernel when its holder
dies) keeps two processes from building the same tier at once; a process that finds it taken says so in one line
and waits; a leftover lock file or build folder of a process that is gone is reported in one line and cleaned up.
"""
import errno
import fcntl
import hashlib
import os
import shutil
import sys
import warnings
from pathlib import Path
from typing import Dict, Iterable, Optional, Set, Tuple

import torch

CSRC = Path(__file__).resolve().parent / "csrc"
_COMMON_SOURCES = ("ops.cpp", "decode_step.cpp", "read_sum.cpp", "convert.cpp")
_AVX512 = ("avx512f", "avx512bw", "avx512vl", "avx512dq")

# name -> (CPU flags it needs, compiler flags, its GEMV source); best first.
TIERS: Dict[str, Tuple[Tuple[str, ...], Tuple[str, ...], str]] = {
    "avx512bf16": (_AVX512 + ("avx512_bf16", "fma", "f16c"),
                   ("-mavx2", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx512bf16", "-mfma", "-mf16c"),
                   "gemv_avx512bf16.cpp"),
    "avx512": (_AVX512 + ("fma", "f16c"),
               ("-mavx2", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c"), "gemv_fma.cpp"),
    "avx2": (("avx2", "fma", "f16c"), ("-mavx2", "-mfma", "-mf16c"), "gemv_fma.cpp"),
}
NONE = "none"
_OFF = ("0", "none", "off", "false", "no")
_AUTO = ("", "1", "auto", "on", "true", "yes")


def cpu_flags() -> Set[str]:
    """The CPU's feature flags from /proc/cpuinfo (empty where there is none)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def supported(tier: str, flags: Iterable[str]) -> bool:
    return tier == NONE or set(TIERS[tier][0]) <= set(flags)


def choose_tier(request: Optional[str], flags: Iterable[str]) -> Tuple[str, Optional[str]]:
    """(tier to load, warning or None) for a GLM_CPU_KERNELS value on a CPU with these flags."""
    flags = set(flags)
    value = (request or "").strip().lower()
    names = list(TIERS)
    if value in _OFF:
        return NONE, None
    if value in _AUTO or value not in TIERS:
        best = next((t for t in names if supported(t, flags)), NONE)
        if value not in _AUTO:
            return best, (f"GLM_CPU_KERNELS={request!r} is not one of 0, 1, auto, {', '.join(names)}; "
                          f"using {best if best != NONE else 'PyTorch ops'}")
        if best == NONE:
            missing = [f for f in TIERS["avx2"][0] if f not in flags]
            return NONE, f"fast CPU kernels disabled: this CPU lacks {', '.join(missing)}; using PyTorch ops"
        return best, None
    if supported(value, flags):
        return value, None
    lower = next((t for t in names[names.index(value) + 1:] if supported(t, flags)), NONE)
    missing = [f for f in TIERS[value][0] if f not in flags]
    return lower, (f"GLM_CPU_KERNELS={value}: this CPU lacks {', '.join(missing)}; "
                   f"using {lower if lower != NONE else 'PyTorch ops'}")


def library_name(tier: str) -> str:
    return f"glm_cpu_kernels_{tier}"


def build_root() -> Path:
    """Where the libraries are cached: $TORCH_EXTENSIONS_DIR, else torch's default extension folder."""
    if os.environ.get("TORCH_EXTENSIONS_DIR"):
        return Path(os.environ["TORCH_EXTENSIONS_DIR"])
    from torch.utils.cpp_extension import get_default_build_root
    return Path(get_default_build_root()) / f"py{sys.version_info.major}{sys.version_info.minor}_cpu"


def _sources(tier: str):
    return [CSRC / s for s in _COMMON_SOURCES + (TIERS[tier][2],)]


def _cflags(tier: str):
    return ["-O3", *TIERS[tier][1], f"-DGLM_TIER={tier}", "-std=c++17", "-fopenmp"]


def _build_key(tier: str) -> str:
    """Changes whenever anything the library is built from changes (every file of csrc/, flags, torch)."""
    h = hashlib.sha256()
    for path in sorted(CSRC.iterdir()):
        if path.is_file():
            h.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    h.update(" ".join(_cflags(tier)).encode())
    h.update(torch.__version__.encode())
    h.update(str(torch._C._GLIBCXX_USE_CXX11_ABI).encode())
    return h.hexdigest()[:20]


def _installed(folder: Path, name: str, key: str) -> Optional[Path]:
    so = folder / f"{name}.so"
    try:
        if so.is_file() and (folder / "build_key").read_text().strip() == key:
            return so
    except OSError:
        pass
    return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class BuildLock:
    """An exclusive flock on `path` for the duration of a build. The kernel drops it when the holder dies, so a
    lock file left behind by a killed process never blocks anyone; waiting on a live holder is said in one line."""

    def __init__(self, path: Path, what: str):
        self.path, self.what, self.fd = path, what, None

    def __enter__(self):
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(self.fd, 32, 0).decode(errors="replace").strip() or "?"
            print(f"> Waiting for process {holder}, which is building the {self.what} (lock {self.path})",
                  file=sys.stderr, flush=True)
            fcntl.flock(self.fd, fcntl.LOCK_EX)
        except OSError as e:  # a filesystem without flock: build unlocked rather than not at all
            if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                raise
            return self
        try:
            previous = int(os.pread(self.fd, 32, 0).decode().strip() or 0)
        except ValueError:
            previous = 0
        if previous and previous != os.getpid() and not _alive(previous):
            self.stale_holder = previous
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, f"{os.getpid()}\n".encode(), 0)
        return self

    stale_holder = 0  # the pid of a builder that died holding the lock (its lock file was left behind)

    def __exit__(self, *exc):
        try:
            os.ftruncate(self.fd, 0)  # an empty lock file: no build in progress
        finally:
            os.close(self.fd)  # releases the flock


def _clean_leftovers(root: Path, name: str, stale_holder: int) -> None:
    """Remove the private build folders of builders that are gone (we hold the lock: no live builder owns one)."""
    left = sorted(p for p in root.glob(f"{name}.*-*") if p.is_dir() and p.name.rsplit("-", 1)[-1].isdigit()
                  and p.name.split(".")[-1].split("-")[0] in ("build", "old"))
    pids = sorted({int(p.name.rsplit("-", 1)[-1]) for p in left} | ({stale_holder} if stale_holder else set()))
    if pids:
        print(f"> CPU kernels: process {', '.join(map(str, pids))} stopped while building {name} (its lock or "
              f"unfinished build was left in {root}); cleaning up and building again", file=sys.stderr, flush=True)
    for p in left:
        shutil.rmtree(p, ignore_errors=True)


def load(tier: str, verbose: bool = False) -> Path:
    """Load the tier's library into this process, building it first if needed; returns the library's path.
    Raises on a failed build (no compiler, ...)."""
    from torch.utils import cpp_extension
    name = library_name(tier)
    root = build_root()
    root.mkdir(parents=True, exist_ok=True)
    final = root / name
    key = _build_key(tier)
    so = _installed(final, name, key)
    if so is not None:
        try:
            torch.ops.load_library(str(so))
            return so
        except OSError:  # replaced by a concurrent rebuild between the check and the load: take the lock below
            pass
    with BuildLock(root / f"{name}.lock", f"CPU kernels ({name})") as lock:
        so = _installed(final, name, key)  # built by the process we waited for
        if so is not None:
            torch.ops.load_library(str(so))
            return so
        _clean_leftovers(root, name, lock.stale_holder)
        work = root / f"{name}.build-{os.getpid()}"
        shutil.rmtree(work, ignore_errors=True)
        if final.is_dir():  # start from the previous build's objects: ninja recompiles only what changed
            shutil.copytree(final, work, ignore=shutil.ignore_patterns("lock", "build_key"), symlinks=True)
        work.mkdir(exist_ok=True)
        print(f"> Compiling the CPU kernels for tier {tier} (once, about 30 s; cached in {final})",
              file=sys.stderr, flush=True)
        try:
            cpp_extension.load(name=name, sources=[str(s) for s in _sources(tier)], extra_cflags=_cflags(tier),
                               extra_include_paths=[str(CSRC)], extra_ldflags=["-fopenmp"],
                               build_directory=str(work), is_python_module=False, verbose=verbose)
            (work / "build_key").write_text(key + "\n")
            old = root / f"{name}.old-{os.getpid()}"
            if final.exists():
                os.rename(final, old)
            os.rename(work, final)  # complete builds only ever appear under the final name
            shutil.rmtree(old, ignore_errors=True)
        except BaseException:
            shutil.rmtree(work, ignore_errors=True)
            raise
        return final / f"{name}.so"


def first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def select_and_load(verbose: bool = False) -> str:
    """Choose the tier (GLM_CPU_KERNELS, the CPU's flags), load it (a failed build falls back to the next lower
    tier, with one warning each), print the outcome once to stderr and return the tier's name."""
    tier, warning = choose_tier(os.environ.get("GLM_CPU_KERNELS"), cpu_flags())
    if warning:
        warnings.warn(warning)
    names = list(TIERS)
    while tier != NONE:
        try:
            load(tier, verbose)
            loaded = torch.ops.glm_cpu.tier()
            if loaded != tier:
                raise RuntimeError(f"the library loaded is tier {loaded}")
            break
        except Exception as e:  # no compiler, no ninja, ...: stay correct, just slower
            lower = next((t for t in names[names.index(tier) + 1:] if supported(t, cpu_flags())), NONE)
            warnings.warn(f"CPU kernels of tier {tier} unavailable ({first_line(e)}); "
                          f"using {lower if lower != NONE else 'PyTorch ops'}")
            tier = lower
    print(f"> CPU kernels: {tier}", file=sys.stderr, flush=True)
    return tier
