"""A CUDA device that does not exist: the real CUDA code paths run on a CPU-only machine, and every device mistake
that a GPU would refuse is refused here too.

    with fake_cuda() as gpu:                      # or the `fake_gpu` pytest fixture
        model = gpu.build_fixture_model()         # the SAT fixture, loaded by initialize.build_model on "cuda"
        ...                                       # generate, score, serve, graph-decode as on a GPU

Inside the context "cuda" / "cuda:0" is a usable device. A tensor created on it or moved to it is a
`FakeCudaTensor`: a wrapper that reports device cuda:0 and keeps its values in a CPU tensor, so every operation
computes real numbers (greedy ids can be compared with a CPU run), while a dispatch mode applies a GPU's device
rules to every ATen call:
- an operation mixing two devices raises `DeviceError`; a CPU tensor with 0 dims may join a CUDA operation and copies
  go anywhere, as in PyTorch (the same rule as FakeTensorMode's, tests/test_fake_cuda.py compares them);
- indexing, which FakeTensorMode lets through: a CPU tensor indexed by CUDA indices raises (a CUDA tensor may take
  CPU indices), and index_put's values must be on the indexed tensor's device;
- a random function whose generator is on another device than its result raises (`torch.Generator(device="cuda")`
  works here: a CPU generator that says cuda);
- a compiled CPU kernel (torch.ops.glm_cpu.*) given a CUDA tensor raises;
- host reads of CUDA values (.item(), .tolist(), .cpu(), nonzero, ...) are counted in `host_reads`, and raise during a
  CUDA graph capture, as on a GPU;
- `Tensor.pin_memory()` gives a CPU copy that `is_pinned()` (the bytes are counted in `pinned_bytes`); with
  `pin_fails` set it raises as a host out of page-locked memory does.

torch.cuda says there is one GPU (`NAME`, `SMS` multiprocessors); streams and events do nothing, and a CUDA graph is
emulated at the ATen level: capture runs the step (Python needs its values) while recording every CUDA operation, then
restores all memory and generator states that existed before it (a real capture executes nothing); replay re-runs the
recorded operations on the same tensors (static addresses), with CPU scalars baked in at capture.

With `triton=True` the fused kernels of kernels/triton_matmul.py are available on the device; their launch checks that
every pointer argument is a CUDA tensor (what Triton checks) and writes the exact dequantize reference, split-K
partials included. `kernels.cpu`'s compiled kernels keep their real CPU implementations (a CUDA tensor reaching one is
an error, see above).

A CPU-only PyTorch build has no CUDA device guard, which Tensor.to and copy_ ask for before dispatching:
tests/fake_cuda_guard.cpp registers one (built once, a few seconds, into torch's extensions folder).
"""
import contextlib
import time
import types
from pathlib import Path
from typing import Dict, List, Optional

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_unflatten

DEVICE = torch.device("cuda", 0)
NAME = "Fake CUDA device (tests/fake_cuda.py)"
SMS = 4
MEMORY_BYTES = 80 << 30
aten = torch.ops.aten


class DeviceError(RuntimeError):
    """What a GPU run would raise: tensors of two devices in one operation, a host read during graph capture, ..."""


# ---------------------------------------------------------------------------------------------------------------
# The tensor

class FakeCudaTensor(torch.Tensor):
    """A tensor on the fake CUDA device: its metadata says cuda:0, `_host` holds the values (a CPU tensor)."""

    @staticmethod
    def __new__(cls, host: torch.Tensor, device: torch.device = DEVICE):
        t = torch.Tensor._make_wrapper_subclass(cls, host.shape, strides=host.stride(),
                                                storage_offset=host.storage_offset(), dtype=host.dtype,
                                                device=device, requires_grad=False)
        t._host = host
        return t

    __torch_function__ = torch._C._disabled_torch_function_impl

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        raise DeviceError(f"{func} on a fake CUDA tensor outside fake_cuda()")

    def __repr__(self, *, tensor_contents=None):
        return f"FakeCudaTensor({self._host!r}, device='{self.device}')"


def _device(value) -> Optional[torch.device]:
    if value is None:
        return None
    d = torch.device(value)
    return DEVICE if d.type == "cuda" else d


def _tensors(tree) -> List[torch.Tensor]:
    return [x for x in tree_flatten(tree)[0] if isinstance(x, torch.Tensor)]


