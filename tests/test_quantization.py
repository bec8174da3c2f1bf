"""Weight-only quantization: the original's formula bit for bit, its storage format, both loading paths, memory."""
import pathlib
import subprocess
import sys

import numpy as np
import pytest
import torch

from model.errors import UserError
from quantization import (check_quantization_matches, checkpoint_preparer, dequantize, fp16_linear_bytes, pack_int4,
                          quantize, quantize_state_dict, quantize_weight, quantized_linear_bytes, unpack_int4)
from quantization.layers import QuantizedLinearMixin

FIXTURE = pathlib.Path(__file__).parent / "data" / "sat-parity-tiny"
if not FIXTURE.is_dir():
    FIXTURE = pathlib.Path("/work/shared/fixtures/sat-parity-tiny")
ROOT = pathlib.Path(__file__).resolve().parent.parent


def numpy_reference(w16: np.ndarray, bits: int):
    """The original's formula in numpy: fp16 scale from an fp32 quotient, fp16 w/scale from a float64 quotient
    (numpy rounds float64 -> float16 directly), np.rint (half to even), saturated to the storage range (only
    reached with subnormal scales), and INT4 packed with uint8 arithmetic."""
    level = {8: 127, 4: 7}[bits]
    scale = (np.abs(w16).max(axis=-1).astype(np.float32) / np.float32(level)).astype(np.float16)
    with np.errstate(invalid="ignore", divide="ignore"):
        ratio = (w16.astype(np.float64) / scale.astype(np.float64)[:, None]).astype(np.float16)
    q = np.clip(np.nan_to_num(np.rint(ratio)), -(level + 1), level).astype(np.int8)  # 0/0 in the zero row -> 0
    if bits == 4:
        u = q.view(np.uint8) & 0x0F
        q = ((u[:, 0::2] << 4) | u[:, 1::2]).astype(np.uint8).view(np.int8)
    return q, scale


def random_weights(rows=96, cols=160, seed=0):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=gen) * torch.logspace(-4, 1, rows)[:, None]  # many magnitudes
    w[3, :] = 0.0  # an all-zero row
    w[5, ::7] = 1e-7  # fp16 subnormals
    return w.half()


@pytest.mark.parametrize("bits", [8, 4])
def test_quantize_matches_independent_reference_bit_for_bit(bits):
    w = random_weights()
    q, scale = quantize_weight(w, bits)
    ref_q, ref_scale = numpy_reference(w.numpy(), bits)
    assert q.dtype == torch.int8 and scale.dtype == torch.float16
    assert q.shape == (96, 160 if bits == 8 else 80) and scale.shape == (96,)
    assert np.array_equal(scale.numpy().view(np.uint16), ref_scale.view(np.uint16))
    assert np.array_equal(q.numpy(), ref_q)
    assert (unpack_int4(q) if bits == 4 else q).abs().max() <= {8: 127, 4: 7}[bits]


def test_round_half_to_even():
    s = 2.0 ** -8  # scale of a row whose max is 127 * 2^-8: all quotients below are exact halves
    w = torch.tensor([[127 * s, 2.5 * s, 3.5 * s, -2.5 * s, 0.5 * s, -0.5 * s, 1.5 * s, 126.5 * s]]).half()
    q, scale = quantize_weight(w, 8)
    assert scale.item() == s
    assert q.tolist() == [[127, 2, 4, -2, 0, 0, 2, 126]]


def test_fp32_division_reproduces_fp16_arithmetic():
    """The original divides fp16 tensors on the GPU; fp32 quotients rounded to fp16 equal correctly rounded fp16
    quotients (checked over every finite fp16 numerator), and its `amax / 127` (CUDA: amax * fp32(1/127)) equals
    the exact quotient for every fp16 amax."""
    a = torch.arange(0, 0x7C00, dtype=torch.int32).to(torch.int16).view(torch.float16)  # all finite a >= 0
    a64 = a.numpy().astype(np.float64)
    np.seterr(over="ignore")
    for b in torch.tensor([1e-4, 3.1e-3, 0.0078125, 0.0153, 0.33, 1.0, 7.77]).half():
        ours = (a.float() / b.float()).half()
        exact = (a64 / float(b)).astype(np.float16)
        assert np.array_equal(ours.numpy().view(np.uint16), exact.view(np.uint16))
        assert torch.equal((a / b).view(torch.int16), ours.view(torch.int16))  # torch's own fp16 division agrees
    for level in (127, 7):
        exact = (a64 / level).astype(np.float16)
        reciprocal = (a.numpy().astype(np.float32) * np.float32(1 / level)).astype(np.float16)
        ours = (a.float() / level).half().numpy()
        assert np.array_equal(ours.view(np.uint16), exact.view(np.uint16))
        assert np.array_equal(reciprocal.view(np.uint16), exact.view(np.uint16))


