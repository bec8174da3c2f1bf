"""kernels/cpu.py's ops against fp32 references on random data (tails, odd sizes, masks, every scale dtype).

Skipped where the kernels cannot be built on this CPU (the callers then use PyTorch).
"""
import pytest
import torch
import torch.nn.functional as F

from kernels import cpu

pytestmark = pytest.mark.skipif(not cpu.available(), reason="fast CPU kernels unavailable on this machine")

GEN = torch.Generator().manual_seed(0)


def randn(*shape, dtype=torch.float32):
    return torch.randn(*shape, generator=GEN).to(dtype)


def assert_close_bf16(out, ref, what, rtol=1e-2):
    """out (bf16 kernel output) within bf16 rounding of the fp32 reference, relative to the output's scale."""
    out, ref = out.float(), ref.float()
    scale = ref.abs().amax(dim=-1, keepdim=True).clamp_min(1e-6)
    err = ((out - ref).abs() / scale).max().item()
    assert err <= rtol, f"{what}: max error {err:.3g} of the row scale > {rtol}"


# ---------------------------------------------------------------------------------------------------------------
# Matrix x vector

@pytest.mark.parametrize("m", [1, 2, 3, 8, 11, 16])
@pytest.mark.parametrize("k", [64, 100, 1536])
def test_gemv_bf16(m, k):
    n = 67
    x, w, b = randn(m, k, dtype=torch.bfloat16), randn(n, k, dtype=torch.bfloat16), randn(n, dtype=torch.bfloat16)
    ref = x.float() @ w.float().t() + b.float()
    out = cpu.gemv_bf16(x, w, b)
    assert out.dtype == torch.bfloat16 and out.shape == (m, n)
    assert_close_bf16(out, ref, f"gemv_bf16 m={m} k={k}")
    assert_close_bf16(cpu.gemv_bf16(x.view(m, 1, k), w).view(m, n), ref - b.float(), "no bias, 3-D x")


