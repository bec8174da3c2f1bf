"""Weight-only matmul kernels against the plain reference path (dequantize, then a float64 matmul)."""
import functools

import pytest
import torch

from kernels import cpu
from quantization import matmul
from quantization.functional import dequantize, quantize_weight

SHAPES = [(192, 64), (256, 512), (4608, 1536), (96, 96)]  # (N, K); 96 rows do not fit 64-row int4 blocks


@functools.lru_cache(maxsize=None)
def weights(n, k, bits, seed=0):
    gen = torch.Generator().manual_seed(seed)
    w = (torch.randn(n, k, generator=gen) * k ** -0.5).half()
    return quantize_weight(w, bits)


def reference(x, q, scale, bits):
    return (x.double() @ dequantize(q, scale, bits, torch.float64).T)


def stored(q, bits):
    """The weight as the quantized layers keep it on a CPU without this project's GEMV kernels (INT4 repacked for
    PyTorch's int4 kernel when the shape allows)."""
    if bits == 4 and matmul.cpu_int4_supported(q.shape[0], 2 * q.shape[1]):
        return matmul.to_cpu_int4(q), "cpu_int4"
    return q, "original"


@pytest.mark.parametrize("n,k", [(64, 64), (128, 256), (4608, 1536), (1536, 4096)])
def test_cpu_int4_layout_matches_library_packing(n, k):
    """PyTorch packs 64-row blocks where its kernel uses AVX-512 and 32-row blocks with AVX2: both are recognised."""
    assert matmul.cpu_int4_block() == {"AVX512": 64, "AVX2": 32}.get(torch.backends.cpu.get_cpu_capability(),
                                                                     matmul.cpu_int4_block())
    if not matmul.cpu_int4_block():
        pytest.skip("this PyTorch's CPU int4 kernel packs in neither known layout")
    q, _ = weights(n, k, 4)
    unsigned = torch.stack([q >> 4, (q << 4) >> 4], dim=-1).reshape(n, k).to(torch.int32) + 8
    assert torch.equal(matmul.to_cpu_int4(q), torch.ops.aten._convert_weight_to_int4pack_for_cpu(unsigned, 1))
    assert torch.equal(matmul.from_cpu_int4(matmul.to_cpu_int4(q)), q)


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("n,k", SHAPES)
@pytest.mark.parametrize("rows", [1, 5, 100])  # decode, small batch, prefill
@pytest.mark.parametrize("path", ["library", "gemv"])  # PyTorch's packed kernels / this project's GEMV kernels
def test_bf16_matches_reference(bits, n, k, rows, path, monkeypatch):
    q, scale = weights(n, k, bits)
    if path == "library":
        monkeypatch.setattr(cpu, "applies", lambda x: False)
        w, layout = stored(q, bits)
    elif not cpu.available():
        pytest.skip("this CPU lacks AVX-512 BF16: no GEMV kernels")
    else:
        w, layout = q, "original"
    x = torch.randn(rows, k, dtype=torch.bfloat16)
    y = matmul.weight_only_linear(x, w, scale, bits, layout)
    ref = reference(x, q, scale, bits)
    assert y.dtype == torch.bfloat16 and y.shape == (rows, n)
    # bf16 keeps 8 bits: outputs (and the bf16-rounded row scales) carry ~2^-8 relative error
    assert ((y.double() - ref).abs() <= 2 ** -7 * ref.abs() + 2 ** -7 * ref.abs().max()).all()


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float16, 2e-3)])
def test_fp32_and_fp16_match_reference(bits, dtype, tol):
    n, k = 256, 512
    q, scale = weights(n, k, bits)
    w, layout = stored(q, bits)
    x = torch.randn(2, 7, k, dtype=dtype)
    y = matmul.weight_only_linear(x, w, scale, bits, layout)
    ref = reference(x.reshape(-1, k), q, scale, bits).reshape(2, 7, n)
    assert y.dtype == dtype and y.shape == (2, 7, n)
    assert (y.double() - ref).abs().max() <= tol * ref.abs().max()


@pytest.mark.parametrize("bits", [8, 4])
def test_fp16_uses_the_original_dequantized_weight(bits):
    """fp16 activations: exactly F.linear with the original's fp16 weight round(q * scale)."""
    q, scale = weights(128, 256, bits)
    w, layout = stored(q, bits)
    assert torch.equal(matmul.dequantized_t(w, scale, bits, layout, torch.float16).t(),
                       dequantize(q, scale, bits, torch.float16))
    x = torch.randn(3, 256, dtype=torch.float16)
    y = matmul.weight_only_linear(x, w, scale, bits, layout)
    ref = torch.mm(x, dequantize(q, scale, bits, torch.float16).t().contiguous())
    assert torch.allclose(y.float(), ref.float(), rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("bits", [8, 4])
def test_kernel_path_is_taken_for_decode(bits, monkeypatch):
    """Decode-sized bf16 inputs never build the dense weight; prefill-sized ones do."""
    q, scale = weights(256, 512, bits)
    w, layout = stored(q, bits)
    calls = []
    real = matmul.dequantized_t
    monkeypatch.setattr(matmul, "dequantized_t", lambda *a, **k: calls.append(1) or real(*a, **k))
    matmul.weight_only_linear(torch.randn(1, 512, dtype=torch.bfloat16), w, scale, bits, layout)
    assert calls == []
    matmul.weight_only_linear(torch.randn(200, 512, dtype=torch.bfloat16), w, scale, bits, layout)
    assert calls == [1]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("bits", [8, 4])
def test_cuda_matches_reference(bits):
    q, scale = weights(512, 1024, bits)
    x = torch.randn(4, 1024, dtype=torch.float16, device="cuda")
    y = matmul.weight_only_linear(x, q.cuda(), scale.cuda(), bits)
    ref = reference(x.cpu(), q, scale, bits)
    assert (y.cpu().double() - ref).abs().max() <= 2e-3 * ref.abs().max()