def test_int4_packing_layout():
    q = torch.tensor([[-8, 7, 1, -1], [0, -1, 7, 0]], dtype=torch.int8)
    packed = pack_int4(q)
    assert packed.view(torch.uint8).tolist() == [[0x87, 0x1F], [0x0F, 0x70]]  # even column in the high nibble
    every = torch.cartesian_prod(torch.arange(-8, 8), torch.arange(-8, 8)).to(torch.int8).reshape(1, -1)
    assert torch.equal(unpack_int4(pack_int4(every)), every)


@pytest.mark.parametrize("bits", [8, 4])
def test_dequantize_is_q_times_scale(bits):
    w = random_weights()
    q, scale = quantize_weight(w, bits)
    qi = unpack_int4(q) if bits == 4 else q
    assert torch.equal(dequantize(q, scale, bits, torch.float32), qi.float() * scale.float()[:, None])
    err = (dequantize(q, scale, bits, torch.float32) - w.float()).abs()
    normal = scale.float() >= 2.0 ** -14  # subnormal fp16 scales are coarse: no half-step bound there
    assert normal.sum() > 60
    assert (err[normal] <= scale.float()[normal, None] * 0.54).all()  # half a step + fp16 rounding of w/scale


def test_check_quantization_matches():
    w = random_weights(192, 64)
    dense = {"transformer.layers.0.input_layernorm.weight": torch.ones(64),
             "transformer.layers.0.attention.query_key_value.weight": w,
             "transformer.layers.0.attention.dense.weight": w[:64]}

    def quantized(bits):
        sd = dict(dense)
        for k in ("transformer.layers.0.attention.query_key_value.weight", "transformer.layers.0.attention.dense.weight"):
            sd[k], sd[k + "_scale"] = quantize_weight(dense[k], bits)
        return sd

    assert check_quantization_matches(dense, None, False) is None
    assert check_quantization_matches(dense, 8, False) is None
    assert check_quantization_matches(quantized(8), 8, True) == 8
    assert check_quantization_matches(quantized(4), 4, True) == 4
    cases = [(quantized(8), None, False, "--quantization-bit-width 8 --from-quantized-checkpoint"),
             (quantized(4), 4, False, "--from-quantized-checkpoint"),
             (dense, 8, True, "holds 16-bit weights"),
             (quantized(4), 8, True, "pass --quantization-bit-width 4"),
             (quantized(8), 4, True, "pass --quantization-bit-width 8")]
    for sd, bits, from_q, fragment in cases:
        with pytest.raises(UserError, match=fragment):
            check_quantization_matches(sd, bits, from_q, "ckpt")
    partial = quantized(8)
    del partial["transformer.layers.0.attention.dense.weight_scale"]
    with pytest.raises(UserError, match="partly quantized"):
        check_quantization_matches(partial, 8, True)


# ---------------------------------------------------------------------------------------------------------------
# Quantized layers and models

def small_model(dtype=torch.bfloat16, hidden=512, inner=1024, layers=2):
    from model import GLM130B, GLMConfig
    torch.manual_seed(0)
    config = GLMConfig(num_layers=layers, hidden_size=hidden, num_attention_heads=8, inner_hidden_size=inner,
                       vocab_size=1024, max_sequence_length=64)
    model = GLM130B(config, dtype=dtype, device="cpu")
    for name, p in model.named_parameters():
        p.data.normal_(0, 0.02 if p.dim() == 2 else 0.1)
    return model


@pytest.mark.parametrize("bits,ratio", [(8, 0.5), (4, 0.25)])
def test_resident_bytes(bits, ratio):
    model = small_model()
    fp16_bytes = fp16_linear_bytes(quantize(small_model(), bits))
    quantize(model, bits)
    got = quantized_linear_bytes(model) / fp16_bytes
    print(f"INT{bits}: resident {quantized_linear_bytes(model)} B = {got:.4f} x the 16-bit {fp16_bytes} B")
    assert ratio <= got < ratio * 1.04  # scales (+ the INT4 kernel's scale table) cost a few percent at most


@pytest.mark.parametrize("bits", [8, 4])
def test_quantize_keeps_biases_and_state_dict_format(bits):
    model = small_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    quantize(model, bits)
    sd = model.state_dict()
    for name, module in model.named_modules():
        if isinstance(module, QuantizedLinearMixin):
            q, scale = quantize_weight(before[name + ".weight"], bits)
            assert torch.equal(sd[name + ".weight"], q) and sd[name + ".weight"].dtype == torch.int8
            assert torch.equal(sd[name + ".weight_scale"], scale)
            assert torch.equal(sd[name + ".bias"], before[name + ".bias"])  # the original zeroed these
    with pytest.raises(UserError, match="already quantized"):
        quantize(model, bits)


@pytest.mark.parametrize("bits", [8, 4])
def test_load_state_dict_round_trip(bits):
    model = quantize(small_model(), bits)
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    fresh = quantize(small_model(), bits)
    fresh.load_state_dict(sd)
    x = torch.randint(0, 1024, (1, 5))
    pos = torch.arange(5).view(1, -1)
    mask = torch.zeros(1, 1, 5, 5, dtype=torch.bool)
    assert torch.equal(model(x, pos, mask)[0], fresh(x, pos, mask)[0])
    assert all(torch.equal(sd[k], v) for k, v in fresh.state_dict().items())