def _ops(*names):
    out = set()
    for name in names:
        packet, _, overload = name.partition(".")
        op = getattr(aten, packet, None)
        if op is not None and hasattr(op, overload or "default"):
            out.add(getattr(op, overload or "default"))
    return frozenset(out)


_COPIES = _ops("_to_copy", "copy_", "_copy_from", "_copy_from_and_resize", "lift_fresh", "lift_fresh_copy",
               "to.dtype_layout", "to.device", "to.dtype", "to.other")  # Tensor.to reaches the mode in inference mode
_INDEXING = _ops("index.Tensor", "_unsafe_index.Tensor", "index_put", "index_put_", "_index_put_impl_",
                 "_unsafe_index_put")
# Operations that make the host wait for CUDA values (the .cpu() and copy_ cases are found by their devices).
_HOST_READS = _ops("_local_scalar_dense", "equal", "is_nonzero", "nonzero", "masked_select", "_unique2",
                   "unique_dim", "unique_consecutive", "repeat_interleave.Tensor")


# ---------------------------------------------------------------------------------------------------------------
# Device rules

def _check_indexing(func, args) -> None:
    """PyTorch's rule: indices on the CPU or on the indexed tensor's device; put values on its device."""
    target, indices = args[0], args[1]
    for index in indices:
        if index is not None and index.device != target.device and index.device.type != "cpu":
            raise DeviceError(f"{func}: indices should be either on cpu or on the same device as the indexed tensor "
                              f"({target.device}); got indices on {index.device}")
    values = args[2] if len(args) > 2 and isinstance(args[2], torch.Tensor) else None
    if values is not None and values.device != target.device and not _cpu_scalar(values):
        raise DeviceError(f"{func}: values on {values.device} put into a tensor on {target.device}")


def _cpu_scalar(t: torch.Tensor) -> bool:
    return t.device.type == "cpu" and t.dim() == 0


def common_device(func, tensors: List[torch.Tensor]) -> Optional[torch.device]:
    """The device an operation on `tensors` runs on, or DeviceError: all on one device, except that 0-dim CPU
    tensors (scalars) may join a CUDA operation (FakeTensor's rule, which follows TensorIterator's)."""
    device, from_scalar = None, False
    for t in tensors:
        scalar = _cpu_scalar(t)
        if device is None or (from_scalar and not scalar and t.device != device):
            device, from_scalar = t.device, scalar
        elif t.device == device:
            from_scalar = from_scalar and scalar
        elif not scalar:
            raise DeviceError(f"{func}: Expected all tensors to be on the same device, but found at least two "
                              f"devices, {device} and {t.device}!")
    return device


def _output_device(func, args, kwargs, tensors) -> torch.device:
    """Checks the operation against the device rules; returns the device of its results."""
    if func.namespace == "glm_cpu" and any(t.device.type != "cpu" for t in tensors):
        raise DeviceError(f"{func}: a compiled CPU kernel was given a tensor on {DEVICE}")
    if func in _INDEXING:
        _check_indexing(func, args)
    elif func not in _COPIES:
        common_device(func, tensors)
    explicit = _device(kwargs.get("device"))
    if func is aten.to.other:
        explicit = args[1].device
    elif func is aten.to.device:
        explicit = _device(args[1])
    if explicit is not None:
        device = explicit
    elif (func in _COPIES or func in _INDEXING) and tensors:
        device = tensors[0].device
    else:
        device = common_device(func, tensors) or torch.device("cpu")
    return device


def _check_generator(func, args, kwargs) -> None:
    """A random operation's generator must be on the device of its result. Checked where torch functions are called:
    the dispatcher hands modes a new Python object for a generator, which no longer says it is a fake CUDA one."""
    generator = kwargs.get("generator")
    if generator is None:
        return
    device = _device(kwargs.get("device"))
    if device is None:
        device = args[0].device if args and isinstance(args[0], torch.Tensor) else torch.device("cpu")
    if generator.device.type != device.type:
        raise DeviceError(f"{getattr(func, '__name__', func)}: Expected a '{device.type}' device type for generator "
                          f"but found '{generator.device.type}'")


