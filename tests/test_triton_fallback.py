"""A failure of the fused Triton kernels, of any kind, on the (fake, tests/fake_cuda.py) GPU: one warning naming the
cause, then PyTorch's dequantize-then-matmul path with correct results, and no exception; during a CUDA graph capture
the error reaches the capture, whose own fallback runs the step eagerly."""
import subprocess
import sys
import warnings

import pytest
import torch

from generation import BaseStrategy, generation_layout
from generation.graph_decode import static_filling_sequence
from kernels import triton_matmul
from quantization import matmul
from quantization.functional import dequantize, quantize_weight
from tests.fake_cuda import FAKE_TRITON_KERNELS, fake_cuda, fake_gpu  # noqa: F401  (fixture)
from tests.test_generation_decoding import END, TEXT_ONLY, _prompts

NO_COMPILER = RuntimeError("Failed to find C compiler. Please specify via CC environment variable or set "
                           "triton.knobs.build.impl.")


def _case(bits, rows=3, n=48, k=64):
    gen = torch.Generator().manual_seed(bits)
    q, scale = quantize_weight((torch.randn(n, k, generator=gen) * k ** -0.5).half(), bits)
    x = torch.randn(rows, k, generator=gen).half()
    return x, q, scale, (x.float() @ dequantize(q, scale, bits, torch.float32).T)


class _FailingKernels:
    """Kernels whose launch raises `error` (counted), where Triton's compiler or launcher build would."""

    def __init__(self, error, only_during_capture=False):
        self.error, self.only_during_capture, self.attempts = error, only_during_capture, 0

    def __getattr__(self, name):
        real = getattr(FAKE_TRITON_KERNELS, name)
        outer = self

        class Kernel:
            def __getitem__(self, grid):
                def launch(*args, **kwargs):
                    if not outer.only_during_capture or torch.cuda.is_current_stream_capturing():
                        outer.attempts += 1
                        raise outer.error
                    return real[grid](*args, **kwargs)
                return launch
        return Kernel()


def _run_three_times(bits):
    x, q, scale, ref = _case(bits)
    xs, qs, ss = x.cuda(), q.cuda(), scale.cuda()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        outs = [matmul.weight_only_linear(xs, qs, ss, bits) for _ in range(3)]
    for y in outs:
        assert y.device.type == "cuda" and y.dtype == torch.float16
        assert torch.allclose(y.float().cpu(), ref, rtol=0, atol=2e-3 * ref.abs().max().item())
    return [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]


@pytest.mark.parametrize("bits", [8, 4])
def test_kernels_run_when_nothing_fails(bits, fake_gpu):
    launches = fake_gpu.triton_launches
    assert _run_three_times(bits) == []
    assert fake_gpu.triton_launches - launches == 3


def test_triton_that_does_not_import(monkeypatch):
    """triton is installed but its import fails: available() says no, once, with the import error."""
    import kernels
    monkeypatch.setattr(triton_matmul, "triton_importable", lambda: True)
    monkeypatch.setitem(sys.modules, "triton", None)  # `import triton` raises ImportError
    monkeypatch.delitem(sys.modules, "kernels.triton_wo_kernels", raising=False)
    monkeypatch.delattr(kernels, "triton_wo_kernels", raising=False)
    triton_matmul._kernels.cache_clear()
    with fake_cuda(triton=False):
        messages = _run_three_times(8)
    assert len(messages) == 1 and "triton does not import (ModuleNotFoundError" in messages[0]
    assert "cuda:0" in messages[0] and "dequantize-then-matmul" in messages[0]


CAUSES = {
    "compile": (RuntimeError("PTX codegen error: ptxas fatal: Unresolved extern function"), "PTX codegen error"),
    "no_compiler": (NO_COMPILER, "needs a C compiler"),
    "no_python_h": (subprocess.CalledProcessError(1, ["gcc", "cuda_utils.c", "-O3", "-shared"]),
                    "which needs Python.h, missing here"),
}


@pytest.mark.parametrize("cause", list(CAUSES))
def test_a_kernel_that_fails_at_launch(cause, fake_gpu, monkeypatch, tmp_path):
    """A compilation error, or Triton's launcher build without a C compiler or without Python.h: one warning
    naming it, the correct product from PyTorch's path, and Triton is not tried again on that device."""
    error, named = CAUSES[cause]
    kernels = _FailingKernels(error)
    monkeypatch.setattr(triton_matmul, "_kernels", lambda: kernels)
    if cause == "no_python_h":
        import sysconfig
        monkeypatch.setattr(sysconfig, "get_paths", lambda *a, **k: {"include": str(tmp_path)})
    messages = _run_three_times(4)
    assert len(messages) == 1 and named in messages[0], messages
    assert kernels.attempts == 1


def test_a_failure_during_graph_capture_reaches_the_capture_which_falls_back(fake_gpu, monkeypatch):
    """The kernels work eagerly but fail inside the capture: weight_only_linear re-raises there (no Triton
    warning), the capture fails with one warning, and decoding goes on eagerly with the kernels, giving the ids of a
    run without graphs."""
    rows, mask_positions, gmask = _prompts()
    model = fake_gpu.build_fixture_model("--fp16", ["--quantization-bit-width", "4"])
    seqs, lengths, layout = generation_layout(rows, mask_positions, gmask, 5, "cuda")

    def decode(use_graph):
        strategy = BaseStrategy(top_k=1, end_tokens=END, invalid_slices=TEXT_ONLY)
        return static_filling_sequence(model, seqs.cuda(), lengths, strategy, layout, use_graph=use_graph)[0]
    expected = decode(False).tolist()
    kernels = _FailingKernels(RuntimeError("an illegal instruction in capture"), only_during_capture=True)
    monkeypatch.setattr(triton_matmul, "_kernels", lambda: kernels)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = decode(True).tolist()
        again = decode(True).tolist()  # the device is known not to capture now: eager, no new warning
    messages = [str(w.message) for w in caught]
    assert got == expected == again
    assert kernels.attempts == 1 and fake_gpu.captures == 1
    assert len(messages) == 1 and "CUDA graph capture of the decode step failed on cuda:0" in messages[0]
    assert "an illegal instruction in capture" in messages[0]
    assert triton_matmul.available(torch.device("cuda", 0))