def fixture_logits(model):
    from tests.helpers import CASES, case_inputs, fixture_cases
    cases = fixture_cases()
    return [model(*case_inputs(cases[name]))[0].float() for name in CASES]


def compare(got, ref):
    err = max((g - r).abs().max().item() for g, r in zip(got, ref))
    top1 = torch.cat([(g.argmax(-1) == r.argmax(-1)).flatten() for g, r in zip(got, ref)]).float().mean().item()
    return err, top1


@pytest.mark.parametrize("bits,max_err,min_top1", [(8, 0.5, 0.95), (4, 6.0, 0.5)])
def test_fixture_model_quantized_logits(bits, max_err, min_top1):
    """Quantized fixture model vs the fp32 one (|logits| reach ~66); bf16 runs also carry bf16's own error."""
    from tests.helpers import load_fixture_model
    ref = fixture_logits(load_fixture_model(torch.float32))
    bf16_err, _ = compare(fixture_logits(load_fixture_model(torch.bfloat16)), ref)
    for dtype, allowed in ((torch.float32, max_err), (torch.bfloat16, max_err + bf16_err)):
        err, top1 = compare(fixture_logits(quantize(load_fixture_model(dtype), bits)), ref)
        print(f"INT{bits} {dtype}: max |logits - fp32 logits| {err:.4f}, top-1 agreement {top1:.3f} "
              f"(unquantized bf16: {bf16_err:.4f})")
        assert err < allowed and top1 >= min_top1


@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_checkpoint_path_equals_quantize_on_load(bits, tmp_path):
    """--from-quantized-checkpoint (quantize() on the meta model, then load convert_tp's INT checkpoint) gives the
    same weights and logits as quantizing the 16-bit checkpoint on load."""
    from model import GLM130B
    from model.checkpoint import load_checkpoint, load_shard_state_dict
    from tests.helpers import fixture_config, load_fixture_model
    out = tmp_path / "q"
    subprocess.run([sys.executable, str(ROOT / "tools" / "convert_tp.py"), "--input-folder", str(FIXTURE / "ckpt"),
                    "--output-folder", str(out), "--target-tp", "1", "--quantization-bit-width", str(bits)],
                   check=True, capture_output=True, cwd=ROOT)
    shard = load_shard_state_dict(str(out / "1" / "mp_rank_00_model_states.pt"))
    assert check_quantization_matches(shard, bits, True) == bits
    raw = load_shard_state_dict(str(FIXTURE / "ckpt" / "1" / "mp_rank_00_model_states.pt"))
    mine = quantize_state_dict(raw, bits)
    assert list(mine) == list(shard) and all(torch.equal(mine[k], shard[k]) for k in shard)
    for dtype in (torch.float32, torch.bfloat16):
        converted = quantize(GLM130B(fixture_config(), dtype=dtype, device="meta"), bits)
        load_checkpoint(converted, str(out), 0, 1, prepare_shard=checkpoint_preparer(bits, True))
        on_load = quantize(GLM130B(fixture_config(), dtype=dtype, device="meta"), bits)
        load_checkpoint(on_load, str(FIXTURE / "ckpt"), 0, 1, prepare_shard=checkpoint_preparer(bits, False))
        for (k, a), (k2, b) in zip(converted.state_dict().items(), on_load.state_dict().items()):
            assert k == k2 and a.dtype == b.dtype and torch.equal(a, b), k
        for a, b in zip(fixture_logits(converted), fixture_logits(on_load)):
            assert torch.equal(a, b)
    # quantizing an already loaded model (the original's order) agrees in fp32, where the cast from fp16 is exact
    after = quantize(load_fixture_model(torch.float32), bits)
    converted = quantize(GLM130B(fixture_config(), dtype=torch.float32, device="meta"), bits)
    load_checkpoint(converted, str(out), 0, 1, prepare_shard=checkpoint_preparer(bits, True))
    assert all(torch.equal(a, b) for a, b in zip(converted.state_dict().values(), after.state_dict().values()))


@pytest.mark.parametrize("bits", [8, 4])
def test_a_row_holding_nan_or_inf_dequantizes_to_nan_never_to_a_plausible_row(bits):
    w = torch.randn(4, 16, dtype=torch.float16)
    w[1, 3], w[2, 0] = float("nan"), float("-inf")
    q, scale = quantize_weight(w, bits)
    good_q, good_scale = quantize_weight(w[[0, 3]], bits)
    assert torch.equal(q[[0, 3]], good_q) and torch.equal(scale[[0, 3]], good_scale)
    assert scale[1].isnan() and scale[2].isnan() and not q[[1, 2]].any()
    dense = dequantize(q, scale, bits)
    assert dense[[1, 2]].isnan().all() and dense[[0, 3]].isfinite().all()
