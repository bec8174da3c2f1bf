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
  layer (fp16 → bf16 through a small staging buffer, converted chunk by chunk) while the current layers compute,
  then drops those file pages from the page cache: RAM holds the resident part and the two slots, not the rest.
  Weights that are not a plain part of the file (quantized while loading) are copied from RAM instead.
"""
import contextlib
import ctypes
import math
import os
import warnings
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch

from model.errors import UserError

STREAMED_LINEARS = ("attention.query_key_value", "attention.dense", "mlp.dense_h_to_4h", "mlp.dense_4h_to_h")
GIB = 1 << 30
READ_CHUNK = 16 << 20  # bytes per pread (and per fp16 → bf16 conversion step)
READS_IN_FLIGHT = int(os.environ.get("GLM_OFFLOAD_READS", "1"))  # preads queued at once (1 was faster here)
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


def read_into(fd: int, out: torch.Tensor, offset: int) -> None:
    """Fill the contiguous CPU tensor `out` with the file's bytes from `offset` (pread: the GIL is released)."""
    view, done = memoryview(out.view(-1).view(torch.uint8).numpy()), 0
    while done < len(view):
        n = os.preadv(fd, [view[done:]], offset + done)
        if n <= 0:
            raise OSError(f"the file ends at byte {offset + done}, before the {len(view)} bytes asked from byte {offset}")
        done += n


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

class FileReads:
    """CPU: fill slots by reading the checkpoint file (or copying a tensor) on one reader thread."""

    def __init__(self):
        self.reader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="glm-offload")
        self.chunk_reader = ThreadPoolExecutor(max_workers=READS_IN_FLIGHT, thread_name_prefix="glm-offload-read")
        self.fds: Dict[str, int] = {}
        self.staging: Optional[torch.Tensor] = None
        self.pending: Dict[int, Future] = {}
        self.bytes_read = 0

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

    def _fd(self, path: str) -> int:
        if path not in self.fds:
            self.fds[path] = os.open(path, os.O_RDONLY)
        return self.fds[path]

    def _fill(self, slot: List[torch.Tensor], sources: List) -> None:
        spans = [(dst.view(-1), src) for dst, src in zip(slot, sources) if isinstance(src, FileSpan)]
        for dst, src in zip(slot, sources):
            if not isinstance(src, FileSpan):
                dst.copy_(src)
        if spans:
            self._read_spans(spans)

    def _read_spans(self, spans: List[Tuple[torch.Tensor, FileSpan]]) -> None:
        """One layer's weights as one sequential read of the file range that holds them (its small resident
        tensors in between are read and skipped: per-tensor reads restart the disk's read-ahead and ran at a
        third of the speed), READ_CHUNK bytes at a time; the next READS_IN_FLIGHT chunks are read on other threads
        while chunk i is copied, or converted (the fp16 checkpoint into bf16 slots), into the slots."""
        path = spans[0][1].path
        fd = self._fd(path)
        lo = min(s.offset for _, s in spans)
        hi = max(s.offset + s.nbytes for _, s in spans)
        if self.staging is None:
            self.staging = torch.empty(READS_IN_FLIGHT + 1, READ_CHUNK, dtype=torch.uint8)
        starts = list(range(lo, hi, READ_CHUNK))
        ring = len(self.staging)

        def read(i: int) -> Future:
            return self.chunk_reader.submit(read_into, fd, self.staging[i % ring][:min(READ_CHUNK, hi - starts[i])],
                                            starts[i])

        pending = [read(i) for i in range(min(READS_IN_FLIGHT, len(starts)))]
        for i, c0 in enumerate(starts):
            try:
                pending.pop(0).result()
            except OSError as error:
                for job in pending:
                    job.exception()
                raise UserError(f"{path}: reading a streamed layer (--bminf) failed ({error}); its weights are read "
                                f"from this file in every forward, so it must stay in place, unchanged") from None
            if i + READS_IN_FLIGHT < len(starts):
                pending.append(read(i + READS_IN_FLIGHT))
            chunk, c1 = self.staging[i % ring], min(c0 + READ_CHUNK, hi)
            for dst, s in spans:
                a, b = max(c0, s.offset), min(c1, s.offset + s.nbytes)
                if a < b:  # offsets are multiples of 64 bytes: whole elements
                    size = s.dtype.itemsize
                    part = chunk[a - c0:b - c0].view(s.dtype)
                    dst[(a - s.offset) // size:(b - s.offset) // size].copy_(part)
        os.posix_fadvise(fd, lo, hi - lo, os.POSIX_FADV_DONTNEED)
        self.bytes_read += sum(s.nbytes for _, s in spans)

    def fill(self, index: int, slot: List[torch.Tensor], sources: List) -> None:
        if PREFETCH:
            self.pending[index] = self.reader.submit(self._fill, slot, sources)
        else:
            self.pending[index] = (slot, sources)

    def acquire(self, index: int) -> None:
        job = self.pending.pop(index)
        if isinstance(job, Future):
            job.result()
        else:
            self._fill(*job)

    def release(self, index: int) -> None:
        pass

    def drain(self) -> None:
        for job in self.pending.values():
            if isinstance(job, Future):
                job.exception()  # wait; a failed read is reported by the forward that needed it
        self.pending.clear()


class CudaCopies:
    """CUDA: host copies in pinned memory, a copy stream one layer ahead, events both ways."""

    def __init__(self, device: torch.device):
        self.device = device
        self.stream = torch.cuda.Stream(device)
        self.ready = [torch.cuda.Event(), torch.cuda.Event()]
        self.free = [torch.cuda.Event(), torch.cuda.Event()]
        self.bytes_read = 0
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
                self.bytes_read += _nbytes(src)
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

    @contextlib.contextmanager
    def forward(self):
        """One pass over the layers: the first two streamed layers are requested at once."""
        self._fill(0)
        self._fill(1)
        try:
            yield
        finally:
            self.engine.drain()

    @contextlib.contextmanager
    def layer(self, i: int):
        k = self.order.get(i)
        if k is None:
            yield
            return
        self.engine.acquire(k)
        yield
        self.engine.release(k)
        self._fill(k + 2)  # into the slot this layer just used

    def segments(self, num_layers: int) -> List[Tuple[int, int]]:
        """[a, b) runs of layers that start at a streamed layer (or 0) and end before the next."""
        cuts = sorted({0, *self.plan.streamed, num_layers})
        return [(a, b) for a, b in zip(cuts, cuts[1:]) if a < b]

    @property
    def bytes_read(self) -> int:
        return self.engine.bytes_read


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
