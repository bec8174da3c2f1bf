"""Weight offload (the original's `--bminf --bminf-memory-limit N`): run a model whose weights exceed the device's
memory (a GPU's, or on CPU the RAM the user grants) by streaming some layers' weights in every forward.

BMInf's scheme, natively:
- `plan_offload`: the layers whose weights fit the limit stay resident, spread evenly through the network; the limit
  (GiB, `N << 30` as the original) covers every weight held on the device: the always-resident part (embeddings,
  LayerNorms, biases, quantization scales), the resident layers, and the two swap buffers.
- `LayerStreamer`: a streamed layer's four big weights (query_key_value, dense, dense_h_to_4h, dense_4h_to_h, in the
  format the model computes with: bf16/fp16, or the stored INT8/INT4 bytes) live outside the device and are copied,
  one streamed layer ahead of use, into one of exactly two swap slots. The k-th streamed layer's modules hold slot
  k % 2 as their weight tensors for good (static addresses), so the model code, the fused CPU decode step and the
  Triton kernels run unchanged. Nothing is kept between forwards.
- CUDA (`CudaCopies`): the host copies sit in pinned memory (pageable, with one warning, when pinning fails); a
  dedicated copy stream fills a slot after the event that says its previous layer is done, and records the event
  the compute stream waits on before using it, so copy and compute overlap.
- CPU (`FileReads`): the streamed weights stay in the checkpoint file; a reader thread `pread`s the next streamed
  layers while the current ones compute (straight into the slot, or through small staging buffers that a second
  thread converts fp16 → bf16), then drops those file pages from the page cache: RAM holds the resident part, the
  two slots and the staging buffers, not the rest. Weights that are not a plain part of the file (quantized while
  loading) are copied from RAM instead.
"""
import atexit
import contextlib
import ctypes
import math
import os
import queue
import threading
import warnings
import weakref
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import torch

from kernels.cpu import fp16_to_bf16_, pool_rest
from model.errors import UserError

STREAMED_LINEARS = ("attention.query_key_value", "attention.dense", "mlp.dense_h_to_4h", "mlp.dense_4h_to_h")
GIB = 1 << 30
READ_CHUNK = 16 << 20  # bytes per pread (and per fp16 → bf16 conversion step)
STAGING_CHUNKS = 3  # read chunks waiting for conversion, or being converted, at most
MAX_SKIP = 1 << 20  # weights closer than this in the file are read as one range (the bytes between are skipped)
PREFETCH = os.environ.get("GLM_OFFLOAD_PREFETCH", "1") != "0"  # 0: each slot is filled when needed (measurement)


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _gb(n: float) -> str:
    return f"{n / GIB:.2f} GB" if n >= GIB // 10 else f"{n / (1 << 20):.1f} MB"


@dataclass
class OffloadPlan:
    """Which layers are streamed, and the bytes behind the choice (all per device, i.e. per TP rank)."""
    num_layers: int
    streamed: List[int]
    layer_bytes: int  # the four streamed weights of one layer, as computed with
    fixed_bytes: int  # always resident: embeddings, LayerNorms, biases, scales
    limit_bytes: int

    @property
    def slots(self) -> int:
        return min(2, len(self.streamed))

    @property
    def streamed_bytes(self) -> int:
        """Bytes copied into the swap slots per forward."""
        return len(self.streamed) * self.layer_bytes

    @property
    def resident_bytes(self) -> int:
        """Weights held on the device: the always-resident part, the resident layers and the swap slots."""
        return self.fixed_bytes + (self.num_layers - len(self.streamed) + self.slots) * self.layer_bytes

    def describe(self) -> str:
        n, s = self.num_layers, len(self.streamed)
        over = ("; the always-resident part alone exceeds the limit" if self.fixed_bytes > self.limit_bytes else "")
        return (f"> Offload plan: {n - s} of {n} layers resident, {s} streamed per forward "
                f"({_gb(self.streamed_bytes)}); weights held {_gb(self.resident_bytes)} of the "
                f"{_gb(self.limit_bytes)} limit (always resident {_gb(self.fixed_bytes)}, "
                f"{self.slots} swap buffer(s) {_gb(self.slots * self.layer_bytes)}){over}")


