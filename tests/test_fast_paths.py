"""The fast CPU paths (kernels/cpu_gemv.py) against exact fp32 arithmetic and the model's exact path.

Kernel tests compare with fp32 references on random data (tails, odd sizes, masks, every scale dtype). Model tests
run the fixture model through the fused one-token decode step in bf16 / INT8 / INT4 and require its error against
the exact fp32 model (with the same dequantized weights) to be no larger than that of the plain bf16 path.
Skipped where the CPU lacks AVX-512 BF16 (the kernels are then never used).
"""
import pytest
import torch
import torch.nn.functional as F

from kernels import cpu_gemv
from tests.helpers import fixture_cases, load_fixture_model

pytestmark = pytest.mark.skipif(not cpu_gemv.available(), reason="fast CPU kernels unavailable on this machine")

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
    out = cpu_gemv.gemv_bf16(x, w, b)
    assert out.dtype == torch.bfloat16 and out.shape == (m, n)
    assert_close_bf16(out, ref, f"gemv_bf16 m={m} k={k}")
    assert_close_bf16(cpu_gemv.gemv_bf16(x.view(m, 1, k), w).view(m, n), ref - b.float(), "no bias, 3-D x")


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
    assert_close_bf16(cpu_gemv.gemv_int8(x, q, scale, b), ref, f"gemv_int8 m={m} k={k}")


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
    assert_close_bf16(cpu_gemv.gemv_int4(x, packed, scale), ref, f"gemv_int4 m={m} k={k}")


def test_linear_fallback_and_weight_only_routing(monkeypatch):
    """linear() leaves inputs the kernels do not take (fp32, more than MAX_GEMV_ROWS rows) to F.linear;
    kernels.weight_only_linear sends decode-sized bf16 inputs in the stored layout to the GEMV kernels."""
    import kernels
    x32, w = randn(3, 64), randn(10, 64)
    assert torch.equal(cpu_gemv.linear(x32, w), F.linear(x32, w))
    xb = randn(cpu_gemv.MAX_GEMV_ROWS + 1, 64, dtype=torch.bfloat16)
    wb = w.bfloat16()
    assert torch.equal(cpu_gemv.linear(xb, wb), F.linear(xb, wb))
    q = torch.randint(-8, 8, (10, 64), generator=GEN, dtype=torch.int8)
    scale = torch.rand(10, generator=GEN).half()
    calls = []
    monkeypatch.setattr(cpu_gemv, "gemv_int8", lambda *a: calls.append(8) or torch.zeros(1))
    monkeypatch.setattr(cpu_gemv, "gemv_int4", lambda *a: calls.append(4) or torch.zeros(1))
    kernels.weight_only_linear(randn(2, 64, dtype=torch.bfloat16), q, scale, 8)
    kernels.weight_only_linear(randn(2, 64, dtype=torch.bfloat16), q[:, ::2].contiguous(), scale, 4)
    kernels.weight_only_linear(x32, q, scale, 8)  # fp32: dequantize + matmul
    kernels.weight_only_linear(xb, q, scale, 8)  # too many rows for a GEMV
    assert calls == [8, 4]


def test_read_bandwidth_probe_sums():
    x = torch.rand(1_000_003)
    assert cpu_gemv.read_bandwidth_probe(x) == pytest.approx(float(x.double().sum()), rel=1e-5)


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


# ---------------------------------------------------------------------------------------------------------------
# The fused decode step on the fixture model, against the exact fp32 path

def _decode_rows(model, steps=6, batch=1, pad=0, reorder=None):
    """Prompt (bidirectional) then `steps` teacher-forced one-token steps; the logits rows of every step [steps, b, V].
    pad > 0 hides the first `pad` context tokens of row 0 (a left-padded batch); `reorder` re-selects the cache rows
    after the prompt (as beam search does)."""
    from model import KVCache
    prompt = fixture_cases()["gen"]["prompt"]
    ctx = len(prompt)
    forced = [20000 + 37 * i for i in range(steps)]
    tokens = torch.tensor([prompt[i:] + prompt[:i] for i in range(batch)])  # different rows
    mask = torch.zeros(batch, 1, ctx, ctx, dtype=torch.bool)
    mask[0, :, :, :pad] = True
    cache = KVCache(model, batch, ctx + steps)
    model.forward_with_cache(tokens, torch.arange(ctx).expand(batch, ctx), mask, cache)
    hidden = torch.zeros(batch, 1, 1, ctx, dtype=torch.bool)
    hidden[0, ..., :pad] = True
    if reorder is not None:
        cache.reorder(torch.tensor(reorder))
        hidden, batch = hidden[reorder], len(reorder)
    rows = []
    for tok in forced:
        n = cache.length
        step_mask = torch.cat([hidden, torch.zeros(batch, 1, 1, n + 1 - ctx, dtype=torch.bool)], dim=-1)
        logits = model.forward_with_cache(torch.full((batch, 1), tok), torch.full((batch, 1), n), step_mask, cache)
        rows.append(logits[:, -1].float())
    return torch.stack(rows)


