"""model/sharding.py's table is the one partition layout: the model's parallel layers, the quantizer and the
checkpoint tools all agree with it, for every key of the model."""
import pytest
import torch

from model import GLM130B, GLMConfig, mpu
from model.errors import UserError
from model.layers import ColumnParallelLinear, RowParallelLinear
from model.sharding import (COLS, GLU, QUANTIZED_LINEARS, REPLICATED, ROWS, merge_shards, partition,
                            shard_tensor)
from quantization import quantize

CONFIG = GLMConfig(num_layers=2, hidden_size=64, num_attention_heads=4, inner_hidden_size=96, vocab_size=256,
                   max_sequence_length=32)


def shapes_at(monkeypatch, world: int, rank: int, bits=None):
    """state_dict shapes of the model built as model-parallel rank `rank` of `world` (shapes only: meta device)."""
    with monkeypatch.context() as m:
        m.setattr(mpu, "get_model_parallel_world_size", lambda: world)
        m.setattr(mpu, "get_model_parallel_rank", lambda: rank)
        model = GLM130B(CONFIG, dtype=torch.float16, device="meta")
        if bits:
            quantize(model, bits)
        return {k: tuple(v.shape) for k, v in model.state_dict().items()}, model


@pytest.mark.parametrize("bits", [None, 8, 4])
def test_model_shards_are_the_table_shards_of_the_full_model(monkeypatch, bits):
    full, _ = shapes_at(monkeypatch, 1, 0, bits)
    for rank in range(2):
        local, _ = shapes_at(monkeypatch, 2, rank, bits)
        assert set(local) == set(full)
        for key, shape in full.items():
            want = tuple(shard_tensor(key, torch.empty(shape, device="meta"), rank, 2).shape)
            assert local[key] == want, f"{key}: model shard {local[key]} but the table gives {want}"


def test_parallel_layer_kind_follows_the_table(monkeypatch):
    _, model = shapes_at(monkeypatch, 2, 0)
    for name, module in model.named_modules():
        if isinstance(module, (ColumnParallelLinear, RowParallelLinear)):
            rule = partition(f"{name}.weight").rule
            expected = RowParallelLinear if rule == COLS else ColumnParallelLinear
            assert isinstance(module, expected) and rule in (ROWS, COLS, GLU), name
            assert partition(f"{name}.bias").rule == (REPLICATED if rule == COLS else rule)
    quantized = {name.split(".", 3)[-1] for name, _ in model.named_modules() if name.endswith(QUANTIZED_LINEARS)}
    assert quantized == set(QUANTIZED_LINEARS)


def test_every_key_is_in_the_table_and_scales_follow_their_weight():
    for key in ("transformer.layers.3.attention.rotary_emb.inv_freq", "mixins.rotary-embedding.rotary_emb.inv_freq"):
        assert partition(key).rule == REPLICATED
    assert partition("transformer.layers.0.attention.dense.weight_scale").rule == REPLICATED
    assert partition("transformer.layers.0.mlp.dense_h_to_4h.weight_scale").rule == GLU
    with pytest.raises(UserError, match="not a GLM-130B tensor"):
        partition("transformer.layers.0.some_adapter.weight")


def test_glu_shards_interleave_the_halves():
    full = torch.arange(8).view(8, 1)
    shards = [shard_tensor("transformer.layers.0.mlp.dense_h_to_4h.weight", full, r, 2) for r in range(2)]
    assert [s.view(-1).tolist() for s in shards] == [[0, 1, 4, 5], [2, 3, 6, 7]]
    assert torch.equal(merge_shards("transformer.layers.0.mlp.dense_h_to_4h.weight", shards), full)
