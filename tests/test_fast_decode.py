"""The fused one-token decode step (model/fast_decode.py) on the fixture model against the exact fp32 path.

Runs the fixture model through the fused step in bf16 / INT8 / INT4 and requires its error against the exact fp32
model (with the same dequantized weights) to be no larger than that of the plain bf16 path. Skipped where the CPU
kernels cannot be built (the fused step is then never used).
"""
import pytest
import torch

from kernels import cpu
from model import fast_decode
from tests.helpers import fixture_cases, load_fixture_model

pytestmark = pytest.mark.skipif(not cpu.available(), reason="fast CPU kernels unavailable on this machine")


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
    real = fast_decode.decode_step

    def counting(*args, **kwargs):
        calls["n"] += 1
        return real(*args, **kwargs)
    monkeypatch.setattr(fast_decode, "decode_step", counting)
    return calls


def _slow(monkeypatch):
    monkeypatch.setattr(fast_decode, "applies", lambda *a, **k: False)


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