def streamed_modules(layer: torch.nn.Module) -> List[torch.nn.Module]:
    return [layer.get_submodule(name) for name in STREAMED_LINEARS]


def spread(count: int, total: int) -> List[int]:
    """`count` of `total` indices spread evenly (layer k·total/count + half a gap)."""
    return [int(math.floor((k + 0.5) * total / count)) for k in range(count)]


def plan_offload(model: torch.nn.Module, limit_bytes: int) -> OffloadPlan:
    """The most resident layers whose weights, with the always-resident part and the swap slots they leave needed,
    fit `limit_bytes`. Works on a meta model (sizes only)."""
    layers = model.transformer.layers
    layer_bytes = sum(_nbytes(m.weight) for m in streamed_modules(layers[0]))
    total = sum(_nbytes(p) for p in model.parameters())
    fixed = total - len(layers) * layer_bytes
    n = len(layers)
    resident = next(r for r in range(n, -1, -1) if fixed + (r + min(2, n - r)) * layer_bytes <= limit_bytes
                    or r == 0)
    return OffloadPlan(n, spread(n - resident, n) if resident < n else [], layer_bytes, fixed, limit_bytes)


# ---------------------------------------------------------------------------------------------------------------
# Where a streamed weight comes from

@dataclass
class FileSpan:
    """A tensor stored contiguously in a file: its bytes at [offset, offset + nbytes), `dtype` elements."""
    path: str
    offset: int
    nbytes: int
    dtype: torch.dtype


def _file_mappings(path: str) -> List[Tuple[int, int, int]]:
    """(start, end, file offset) of this process's memory mappings of `path` (Linux /proc/self/maps)."""
    target, found = os.stat(path), []
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                parts = line.split(maxsplit=5)
                if len(parts) < 6 or int(parts[4]) != target.st_ino:
                    continue
                if os.path.realpath(parts[5].strip()) != os.path.realpath(path):
                    continue
                start, end = (int(x, 16) for x in parts[0].split("-"))
                found.append((start, end, int(parts[2], 16)))
    except OSError:
        return []
    return found


def file_span(t: torch.Tensor, path: str, mappings: List[Tuple[int, int, int]]) -> Optional[FileSpan]:
    """Where the memory-mapped, contiguous CPU tensor `t` lies in `path`; None when it is not such a tensor."""
    if t.device.type != "cpu" or not t.is_contiguous() or t.numel() == 0:
        return None
    if t.data_ptr() % 64:  # torch.save aligns every record to 64 bytes; the chunked reads rely on whole elements
        return None
    ptr, n = t.data_ptr(), _nbytes(t)
    for start, end, offset in mappings:
        if start <= ptr and ptr + n <= end:
            return FileSpan(path, offset + ptr - start, n, t.dtype)
    return None


def _bytes(t: torch.Tensor) -> memoryview:
    """The bytes of a contiguous CPU tensor, writable in place."""
    return memoryview(t.view(-1).view(torch.uint8).numpy())


def read_into(fd: int, out: torch.Tensor, offset: int) -> None:
    """Fill the contiguous CPU tensor `out` with the file's bytes from `offset` (pread: the GIL is released)."""
    readv_into(fd, [_bytes(out)], offset)


def readv_into(fd: int, views: List[memoryview], offset: int) -> None:
    """Fill the byte views, one after another, with the file's bytes from `offset` (preadv, short reads resumed)."""
    total, done = sum(len(v) for v in views), 0
    while views:
        n = os.preadv(fd, views, offset + done)
        if n <= 0:
            raise OSError(f"the file ends at byte {offset + done}, before the {total} bytes asked from byte {offset}")
        done += n
        while views and n >= len(views[0]):
            n -= len(views[0])
            views = views[1:]
        if views and n:
            views = [views[0][n:]] + views[1:]


_LIBC = ctypes.CDLL(None, use_errno=True) if os.name == "posix" else None
_MADV_DONTNEED = 4