def _reads_host(func, args, tensors, device) -> bool:
    """Whether the operation makes the host wait for CUDA values (a copy to the host, .item(), nonzero, ...)."""
    on_cuda = [t.device.type == "cuda" for t in tensors]
    if func in _HOST_READS or (func in _INDEXING and any(i.dtype == torch.bool for i in _tensors(args[1]))):
        return any(on_cuda)
    return func in _COPIES and any(on_cuda) and device.type != "cuda"


def _crosses_devices(func, tensors, device) -> bool:
    return func in _COPIES and any(t.device != device for t in tensors)


# ---------------------------------------------------------------------------------------------------------------
# CUDA graph emulation

class _Capture:
    """What one capture recorded, and the memory / generator states to restore when it ends."""

    def __init__(self):
        self.records = []  # (func, args, kwargs, [(recorded output, fresh)]): host tensors, CPU scalars copied
        self.fresh_storages = set()  # storages allocated during the capture
        self.saved_storages: Dict[int, tuple] = {}
        self.saved_generators: Dict[int, tuple] = {}

    def before(self, func, host_args, host_kwargs) -> None:
        """Save what the operation is about to change that existed before the capture."""
        schema_args = func._schema.arguments
        for arg, value in zip(schema_args, list(host_args) + [host_kwargs.get(a.name) for a in
                                                                schema_args[len(host_args):]]):
            if arg.alias_info is None or not arg.alias_info.is_write:
                continue
            for t in _tensors(value):
                storage = t.untyped_storage()
                key = storage.data_ptr()
                if key not in self.fresh_storages and key not in self.saved_storages:
                    whole = torch.empty(0, dtype=torch.uint8).set_(storage)
                    self.saved_storages[key] = (whole, whole.clone())
        generator = host_kwargs.get("generator")
        if generator is not None and id(generator) not in self.saved_generators:
            self.saved_generators[id(generator)] = (generator, generator.get_state())

    def record(self, func, host_args, host_kwargs, baked_args, baked_kwargs, host_out) -> None:
        """Keep the operation for replay: its arguments (CPU scalars copied: their values are baked in at capture)
        and its outputs, fresh (new memory: replay copies the new values in) or views of its inputs (by their
        storage: schemas do not say it for Tensor.to(copy=True) nor _unsafe_view)."""
        inputs = {t.untyped_storage().data_ptr() for t in _tensors((host_args, host_kwargs))}
        outputs = []
        for o in _tensors(host_out):
            fresh = o.untyped_storage().data_ptr() not in inputs
            if fresh:
                self.fresh_storages.add(o.untyped_storage().data_ptr())
            outputs.append((o, fresh))
        self.records.append((func, baked_args, baked_kwargs, outputs))

    def restore(self) -> None:
        for whole, saved in self.saved_storages.values():
            whole.copy_(saved)
        # last saved first: one generator may come as several Python objects, the earliest state must win
        for generator, state in reversed(list(self.saved_generators.values())):
            generator.set_state(state)

    def replay(self) -> None:
        for func, args, kwargs, outputs in self.records:
            result = [o for o in tree_flatten(func(*args, **kwargs))[0] if isinstance(o, torch.Tensor)]
            for (recorded, fresh), new in zip(outputs, result):
                if fresh:
                    recorded.copy_(new)


class FakeCUDAGraph:
    """torch.cuda.CUDAGraph on the fake device (see the module docstring)."""

    def __init__(self, keep_graph: bool = False):
        self.capture: Optional[_Capture] = None
        self.generators = []

    def register_generator_state(self, generator) -> None:
        self.generators.append(generator)

    def capture_begin(self, pool=None, capture_error_mode: str = "global") -> None:
        _STATE.begin_capture(self)

    def capture_end(self) -> None:
        _STATE.end_capture(self)

    def replay(self) -> None:
        if self.capture is None:
            raise DeviceError("replay of a CUDA graph that was not captured")
        self.capture.replay()
        _STATE.replays += 1

    def reset(self) -> None:
        self.capture = None

    def pool(self):
        return (0, id(self))


class _GraphContext:
    """torch.cuda.graph(cuda_graph, ...)."""

    def __init__(self, cuda_graph: FakeCUDAGraph, pool=None, stream=None, capture_error_mode: str = "global"):
        self.cuda_graph = cuda_graph

    def __enter__(self):
        self.cuda_graph.capture_begin()

    def __exit__(self, *exc):
        self.cuda_graph.capture_end()
        return False