def _count_fast_steps(monkeypatch):
    calls = {"n": 0}
    real = cpu_gemv.decode_step

    def counting(*args, **kwargs):
        calls["n"] += 1
        return real(*args, **kwargs)
    monkeypatch.setattr(cpu_gemv, "decode_step", counting)
    return calls


def _slow(monkeypatch):
    monkeypatch.setattr(cpu_gemv, "fast_decode_applies", lambda *a, **k: False)


def _max_err(rows, ref):
    return (rows - ref).abs().max().item()


@pytest.mark.parametrize("batch,pad,reorder", [(1, 0, None), (3, 2, None), (2, 3, [1, 1, 0])])
def test_fast_bf16_decode_vs_exact(monkeypatch, batch, pad, reorder):
    exact = _decode_rows(load_fixture_model(torch.float32, attention="plain"), batch=batch, pad=pad, reorder=reorder)
    model = load_fixture_model(torch.bfloat16, attention="auto")
    calls = _count_fast_steps(monkeypatch)
    fast = _decode_rows(model, batch=batch, pad=pad, reorder=reorder)
    assert calls["n"] == 6, "the fused decode step was not used"
    with monkeypatch.context() as m:
        _slow(m)
        plain = _decode_rows(model, batch=batch, pad=pad, reorder=reorder)
    err_fast, err_plain = _max_err(fast, exact), _max_err(plain, exact)
    assert err_fast <= 1.5 * err_plain + 0.02, f"fused bf16 decode error {err_fast:.3g} vs unfused {err_plain:.3g}"
    assert (fast.argmax(-1) == exact.argmax(-1)).float().mean() >= 0.9


@pytest.mark.parametrize("bits", [8, 4])
def test_fast_quantized_decode_vs_exact(monkeypatch, bits):
    """INT8/INT4 fused decode against the exact fp32 model holding the same dequantized weights."""
    from quantization import QuantizedLinearMixin, dequantize, quantize
    model = load_fixture_model(torch.bfloat16, attention="auto")
    quantize(model, bits)
    exact_model = load_fixture_model(torch.float32, attention="plain")
    for name, module in model.named_modules():
        if isinstance(module, QuantizedLinearMixin):
            target = exact_model.get_submodule(name)
            target.weight.data = dequantize(module.weight, module.weight_scale, bits, torch.float32)
            target.bias.data = module.bias.float()
    exact = _decode_rows(exact_model)
    calls = _count_fast_steps(monkeypatch)
    fast = _decode_rows(model)
    assert calls["n"] == 6
    with monkeypatch.context() as m:
        _slow(m)
        plain = _decode_rows(model)
    err_fast, err_plain = _max_err(fast, exact), _max_err(plain, exact)
    assert err_fast <= 1.5 * err_plain + 0.02, f"fused INT{bits} decode error {err_fast:.3g} vs unfused {err_plain:.3g}"


def test_fast_path_not_taken_for_exact_models(monkeypatch):
    """fp32 models (the exact reference) and --attention plain never use the fused step or the GEMV kernels."""
    calls = _count_fast_steps(monkeypatch)
    _decode_rows(load_fixture_model(torch.float32, attention="plain"), steps=2)
    _decode_rows(load_fixture_model(torch.bfloat16, attention="plain"), steps=2)
    assert calls["n"] == 0


def test_generation_loop_uses_fast_path(monkeypatch):
    """generation's batch_filling_sequence (greedy) goes through the fused step and picks the same tokens."""
    from generation.decoding import batch_filling_sequence
    from generation.strategies import BaseStrategy
    model = load_fixture_model(torch.bfloat16, attention="auto")
    prompt = torch.tensor([fixture_cases()["gen"]["prompt"]])
    ctx, total = prompt.shape[1], prompt.shape[1] + 5

    def layout(seqs):
        allowed = torch.ones(total, total).tril()
        allowed[:, :ctx - 1] = 1
        return seqs, (allowed < 0.5).view(1, 1, total, total), torch.arange(total).view(1, -1)

    def generate():
        strategy = BaseStrategy(batch_size=1, top_k=1, invalid_slices=[slice(0, 20000), slice(150000, None)])
        return batch_filling_sequence(model, prompt, [ctx], strategy, layout)[0]
    calls = _count_fast_steps(monkeypatch)
    fast = generate()
    assert calls["n"] == 4
    with monkeypatch.context() as m:
        _slow(m)
        plain = generate()
    assert torch.equal(torch.as_tensor(fast), torch.as_tensor(plain))


def test_fused_step_sees_weights_changed_in_place(monkeypatch):
    """The fused step's tensor lists are the modules' own parameters: a later in-place update (e.g. loading into the
    same model) is used, not a stale copy."""
    model = load_fixture_model(torch.bfloat16, attention="auto")
    _decode_rows(model, steps=2)  # builds the kernel plan
    with torch.no_grad():
        model.transformer.layers[0].post_attention_layernorm.weight.mul_(-1.5)
        model.transformer.final_layernorm.bias.add_(0.25)
    calls = _count_fast_steps(monkeypatch)
    fast = _decode_rows(model, steps=2)
    assert calls["n"] == 2
    with monkeypatch.context() as m:
        _slow(m)
        plain = _decode_rows(model, steps=2)
    assert _max_err(fast, plain) < 0.1 * plain.abs().max().item()
