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
    """Decode-sized bf16 inputs never build the dense weight; prefill-sized ones do (whole, or a block of rows at a
    time on a CPU without a bf16 GEMM)."""
    q, scale = weights(256, 512, bits)
    w, layout = stored(q, bits)
    calls = []
    for name in ("dequantized_t", "dequantized_rows"):
        real = getattr(matmul, name)
        monkeypatch.setattr(matmul, name, lambda *a, _real=real, _name=name, **k: calls.append(_name) or _real(*a, **k))
    matmul.weight_only_linear(torch.randn(1, 512, dtype=torch.bfloat16), w, scale, bits, layout)
    assert calls == []
    matmul.weight_only_linear(torch.randn(200, 512, dtype=torch.bfloat16), w, scale, bits, layout)
    dense = "dequantized_rows" if cpu.needs_fp32_gemm(torch.empty(200, 512, dtype=torch.bfloat16)) else "dequantized_t"
    assert calls and set(calls) == {dense}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("bits", [8, 4])
def test_cuda_matches_reference(bits):
    q, scale = weights(512, 1024, bits)
    x = torch.randn(4, 1024, dtype=torch.float16, device="cuda")
    y = matmul.weight_only_linear(x, q.cuda(), scale.cuda(), bits)
    ref = reference(x.cpu(), q, scale, bits)
    assert (y.cpu().double() - ref).abs().max() <= 2e-3 * ref.abs().max()


# ---------------------------------------------------------------------------------------------------------------
# CPUs without a bf16 GEMM (AVX2-only): PyTorch's bf16 GEMM there is a scalar loop; disabling oneDNN gives this
# machine the same PyTorch path, so the fp32-block route is exercised (and needed) here as it is there.

@pytest.fixture
def no_bf16_gemm(monkeypatch):
    """This CPU as one without a bf16 GEMM; F.linear/torch.mm must then never see a bf16 matrix of many rows."""
    import torch.nn.functional as F
    seen = []
    real_linear, real_mm = F.linear, torch.mm

    def spy(real):
        def call(a, b, *rest, **kw):
            if a.dtype == torch.bfloat16 and a.numel() // a.shape[-1] > cpu.MAX_GEMV_ROWS:
                seen.append(tuple(a.shape))
            return real(a, b, *rest, **kw)
        return call
    monkeypatch.setattr(F, "linear", spy(real_linear))
    monkeypatch.setattr(torch, "mm", spy(real_mm))
    torch.backends.mkldnn.enabled = False  # (not mkldnn.flags(): it warns about TF32 on every call)
    try:
        assert not cpu.bf16_gemm_native()
        yield seen
    finally:
        torch.backends.mkldnn.enabled = True


@pytest.mark.parametrize("rows", [17, 300])
def test_bf16_linear_without_bf16_gemm_computes_in_fp32_blocks(rows, no_bf16_gemm):
    n, k = 2 * cpu.FP32_BLOCK_ROWS + 37, 96  # a partial last block
    x, w, b = (torch.randn(rows, k).bfloat16(), torch.randn(n, k).bfloat16(), torch.randn(n).bfloat16())
    y = cpu.linear(x.view(1, rows, k), w, b)
    assert no_bf16_gemm == [] and y.dtype == torch.bfloat16 and y.shape == (1, rows, n)
    ref = x.double() @ w.double().t() + b.double()
    # fp32 sums of bf16 products rounded once, as a bf16 GEMM: within one bf16 rounding of the exact value
    assert ((y[0].double() - ref).abs() <= 2 ** -8 * ref.abs() + 1e-6).all()


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("layout", ["original", "cpu_int4"])
def test_quantized_prefill_without_bf16_gemm(bits, layout, no_bf16_gemm):
    if layout == "cpu_int4" and (bits == 8 or not matmul.cpu_int4_supported(512, 256)):
        pytest.skip("CPU int4 layout: INT4 only, where this PyTorch packs a known way")
    q, scale = weights(512, 256, bits)
    w = matmul.to_cpu_int4(q) if layout == "cpu_int4" else q
    x = torch.randn(100, 256, dtype=torch.bfloat16)
    y = matmul.weight_only_linear(x, w, scale, bits, layout)
    assert no_bf16_gemm == [] and y.dtype == torch.bfloat16
    ref = reference(x, q, scale, bits)
    assert ((y.double() - ref).abs() <= 2 ** -8 * ref.abs() + 1e-6).all()  # exact q · scale: one bf16 rounding


def test_model_prefill_without_bf16_gemm_matches_the_native_path(no_bf16_gemm):
    from tests.helpers import load_fixture_model
    model = load_fixture_model(torch.bfloat16)
    n = 40
    tokens = torch.randint(20000, 60000, (1, n), generator=torch.Generator().manual_seed(0))
    positions = torch.arange(n)[None]
    mask = torch.ones(1, 1, n, n, dtype=torch.bool).triu(1)
    without = model.logits(tokens, positions, mask).float()
    assert no_bf16_gemm == []
    torch.backends.mkldnn.enabled = True
    native = model.logits(tokens, positions, mask).float()
    exact = load_fixture_model(torch.float32).logits(tokens, positions, mask)
    # both bf16 paths carry bf16 rounding; the fp32-block one is no further from the exact fp32 model
    assert (without - exact).abs().max() <= 1.5 * (native - exact).abs().max() + 1e-3