def release_mapping(path: str) -> None:
    """Drop this process's resident pages of the memory-mapped file and the file's page cache (what loading paged
    in and no longer needs: streamed weights are read again per forward, resident ones were copied)."""
    if _LIBC is None:
        return
    page = os.sysconf("SC_PAGE_SIZE")
    for start, end, _ in _file_mappings(path):
        _LIBC.madvise(ctypes.c_void_p(start - start % page), ctypes.c_size_t(end - start + start % page),
                      _MADV_DONTNEED)
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------------------------------------------
# Copy engines: how a slot is filled

@dataclass
class _Fill:
    """One slot fill for the reader pipeline: where each weight goes, where it comes from, and its outcome."""
    slot: List[torch.Tensor]
    sources: List
    done: Future
    error: Optional[BaseException] = None
    plan: Optional["_ReadPlan"] = None


def read_ranges(spans: List[FileSpan]) -> List[Tuple[int, int]]:
    """[lo, hi) file ranges that cover `spans`: spans less than MAX_SKIP bytes apart are read as one range (a layer's
    four weights and the small resident tensors between them: one sequential read; per-tensor reads restart the
    disk's read-ahead and ran at a third of the speed)."""
    ranges: List[List[int]] = []
    for s in sorted(spans, key=lambda s: s.offset):
        if ranges and s.offset - ranges[-1][1] <= MAX_SKIP:
            ranges[-1][1] = max(ranges[-1][1], s.offset + s.nbytes)
        else:
            ranges.append([s.offset, s.offset + s.nbytes])
    return [(lo, hi) for lo, hi in ranges]


class FileReads:
    """CPU: fill slots from the checkpoint file on two threads that run continuously across layers:
    - the reader `pread`s READ_CHUNK bytes at a time. A weight stored as it is computed with (INT8/INT4 bytes, a
      16-bit file of the compute dtype) is read straight into its slot (`preadv`, the bytes in between into scratch
      memory); one that needs converting (the fp16 checkpoint into bf16 slots) into one of STAGING_CHUNKS buffers;
    - the converter turns staged chunks into slot contents (fp16 → bf16 on its own thread, `kernels.cpu`), reports
      the fill done, then drops the layer's pages from the page cache.
    So the reader starts on the next layer while the converter finishes this one. Weights that are not a plain part
    of the file (quantized while loading) are copied from RAM by the reader. The layer waiting for a fill sends the
    kernels' spinning helper threads to sleep: the reads need those cores."""

    def __init__(self):
        self.pipeline = _ReadPipeline()
        weakref.finalize(self, self.pipeline.stop).atexit = False  # the threads end with the model (exit: below)
        self.pending: Dict[int, _Fill] = {}

    def host_source(self, t: torch.Tensor, dtype: torch.dtype):
        return t  # resolved to a FileSpan by `locate` once loading is done (the file's mappings are known then)

    def locate(self, sources: Dict, path: str) -> None:
        mappings, in_ram = _file_mappings(path), 0
        for key, t in list(sources.items()):
            span = file_span(t, path, mappings)
            if span is not None:
                sources[key] = span
            else:  # copied from memory per forward (re-read from the mapping if it is a non-contiguous part of it)
                in_ram += _nbytes(t)
        if in_ram:
            warnings.warn(f"{_gb(in_ram)} of streamed weights are not stored as they are computed with in "
                          f"{path} (quantized while loading?): they stay in RAM; to stream them from the file, "
                          f"convert it once with tools/convert_tp.py --quantization-bit-width 4|8", stacklevel=2)

    def fill(self, index: int, slot: List[torch.Tensor], sources: List) -> None:
        job = self.pending[index] = _Fill(slot, sources, Future())
        if PREFETCH:
            self.pipeline.submit(job)

    def acquire(self, index: int) -> None:
        job = self.pending.pop(index)
        if not PREFETCH:
            self.pipeline.submit(job)
        if not job.done.done():
            pool_rest()  # the reads need the cores more than the kernels' spinning helpers
        job.done.result()

    def release(self, index: int) -> None:
        pass

    def drain(self) -> None:
        for job in self.pending.values():
            if PREFETCH:
                job.done.exception()  # wait; a failed read is reported by the forward that needed it
        self.pending.clear()


_PIPELINES: "weakref.WeakSet[_ReadPipeline]" = weakref.WeakSet()
THREAD_PREFIX = "glm-offload"