# ---------------------------------------------------------------------------------------------------------------
# The modes

class _Dispatch(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        flat, spec = tree_flatten((args, kwargs))
        tensors = [x for x in flat if isinstance(x, torch.Tensor)]
        device = _output_device(func, args, kwargs, tensors)
        capture = _STATE.capture
        reads_host = _reads_host(func, args, tensors, device)
        if capture is not None and (reads_host or _crosses_devices(func, tensors, device)):
            raise DeviceError(f"{func}: CUDA error: operation not permitted when stream is capturing "
                              f"(a host read or a copy between host and device inside a CUDA graph capture)")
        _STATE.host_reads += reads_host
        inputs = {}  # id of each host tensor -> the tensor the caller passed
        host_flat = []
        for x in flat:
            if isinstance(x, FakeCudaTensor):
                inputs[id(x._host)] = x
                x = x._host
            elif isinstance(x, torch.Tensor):
                inputs[id(x)] = x
            elif isinstance(x, torch.device) and x.type == "cuda":  # factories' and Tensor.to's target
                x = torch.device("cpu")
            host_flat.append(x)
        host_args, host_kwargs = tree_unflatten(host_flat, spec)
        recording = capture is not None and device.type == "cuda"
        if recording:
            capture.before(func, host_args, host_kwargs)
        out = func(*host_args, **host_kwargs)
        if recording:
            baked = [h.clone() if isinstance(x, torch.Tensor) and not isinstance(x, FakeCudaTensor) else h
                     for x, h in zip(flat, tree_flatten((host_args, host_kwargs))[0])]
            capture.record(func, host_args, host_kwargs, *tree_unflatten(baked, spec), out)
        # A view of a normal tensor is a normal tensor, also under inference_mode (autograd then shares its version
        # counter): such wrappers are made outside inference mode.
        normal_view = func.is_view and bool(tensors) and not tensors[0].is_inference()
        with torch.inference_mode(False) if normal_view else contextlib.nullcontext():
            return tree_unflatten([self._wrap(o, device, inputs) for o in tree_flatten(out)[0]],
                                  tree_flatten(out)[1])

    @staticmethod
    def _wrap(o, device, inputs):
        if not isinstance(o, torch.Tensor):
            return o
        if id(o) in inputs:  # in place / out= / a no-op Tensor.to: the caller's own tensor, if on that device
            given = inputs[id(o)]
            if given.device == device:
                if given.shape != o.shape:
                    raise DeviceError("fake_cuda cannot follow an in-place resize of a CUDA tensor")
                return given
            o = o.clone()  # Tensor.to across devices: a copy
        return FakeCudaTensor(o, device) if device.type == "cuda" else o


_NUMPY_ERROR = ("can't convert cuda:0 device type tensor to numpy. Use Tensor.cpu() to copy the tensor to host "
                "memory first.")


class _Functions(TorchFunctionMode):
    """What is decided above the dispatcher: torch.tensor's device (read in C++ before any mode sees it), tolist and
    numpy of CUDA tensors, the device of a random function's generator."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        _check_generator(func, args, kwargs)
        if func in (torch.tensor, torch.as_tensor, torch.asarray) and _device(kwargs.get("device")) == DEVICE:
            kwargs.pop("device")
            with self:
                return func(*args, **kwargs).to(DEVICE)
        if func is torch.Tensor.tolist and isinstance(args[0], FakeCudaTensor):
            with self:
                return args[0].cpu().tolist()
        if func in (torch.Tensor.numpy, torch.Tensor.__array__) and isinstance(args[0], FakeCudaTensor):
            raise TypeError(_NUMPY_ERROR)
        return func(*args, **kwargs)


# ---------------------------------------------------------------------------------------------------------------
# torch.cuda on the fake device

class _GeneratorMeta(type(torch.Generator)):
    def __instancecheck__(cls, obj):
        return isinstance(obj, torch._C.Generator)


class FakeGenerator(torch.Generator, metaclass=_GeneratorMeta):
    """torch.Generator(device=...): a CPU generator that reports the device it was asked for."""

    def __new__(cls, device="cpu"):
        g = super().__new__(cls, "cpu")
        g._fake_device = _device(device)
        return g

    @property
    def device(self):
        return self._fake_device


class _Stream:
    def __init__(self, device=None, priority=0, **kwargs):
        self.device = DEVICE

    def wait_stream(self, other):
        pass

    def wait_event(self, event):
        pass

    def synchronize(self):
        pass

    def query(self):
        return True


class _Event:
    def __init__(self, enable_timing=False, blocking=False, interprocess=False):
        self.time = None

    def record(self, stream=None):
        self.time = time.perf_counter()

    def synchronize(self):
        pass

    def query(self):
        return True

    def elapsed_time(self, end) -> float:
        return (end.time - self.time) * 1e3


def _properties(device=None):
    return types.SimpleNamespace(name=NAME, total_memory=MEMORY_BYTES, multi_processor_count=SMS, major=9, minor=0,
                                 L2_cache_size=50 << 20)


def _torch_cuda_fakes() -> dict:
    stream = _Stream()
    return {
        "_lazy_init": lambda: None, "is_available": lambda: True, "is_initialized": lambda: True,
        "device_count": lambda: 1, "current_device": lambda: 0, "set_device": lambda device: None,
        "synchronize": lambda device=None: None, "get_device_name": lambda device=None: NAME,
        "get_device_properties": _properties, "get_device_capability": lambda device=None: (9, 0),
        "Stream": _Stream, "current_stream": lambda device=None: stream, "default_stream": lambda device=None: stream,
        "stream": lambda s: contextlib.nullcontext(), "Event": _Event, "CUDAGraph": FakeCUDAGraph,
        "graph": _GraphContext, "is_current_stream_capturing": lambda: _STATE.capture is not None,
        "empty_cache": lambda: None, "memory_allocated": lambda device=None: 0,
        "max_memory_allocated": lambda device=None: 0, "reset_peak_memory_stats": lambda device=None: None,
        "mem_get_info": lambda device=None: (MEMORY_BYTES, MEMORY_BYTES),
    }


# ---------------------------------------------------------------------------------------------------------------
# The fused Triton kernels on the fake device

def _reference_launch(bits: int, is_mm: bool):
    def launch(x, w, s, out, m, n, k, stride_xm, stride_wn, stride_om, out_split_stride, *, BLOCK_K, K_ITERS,
               **meta):
        from quantization.functional import dequantize
        for i, t in enumerate((x, w, s, out)):
            if t.device.type != "cuda":  # Triton's own check of pointer arguments
                raise ValueError(f"Pointer argument (at {i}) cannot be accessed from Triton (cpu tensor?)")
        assert (x.stride(0), w.stride(0), stride_om, out_split_stride) == (stride_xm, stride_wn, n, m * n)
        dense = dequantize(w, s, bits, torch.float32)[:, :k]
        parts = out.view(-1, m, n)
        per_split = K_ITERS * BLOCK_K
        for split in range(parts.shape[0]):
            cols = slice(split * per_split, min(k, (split + 1) * per_split))
            parts[split].copy_(x[:, cols].float() @ dense[:, cols].t())
    return launch


class _Kernel:
    def __init__(self, is_mm: bool):
        self.is_mm = is_mm

    def __getitem__(self, grid):
        def run(*args, BITS, **meta):
            _reference_launch(BITS, self.is_mm)(*args, **meta)
            _STATE.triton_launches += 1
        return run


FAKE_TRITON_KERNELS = types.SimpleNamespace(gemv_kernel=_Kernel(False), mm_kernel=_Kernel(True))


# ---------------------------------------------------------------------------------------------------------------
# The context

class FakeCuda:
    """The state of one fake_cuda() context (what tests read)."""

    device = DEVICE

    def __init__(self):
        self.host_reads = 0  # host reads of CUDA values (syncs)
        self.triton_launches = 0
        self.captures = 0
        self.replays = 0
        self.capture: Optional[_Capture] = None
        self.pinned: Dict[int, int] = {}  # data_ptr -> bytes of the host copies made by pin_memory()
        self.pin_fails = False

    @property
    def pinned_bytes(self) -> int:
        return sum(self.pinned.values())

    def pin_memory(self, t: torch.Tensor, device=None) -> torch.Tensor:
        if t.device.type != "cpu":
            raise RuntimeError(f"cannot pin '{t.device}' memory: only dense CPU tensors can be pinned")
        if self.pin_fails:
            raise RuntimeError("CUDA error: out of memory (fake_cuda: page-locked host memory refused)")
        copy = t.detach().clone(memory_format=torch.contiguous_format)
        self.pinned[copy.data_ptr()] = copy.numel() * copy.element_size()
        return copy

    def is_pinned(self, t: torch.Tensor, device=None) -> bool:
        return t.device.type == "cpu" and t.data_ptr() in self.pinned

    def begin_capture(self, graph: FakeCUDAGraph) -> None:
        if self.capture is not None:
            raise DeviceError("a CUDA graph capture inside another")
        self.capture = graph.capture = _Capture()

    def end_capture(self, graph: FakeCUDAGraph) -> None:
        capture, self.capture = self.capture, None
        capture.restore()
        self.captures += 1

    @staticmethod
    def build_fixture_model(dtype_flag: str = "--fp32", extra=(), device: str = "cuda"):
        """The SAT fixture model as generate.py builds it: initialize.build_model with these flags, the checkpoint
        loaded on --device (the fake GPU by default; "cpu" for a reference built the same way)."""
        import initialize
        from tests.helpers import fixture_model_args
        args = initialize.parse_args(None, [*fixture_model_args(dtype_flag=dtype_flag, extra=extra),
                                            "--device", device])
        return initialize.build_model(args)


_STATE: Optional[FakeCuda] = None
_GUARD = Path(__file__).with_name("fake_cuda_guard.cpp")


def _ensure_device_guard() -> None:
    if torch.version.cuda is not None:  # a CUDA build without a GPU has a guard; PyTorch swaps in a no-op one
        torch._C._ensureCUDADeviceGuardSet()
        return
    if getattr(_ensure_device_guard, "done", False):
        return
    from torch.utils import cpp_extension
    cpp_extension.load(name="glm_fake_cuda_guard", sources=[str(_GUARD)], is_python_module=False, verbose=False)
    _ensure_device_guard.done = True


@contextlib.contextmanager
def fake_cuda(triton: bool = True):
    """Make "cuda:0" a usable fake device for the duration (see the module docstring); yields the FakeCuda state."""
    global _STATE
    if torch.cuda.is_available():
        pytest.skip("a real GPU is present: these paths run on it")
    _ensure_device_guard()
    from generation import graph_decode
    from kernels import triton_matmul
    state = FakeCuda()
    saved = {name: getattr(torch.cuda, name, None) for name in _torch_cuda_fakes()}
    saved_generator, saved_kernels = torch.Generator, triton_matmul._kernels
    saved_pinning = torch.Tensor.pin_memory, torch.Tensor.is_pinned
    overwrite = torch.__future__.get_overwrite_module_params_on_conversion()
    lift_cpu = torch._C._only_lift_cpu_tensors()
    _STATE = state
    for name, value in _torch_cuda_fakes().items():
        setattr(torch.cuda, name, value)
    torch.Generator = FakeGenerator
    torch.Tensor.pin_memory = lambda t, device=None: state.pin_memory(t, device)
    torch.Tensor.is_pinned = lambda t, device=None: state.is_pinned(t, device)
    if triton:
        triton_matmul._kernels = lambda: FAKE_TRITON_KERNELS
    triton_matmul._sm_count.cache_clear()
    triton_matmul._FAILED.clear()
    graph_decode._CAPTURE_FAILED.clear()
    torch.__future__.set_overwrite_module_params_on_conversion(True)  # Module.to makes new (fake CUDA) parameters
    torch._C._set_only_lift_cpu_tensors(True)  # tensors from Python data (t[0, [1, 2]]) start on the CPU, then move
    try:
        with _Dispatch(), _Functions():
            yield state
    finally:
        _STATE = None
        for name, value in saved.items():
            setattr(torch.cuda, name, value)
        torch.Generator = saved_generator
        torch.Tensor.pin_memory, torch.Tensor.is_pinned = saved_pinning
        triton_matmul._kernels = saved_kernels
        triton_matmul._sm_count.cache_clear()
        triton_matmul._FAILED.clear()
        graph_decode._CAPTURE_FAILED.clear()
        torch.__future__.set_overwrite_module_params_on_conversion(overwrite)
        torch._C._set_only_lift_cpu_tensors(lift_cpu)


@pytest.fixture
def fake_gpu():
    """A test that runs inside fake_cuda(): yields its FakeCuda (device, host_reads, captures, ...)."""
    with fake_cuda() as state:
        yield state
