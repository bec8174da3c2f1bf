"""The fake CUDA device of tests/fake_cuda.py itself: its device rules are PyTorch's (compared with FakeTensorMode,
plus the indexing and generator rules FakeTensorMode does not check), host reads are counted and refused during a
capture, and the emulated CUDA graph restores what capture changed and replays on the same tensors."""
import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from tests.fake_cuda import DeviceError, FakeCudaTensor, fake_cuda, fake_gpu  # noqa: F401  (fixture)

# (name, function of (cuda tensor [4], cpu tensor [4], cpu scalar tensor)): operations mixing devices
MIXED = {
    "add": lambda g, c, s: g + c,
    "add_cpu_scalar": lambda g, c, s: g + s,
    "cpu_plus_cuda_scalar": lambda g, c, s: c + g[0],
    "cat": lambda g, c, s: torch.cat([g, c]),
    "where": lambda g, c, s: torch.where(c > 0, g, g),
    "index_select": lambda g, c, s: g.index_select(0, c.long().clamp(0, 3)),
    "copy_to_cuda": lambda g, c, s: g.clone().copy_(c),
    "copy_to_cpu": lambda g, c, s: c.clone().copy_(g),
    "masked_fill_cpu_value": lambda g, c, s: g.masked_fill(g > 0, s),
    "matmul": lambda g, c, s: g[None] @ c[:, None],
}


def _outcome(fn, make):
    g, c, s = make()
    try:
        return str(fn(g, c, s).device)
    except (DeviceError, RuntimeError) as e:
        return "error" if "device" in str(e) else f"other: {e}"


@pytest.mark.parametrize("name", list(MIXED))
def test_device_rules_are_fake_tensor_modes(name, fake_gpu):
    """The same operation raises (or gives the same device) under fake_cuda and under PyTorch's FakeTensorMode."""
    ours = _outcome(MIXED[name], lambda: (torch.arange(4.0).cuda(), torch.arange(4.0) - 1, torch.tensor(2.0)))
    with FakeTensorMode(allow_non_fake_inputs=True):
        theirs = _outcome(MIXED[name], lambda: (torch.empty(4, device="cuda:0"), torch.empty(4), torch.empty(())))
    assert ours == theirs
    assert ours in ("error", "cuda:0", "cpu")


def test_indexing_a_cpu_tensor_with_cuda_indices_raises(fake_gpu):
    """What FakeTensorMode lets through and a GPU refuses (the layout bug of issue 22)."""
    cpu, gpu = torch.arange(12).view(3, 4), torch.arange(12).view(3, 4).cuda()
    with pytest.raises(DeviceError, match="indices should be either on cpu or on the same device"):
        cpu[torch.arange(2, device="cuda"), 0]
    with pytest.raises(DeviceError, match="indices should be either on cpu"):
        cpu[torch.tensor([0, 1]).cuda()] = 5
    with pytest.raises(DeviceError, match="values on cuda:0 put into a tensor on cpu"):
        cpu[torch.tensor([0, 1])] = torch.zeros(2, 4).cuda()
    assert gpu[torch.tensor([2, 0]), 1].tolist() == [9, 1]  # CUDA tensor, CPU indices: fine
    gpu[torch.tensor([1])] = 0
    assert gpu.cpu()[1].tolist() == [0, 0, 0, 0]


def test_generators_must_be_on_the_result_device(fake_gpu):
    with pytest.raises(DeviceError, match="Expected a 'cuda' device type for generator but found 'cpu'"):
        torch.rand(3, device="cuda", generator=torch.Generator().manual_seed(0))
    with pytest.raises(DeviceError, match="Expected a 'cpu' device type for generator but found 'cuda'"):
        torch.rand(3, generator=torch.Generator(device="cuda"))
    a = torch.rand(3, device="cuda", generator=torch.Generator(device="cuda").manual_seed(5))
    b = torch.rand(3, device="cuda", generator=torch.Generator(device="cuda").manual_seed(5))
    assert a.device.type == "cuda" and a.tolist() == b.tolist()


def test_compiled_cpu_kernels_refuse_cuda_tensors(fake_gpu):
    from kernels import cpu
    if not cpu.available():
        pytest.skip("no compiled CPU kernels here")
    x, w = torch.ones(1, 64, dtype=torch.bfloat16), torch.ones(32, 64, dtype=torch.bfloat16)
    assert cpu.gemv_bf16(x, w).shape == (1, 32)
    with pytest.raises(DeviceError, match="a compiled CPU kernel was given a tensor on cuda:0"):
        cpu.gemv_bf16(x.cuda(), w.cuda())


def test_host_reads_are_counted_and_numpy_refused(fake_gpu):
    x = torch.arange(6).cuda()
    before = fake_gpu.host_reads
    assert x.tolist() == list(range(6)) and int(x[2]) == 2 and x.cpu().sum().item() == 15
    assert bool((x > 4).any())
    assert fake_gpu.host_reads - before == 4  # tolist, int, cpu, bool; the CPU sum is not one
    with pytest.raises(TypeError, match="can't convert cuda:0 device type tensor to numpy"):
        x.numpy()
    assert isinstance(x, FakeCudaTensor) and not isinstance(x.cpu(), FakeCudaTensor)


def test_graph_capture_restores_memory_and_replay_reruns(fake_gpu):
    counter = torch.zeros(1, device="cuda")
    data = torch.arange(4.0).cuda()
    scale = torch.tensor(2.0)  # a CPU scalar: its value is baked in at capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        counter.add_(1)
        out = data * scale + counter
    assert counter.item() == 0  # capture executed nothing that stays
    scale.fill_(100.0)
    graph.replay()
    graph.replay()
    assert counter.item() == 2 and out.tolist() == [2.0, 4.0, 6.0, 8.0]
    data.copy_(torch.ones(4))  # new inputs at the same address
    graph.replay()
    assert out.tolist() == [5.0, 5.0, 5.0, 5.0] and fake_gpu.captures == 1 and fake_gpu.replays == 3


@pytest.mark.parametrize("what", ["item", "to_host", "from_host"])
def test_host_traffic_inside_a_capture_raises(what, fake_gpu):
    x = torch.ones(3, device="cuda")
    graph = torch.cuda.CUDAGraph()
    with pytest.raises(DeviceError, match="operation not permitted when stream is capturing"):
        with torch.cuda.graph(graph):
            y = x * 2
            if what == "item":
                y.sum().item()
            elif what == "to_host":
                y.cpu()
            else:
                y.copy_(torch.zeros(3))
    assert fake_gpu.capture is None and x.tolist() == [1.0, 1.0, 1.0]


def test_a_fake_tensor_outside_the_context_is_refused():
    with fake_cuda():
        x = torch.ones(2, device="cuda")
    with pytest.raises(DeviceError, match="outside fake_cuda"):
        x + 1


def test_pinned_host_memory_is_emulated_and_can_fail(fake_gpu):
    """pin_memory gives a pinned CPU copy (counted); with pin_fails it raises as a host out of page-locked memory."""
    host = torch.arange(6, dtype=torch.float16)
    pinned = host.pin_memory()
    assert pinned.device.type == "cpu" and pinned.is_pinned() and not host.is_pinned()
    assert torch.equal(pinned, host) and pinned.data_ptr() != host.data_ptr() and fake_gpu.pinned_bytes == 12
    assert torch.equal(torch.empty(6, dtype=torch.float16, device="cuda").copy_(pinned, non_blocking=True).cpu(), host)
    fake_gpu.pin_fails = True
    with pytest.raises(RuntimeError, match="out of memory"):
        host.pin_memory()