@pytest.mark.parametrize("m", [1, 2, 3, 8, 16])  # 1-2 rows use the nibble decoder, more the conversion one
@pytest.mark.parametrize("k", [64, 100, 4096])
@pytest.mark.parametrize("scale_dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_gemv_int8(m, k, scale_dtype):
    n = 45
    x = randn(m, k, dtype=torch.bfloat16)
    q = torch.randint(-128, 128, (n, k), generator=GEN, dtype=torch.int8)
    q[0, :] = -128  # extremes
    q[1, :] = 127
    scale = (torch.rand(n, generator=GEN) * 0.02 + 1e-3).to(scale_dtype)
    b = randn(n, dtype=torch.bfloat16)
    ref = x.float() @ (q.float() * scale.float()[:, None]).t() + b.float()
    assert_close_bf16(cpu.gemv_int8(x, q, scale, b), ref, f"gemv_int8 m={m} k={k}")


@pytest.mark.parametrize("m", [1, 2, 5, 16])
@pytest.mark.parametrize("k", [64, 100, 4096])
def test_gemv_int4(m, k):
    from quantization.functional import pack_int4, unpack_int4
    n = 37
    x = randn(m, k, dtype=torch.bfloat16)
    q = torch.randint(-8, 8, (n, k), generator=GEN, dtype=torch.int8)
    q[0, :] = -8
    q[1, :] = 7
    packed = pack_int4(q)
    assert torch.equal(unpack_int4(packed), q)
    scale = (torch.rand(n, generator=GEN) * 0.1 + 1e-3).half()
    ref = x.float() @ (q.float() * scale.float()[:, None]).t()
    assert_close_bf16(cpu.gemv_int4(x, packed, scale), ref, f"gemv_int4 m={m} k={k}")


def test_linear_fallback_and_weight_only_routing(monkeypatch):
    """linear() leaves inputs the kernels do not take (fp32, more than MAX_GEMV_ROWS rows) to F.linear;
    quantization.weight_only_linear sends decode-sized bf16 inputs in the stored layout to the GEMV kernels."""
    from quantization import weight_only_linear
    x32, w = randn(3, 64), randn(10, 64)
    assert torch.equal(cpu.linear(x32, w), F.linear(x32, w))
    xb = randn(cpu.MAX_GEMV_ROWS + 1, 64, dtype=torch.bfloat16)
    wb = w.bfloat16()
    assert torch.equal(cpu.linear(xb, wb), F.linear(xb, wb))
    q = torch.randint(-8, 8, (10, 64), generator=GEN, dtype=torch.int8)
    scale = torch.rand(10, generator=GEN).half()
    calls = []
    monkeypatch.setattr(cpu, "gemv_int8", lambda *a: calls.append(8) or torch.zeros(1))
    monkeypatch.setattr(cpu, "gemv_int4", lambda *a: calls.append(4) or torch.zeros(1))
    weight_only_linear(randn(2, 64, dtype=torch.bfloat16), q, scale, 8)
    weight_only_linear(randn(2, 64, dtype=torch.bfloat16), q[:, ::2].contiguous(), scale, 4)
    weight_only_linear(x32, q, scale, 8)  # fp32: dequantize + matmul
    weight_only_linear(xb, q, scale, 8)  # too many rows for a GEMV
    assert calls == [8, 4]


def test_read_bandwidth_probe_sums():
    x = torch.rand(1_000_003)
    assert cpu.read_bandwidth_probe(x) == pytest.approx(float(x.double().sum()), rel=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# Fused decode helpers

def rope_reference(x, cos, sin):
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


@pytest.mark.parametrize("d", [16, 128])
def test_decode_attention(d):
    b, heads, t, pos = 3, 4, 40, 29
    qkv = randn(b, 1, heads * 3 * d, dtype=torch.bfloat16)
    angles = randn(b, 1, 1, d // 2) * 3
    cos = torch.cat([angles.cos(), angles.cos()], -1).bfloat16()
    sin = torch.cat([angles.sin(), angles.sin()], -1).bfloat16()
    k_cache, v_cache = randn(b, heads, t, d, dtype=torch.bfloat16), randn(b, heads, t, d, dtype=torch.bfloat16)
    k_before, v_before = k_cache.clone(), v_cache.clone()
    mask = torch.zeros(b, 1, 1, pos + 1, dtype=torch.bool)
    mask[1, ..., 3:9] = True  # some cached positions hidden
    mask[2] = True  # everything hidden: attends uniformly, as SAT's finite mask value does
    out = torch.ops.glm_cpu.decode_attention(qkv, cos, sin, k_cache, v_cache, pos, mask.view(b, -1))

    q, k, v = qkv.float().view(b, 1, heads, 3 * d).transpose(1, 2).chunk(3, dim=-1)
    q, k = rope_reference(q, cos.float(), sin.float()), rope_reference(k, cos.float(), sin.float())
    keys = torch.cat([k_before.float()[:, :, :pos], k], dim=2)
    values = torch.cat([v_before.float()[:, :, :pos], v], dim=2)
    scores = (q @ keys.transpose(-1, -2)) / d ** 0.5
    scores = scores.masked_fill(mask, -1e30)
    scores[2] = 0.0
    ref = (torch.softmax(scores, -1) @ values).transpose(1, 2).reshape(b, 1, heads * d)
    assert_close_bf16(out, ref, "decode_attention", rtol=2e-2)
    assert_close_bf16(k_cache[:, :, pos], k[:, :, 0], "cached key")
    assert torch.equal(v_cache[:, :, pos], v[:, :, 0].bfloat16())
    assert torch.equal(k_cache[:, :, :pos], k_before[:, :, :pos]) and torch.equal(k_cache[:, :, pos + 1:], k_before[:, :, pos + 1:])


def test_geglu_and_add_layernorm():
    u = randn(3, 1, 2 * 300, dtype=torch.bfloat16) * 3
    a, g = u.float().chunk(2, dim=-1)
    assert_close_bf16(torch.ops.glm_cpu.geglu(u), a * F.gelu(g), "geglu")
    x, r = randn(2, 1, 200, dtype=torch.bfloat16), randn(2, 1, 200, dtype=torch.bfloat16)
    w, b = randn(200, dtype=torch.bfloat16), randn(200, dtype=torch.bfloat16)
    h = (x.float() * 2.5 + r.float()).bfloat16().float()
    ref = F.layer_norm(h, (200,), w.float(), b.float(), 1e-5)
    assert_close_bf16(torch.ops.glm_cpu.add_layernorm(x, r, 2.5, w, b, 1e-5), ref, "add_layernorm")