@atexit.register
def _stop_pipelines() -> None:
    """At exit, let the reader threads finish before the interpreter does: reads still in flight (the next forward's
    first layers), and a model freed just before the end, whose threads are still ending (dropping their tensors).
    A thread that needs the interpreter while it finalizes takes the process down with it (SIGABRT)."""
    for pipeline in list(_PIPELINES):
        pipeline.stop()
    for thread in threading.enumerate():
        if thread.name.startswith(THREAD_PREFIX):
            thread.join(timeout=30)


def _part(dst: torch.Tensor, span: FileSpan, c0: int, c1: int) -> tuple:
    """The part of slot tensor `dst` (flat) that file chunk [c0, c1) holds of `span`: (the slot elements, their bytes'
    start and end within the chunk, the file's dtype). Offsets are multiples of 64 bytes: whole elements."""
    a, b, size = max(c0, span.offset), min(c1, span.offset + span.nbytes), span.dtype.itemsize
    return dst[(a - span.offset) // size:(b - span.offset) // size], a - c0, b - c0, span.dtype


@dataclass
class _ReadPlan:
    """One fill's work for the reader: tensors copied from RAM, then per READ_CHUNK of the file ranges
    (c0, c1, the slot parts it holds (`_part`), and the byte views to read it into, or None: staged for conversion)."""
    copies: List[Tuple[torch.Tensor, torch.Tensor]]
    path: str = ""
    fd: int = -1
    ranges: List[Tuple[int, int]] = field(default_factory=list)
    chunks: List[tuple] = field(default_factory=list)


class _ReadPipeline:
    """The reader and converter threads of FileReads (apart from it, so that they end when it is collected)."""

    def __init__(self):
        self.fills: "queue.Queue[Optional[_Fill]]" = queue.Queue()
        self.staged: "queue.Queue[Optional[tuple]]" = queue.Queue()
        self.free: "queue.Queue[torch.Tensor]" = queue.Queue()
        self.staging: List[torch.Tensor] = []
        self.scratch = torch.empty(0, dtype=torch.uint8)
        self.fds: Dict[str, int] = {}
        self.plans: Dict[tuple, _ReadPlan] = {}
        self.threads = [threading.Thread(target=self._read_loop, name=f"{THREAD_PREFIX}-read", daemon=True),
                        threading.Thread(target=self._convert_loop, name=f"{THREAD_PREFIX}-convert", daemon=True)]
        for t in self.threads:
            t.start()
        _PIPELINES.add(self)

    def submit(self, job: _Fill) -> None:
        self.fills.put(job)

    def stop(self) -> None:
        self.fills.put(None)  # the reader passes it on; the converter, last to use the files, closes them

    # -- the reader thread ---------------------------------------------------------------------------------------
    def _read_loop(self) -> None:
        while (job := self.fills.get()) is not None:
            try:
                self._read(job)
            except BaseException as error:  # reported by the forward that waits for this fill
                job.error = error
            self.staged.put((job, None, 0, 0, []))  # the fill's end, after its chunks
        self.staged.put(None)

    def _read(self, job: _Fill) -> None:
        plan = job.plan = self._plan(job)
        for dst, src in plan.copies:
            dst.copy_(src)
        try:
            for c0, c1, parts, views in plan.chunks:
                if views is not None:
                    readv_into(plan.fd, views, c0)
                else:
                    buf = self._staging_buffer()
                    read_into(plan.fd, buf[:c1 - c0], c0)
                    self.staged.put((job, buf, c0, c1, parts))
        except OSError as error:
            raise UserError(f"{plan.path}: reading a streamed layer (--bminf) failed ({error}); its weights are read "
                            f"from this file in every forward, so it must stay in place, unchanged") from None

    def _plan(self, job: _Fill) -> "_ReadPlan":
        """How to fill this slot from these sources, worked out once (the reader then only issues the reads)."""
        key = (id(job.slot), *(id(src) for src in job.sources))
        if key in self.plans:
            return self.plans[key]
        spans = [(dst.view(-1), src) for dst, src in zip(job.slot, job.sources) if isinstance(src, FileSpan)]
        plan = _ReadPlan([(dst, src) for dst, src in zip(job.slot, job.sources) if not isinstance(src, FileSpan)])
        if spans:
            plan.path = spans[0][1].path
            if plan.path not in self.fds:
                self.fds[plan.path] = os.open(plan.path, os.O_RDONLY)
            plan.fd, plan.ranges = self.fds[plan.path], read_ranges([s for _, s in spans])
            direct = all(dst.dtype == s.dtype for dst, s in spans)
            for lo, hi in plan.ranges:
                for c0 in range(lo, hi, READ_CHUNK):
                    c1 = min(c0 + READ_CHUNK, hi)
                    parts = [_part(dst, s, c0, c1) for dst, s in spans if c0 < s.offset + s.nbytes and s.offset < c1]
                    plan.chunks.append((c0, c1, parts, self._direct_views(c1 - c0, parts) if direct else None))
        self.plans[key] = plan
        return plan

    def _direct_views(self, size: int, parts) -> List[memoryview]:
        """Where a chunk of `size` file bytes goes when read straight into the slots: their parts, and scratch memory
        for the bytes between them."""
        views, at = [], 0
        for out, a, b, _ in sorted(parts, key=lambda p: p[1]):
            if a > at:
                views.append(self._scratch(a - at))
            views.append(_bytes(out))
            at = b
        if size > at:
            views.append(self._scratch(size - at))
        return views

    def _scratch(self, n: int) -> memoryview:
        if len(self.scratch) < n:
            self.scratch = torch.empty(n, dtype=torch.uint8)
        return _bytes(self.scratch[:n])

    def _staging_buffer(self) -> torch.Tensor:
        if len(self.staging) < STAGING_CHUNKS and self.free.empty():
            self.staging.append(torch.empty(READ_CHUNK, dtype=torch.uint8))
            return self.staging[-1]
        return self.free.get()

    # -- the converter thread ------------------------------------------------------------------------------------
    def _convert_loop(self) -> None:
        while (item := self.staged.get()) is not None:
            job, buf, c0, c1, parts = item
            if buf is not None:
                try:
                    if job.error is None:
                        for out, a, b, dtype in parts:
                            src = buf[a:b].view(dtype)
                            fp16_to_bf16_(out, src) if dtype == torch.float16 else out.copy_(src)
                except BaseException as error:
                    job.error = error
                self.free.put(buf)
                continue
            if job.error is not None:
                job.done.set_exception(job.error)
            else:
                job.done.set_result(None)
            for lo, hi in job.plan.ranges if job.plan else ():  # once the layer may compute: this takes a while
                os.posix_fadvise(job.plan.fd, lo, hi - lo, os.POSIX_FADV_DONTNEED)
        for fd in self.fds.values():
            os.close(fd)


class CudaCopies:
    """CUDA: host copies in pinned memory, a copy stream one layer ahead, events both ways."""

    def __init__(self, device: torch.device):
        self.device = device
        self.stream = torch.cuda.Stream(device)
        self.ready = [torch.cuda.Event(), torch.cuda.Event()]
        self.free = [torch.cuda.Event(), torch.cuda.Event()]
        self.warned = False

    def host_source(self, t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        host = t.to(dtype)
        try:
            pinned = host.pin_memory()
        except RuntimeError as error:
            if not self.warned:
                first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
                warnings.warn(f"pinning host memory for the streamed weights failed ({first}); they are streamed "
                              f"from pageable memory (slower copies, no overlap)", stacklevel=2)
                self.warned = True
            return host.contiguous()
        return pinned

    def locate(self, sources: Dict, path: str) -> None:
        pass

    def fill(self, index: int, slot: List[torch.Tensor], sources: List[torch.Tensor]) -> None:
        s = index % 2
        with torch.cuda.stream(self.stream):
            self.stream.wait_event(self.free[s])  # the layer that used this slot before is done with it
            for dst, src in zip(slot, sources):
                dst.copy_(src, non_blocking=True)
            self.ready[s].record(self.stream)

    def acquire(self, index: int) -> None:
        torch.cuda.current_stream(self.device).wait_event(self.ready[index % 2])

    def release(self, index: int) -> None:
        self.free[index % 2].record(torch.cuda.current_stream(self.device))

    def drain(self) -> None:
        pass


# ---------------------------------------------------------------------------------------------------------------

class LayerStreamer:
    """Streams the plan's layers through two swap slots (see the module docstring). The model calls
    `forward()` around a pass over its layers and `layer(i)` around layer i; `segments()` tells the fused decode
    step where it must return to Python (before each streamed layer)."""

    streams = True  # the copies happen outside the model's own operations (no CUDA graph can hold them)

    def __init__(self, model: torch.nn.Module, plan: OffloadPlan, device: torch.device):
        self.plan = plan
        self.order = {layer: k for k, layer in enumerate(plan.streamed)}
        layers = model.transformer.layers
        first = [streamed_modules(layers[i]) for i in plan.streamed[:2]]
        self.slots = [[torch.empty(m.weight.shape, dtype=m.weight.dtype, device=device) for m in mods]
                      for mods in first]
        self.keys: Dict[str, Tuple[int, int]] = {}
        for i in plan.streamed:
            for j, (name, module) in enumerate(zip(STREAMED_LINEARS, streamed_modules(layers[i]))):
                self.keys[f"transformer.layers.{i}.{name}.weight"] = (i, j)
                module.offloaded = True  # its weight is a swap slot: layout conversions must leave it as it is
        self.engine = CudaCopies(device) if device.type == "cuda" else FileReads()
        self.sources: Dict[Tuple[int, int], object] = {}
        self.path: Optional[str] = None
        self.ahead: set = set()  # streamed layers (0, 1) already requested for the next forward
        self.bytes_requested = 0  # streamed weights' bytes asked for so far

    # -- loading ------------------------------------------------------------------------------------------------
    def take(self, key: str, tensor: torch.Tensor, path: str) -> torch.Tensor:
        """The loader hands over a streamed key's checkpoint tensor; returns what the model holds instead (its
        swap slot)."""
        i, j = self.keys[key]
        slot = self.slots[self.order[i] % 2][j]
        self.sources[(i, j)] = self.engine.host_source(tensor, slot.dtype)
        self.path = path
        return slot

    def finish(self) -> None:
        """After loading: find the streamed tensors in the file, release what loading paged in."""
        if self.path is not None:
            self.engine.locate(self.sources, self.path)
            if isinstance(self.engine, FileReads):
                release_mapping(self.path)

    # -- forwards -----------------------------------------------------------------------------------------------
    def _fill(self, k: int) -> None:
        if k < len(self.plan.streamed):
            i = self.plan.streamed[k]
            self.engine.fill(k, self.slots[k % 2], [self.sources[(i, j)] for j in range(len(STREAMED_LINEARS))])
            self.bytes_requested += self.plan.layer_bytes

    @contextlib.contextmanager
    def forward(self):
        """One pass over the layers. Its first two streamed layers were requested when the previous forward was done
        with the slots (the weights do not change between forwards: the reads continue through the last layers'
        compute, the logits and the sampling), or are now."""
        for k in (0, 1):
            if k not in self.ahead:
                self._fill(k)
        self.ahead.clear()
        try:
            yield
        except BaseException:
            self.engine.drain()  # the fills of a forward that stopped midway: none may still write into a slot
            self.ahead.clear()
            raise

    @contextlib.contextmanager
    def layer(self, i: int):
        k = self.order.get(i)
        if k is None:
            yield
            return
        self.engine.acquire(k)
        yield
        self.engine.release(k)
        if k + 2 < len(self.plan.streamed):
            self._fill(k + 2)  # into the slot this layer just used
        else:  # the next forward's streamed layer 0 or 1, whichever uses this slot
            self._fill(k % 2)
            self.ahead.add(k % 2)

    def segments(self, num_layers: int) -> List[Tuple[int, int]]:
        """[a, b) runs of layers that start at a streamed layer (or 0) and end before the next."""
        cuts = sorted({0, *self.plan.streamed, num_layers})
        return [(a, b) for a, b in zip(cuts, cuts[1:]) if a < b]


class NoOffload:
    """The streamer of a model that holds all its weights."""

    streams = False

    @contextlib.contextmanager
    def forward(self):
        yield

    def layer(self, i: int):
        return contextlib.nullcontext()

    def segments(self, num_layers: int) -> List[Tuple[int, int]]:
        return [(0, num_layers)]


NO_OFFLOAD = NoOffload()
