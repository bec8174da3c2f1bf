"""--random-init: a random-weight model built directly on the device, INT8/INT4 storage created as such (no 16-bit
copy of the quantized weights), with finite outputs; at a small GLM-shaped config on CPU."""
import pytest
import torch

import initialize
from quantization import QuantizedLinearMixin
from quantization import layers as qlayers

SMALL = ["--num-layers", "2", "--hidden-size", "64", "--inner-hidden-size", "160", "--num-attention-heads", "4",
         "--vocab-size", "512", "--max-sequence-length", "64", "--device", "cpu", "--random-init"]


def _build(extra):
    args = initialize.parse_args(None, SMALL + extra)
    return initialize.build_model(args)


@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_storage_is_created_directly(bits, monkeypatch):
    def no_quantizing(*a, **k):
        raise AssertionError("random init must not quantize 16-bit weights")
    monkeypatch.setattr(qlayers, "quantize_weight", no_quantizing)
    model = _build(["--bf16", "--quantization-bit-width", str(bits)])
    linears = [m for m in model.modules() if isinstance(m, QuantizedLinearMixin)]
    assert len(linears) == 4 * 2
    for m in linears:
        cols = m.in_features if bits == 8 else m.in_features // 2
        w = m.original_weight()
        assert w.dtype == torch.int8 and w.shape == (m.out_features, cols) and w.device.type == "cpu"
        assert m.weight_scale.dtype == torch.float16 and (m.weight_scale > 0).all()
        assert w.float().std() > 10 if bits == 8 else w.float().std() > 30  # every byte random
    assert all(not p.is_meta for p in model.parameters())


@pytest.mark.parametrize("flags", [["--bf16"], ["--fp32"], ["--bf16", "--quantization-bit-width", "4"]])
def test_forward_is_finite_and_seeded(flags):
    a, b = _build(flags), _build(flags)
    tokens = torch.randint(0, 512, (2, 9), generator=torch.Generator().manual_seed(0))
    positions = torch.arange(9).expand(2, 9)
    mask = torch.zeros(1, 1, 9, 9, dtype=torch.bool)
    out_a, out_b = a(tokens, positions, mask)[0], b(tokens, positions, mask)[0]
    assert torch.isfinite(out_a.float()).all() and out_a.float().std() > 0
    assert torch.equal(out_a, out_b)
    assert abs(a.transformer.layers[0].input_layernorm.weight.float().mean().item() - 1.0) < 0.1


def test_random_init_needs_no_checkpoint():
    model = _build(["--bf16"])
    assert model.transformer.word_embeddings.weight.shape == (512, 64)
