"""Static-cache / graph decoding (generation/graph_decode.py) run eagerly on CPU against the decoding loop of
generation/decoding.py on the SAT fixture model: the same greedy ids and beams, the cache reordered in place, the
device sampler's distribution equal to BaseStrategy's filter. The CUDA-graph capture itself is checked on a GPU
(scripts/gpu_check.sh; the CUDA test below skips without one)."""
import pytest
import torch

from generation import BaseStrategy, BeamSearchStrategy, batch_filling_sequence, generation_layout, top_k_logits
from generation.graph_decode import DeviceSampler, OneTokenStep, StaticKVCache, static_filling_sequence
from tests.helpers import load_fixture_model
from tests.test_generation_decoding import END, TEXT_ONLY, _prompts


@pytest.fixture(scope="module")
def model():
    return load_fixture_model()


@pytest.fixture(scope="module")
def bf16_model():
    return load_fixture_model(torch.bfloat16, attention="sdpa")


def _greedy():
    return BaseStrategy(top_k=1, end_tokens=END, invalid_slices=TEXT_ONLY)


def _beam(beams):
    return BeamSearchStrategy(3, beams, length_penalty=1.0, consider_end=True, end_tokens=END,
                              invalid_slices=TEXT_ONLY, no_repeat_ngram_size=2, deterministic=True)


@pytest.mark.parametrize("which", ["fp32_plain", "bf16_sdpa"])
@pytest.mark.parametrize("device_sampling", [True, False])
def test_greedy_ids_equal_the_decoding_loop(which, device_sampling, model, bf16_model, monkeypatch):
    m = model if which == "fp32_plain" else bf16_model
    rows, mask_positions, gmask = _prompts()
    seqs, lengths, layout = generation_layout(rows, mask_positions, gmask, 6)
    expected, _ = batch_filling_sequence(m, seqs, lengths, _greedy(), layout)
    got, _ = static_filling_sequence(m, seqs, lengths, _greedy(), layout, device_sampling=device_sampling)
    assert got.tolist() == expected.tolist()


@pytest.mark.parametrize("device_sampling", [True, False])
def test_slot_buckets_change_nothing(device_sampling, model, monkeypatch):
    """Attention over a few slots at a time (buckets of 4, growing as the cache fills) gives the loop's ids."""
    from generation import graph_decode
    monkeypatch.setattr(graph_decode, "SLOT_BUCKET", 4)
    assert graph_decode.slots_for(5, 100) == 8 and graph_decode.slots_for(7, 100) == 8
    assert graph_decode.slots_for(8, 100) == 12 and graph_decode.slots_for(99, 100) == 100
    rows, mask_positions, gmask = _prompts()
    seqs, lengths, layout = generation_layout(rows, mask_positions, gmask, 6)
    strategy = _greedy if device_sampling else (lambda: _beam(3))
    expected, _ = batch_filling_sequence(model, seqs, lengths, strategy(), layout)
    got, _ = static_filling_sequence(model, seqs, lengths, strategy(), layout, device_sampling=device_sampling)
    as_lists = (lambda t: t.tolist()) if device_sampling else (lambda t: [[b.tolist() for b in per] for per in t])
    assert as_lists(got) == as_lists(expected)


def test_end_tokens_and_min_length_on_device(model):
    """Rows stop at an end token (-1 afterwards) exactly as the loop's BaseStrategy; min_gen_length bans them."""
    rows, mask_positions, gmask = _prompts()
    seqs, lengths, layout = generation_layout(rows, mask_positions, gmask, 8)
    ends = [20002, 20003, 20004, 20005, 150005]  # likely early ends on random weights: exercises the done flags
    for min_gen in (0, 3):
        strategy = lambda: BaseStrategy(top_k=1, end_tokens=ends, invalid_slices=TEXT_ONLY, min_gen_length=min_gen)
        expected, _ = batch_filling_sequence(model, seqs, lengths, strategy(), layout)
        got, _ = static_filling_sequence(model, seqs, lengths, strategy(), layout)
        assert got.tolist() == expected.tolist()


@pytest.mark.parametrize("beams", [1, 3])
def test_beam_search_equals_the_decoding_loop(beams, model):
    rows, mask_positions, gmask = _prompts()
    seqs, lengths, layout = generation_layout(rows, mask_positions, gmask, 6)
    ref_strategy, strategy = _beam(beams), _beam(beams)
    expected, _ = batch_filling_sequence(model, seqs, lengths, ref_strategy, layout)
    got, _ = static_filling_sequence(model, seqs, lengths, strategy, layout)
    assert [[b.tolist() for b in per] for per in got] == [[b.tolist() for b in per] for per in expected]
    for (raw_a, _), (raw_b, _) in zip(strategy.final_scores, ref_strategy.final_scores):
        assert raw_a == pytest.approx(raw_b, abs=1e-4)


def test_reorder_is_in_place_and_equals_index_select(model):
    cache = StaticKVCache(model, 3, 10)
    cache.reserve(4)
    cache.advance()
    cache.k_all.normal_()
    cache.v_all.normal_()
    before_k, before_v = cache.k_all.clone(), cache.v_all.clone()
    pointers = [t.data_ptr() for t in cache.k + cache.v]
    index = torch.tensor([2, 0, 0])
    cache.reorder(index)
    assert [t.data_ptr() for t in cache.k + cache.v] == pointers
    assert torch.equal(cache.k_all[:, :, :, :4], before_k[:, index, :, :4])
    assert torch.equal(cache.v_all[:, :, :, :4], before_v[:, index, :, :4])
    assert int(cache.index) == 4


def test_one_token_step_keeps_its_buffers(model):
    """The step writes its outputs into the same cache slots and advances the device index by one per call."""
    rows, mask_positions, gmask = _prompts()
    seqs, lengths, layout = generation_layout(rows, mask_positions, gmask, 4)
    _, mask, positions = layout(seqs)
    cache = StaticKVCache(model, seqs.shape[0], positions.shape[-1])
    step = OneTokenStep(model, cache, positions, mask)
    model.forward_with_cache(seqs, positions[:, :seqs.shape[1]], mask[:, :, :seqs.shape[1], :seqs.shape[1]], cache)
    start = int(cache.index)
    assert start == seqs.shape[1]
    pointers = [t.data_ptr() for t in step.state()]
    logits = step()
    assert logits.shape == (seqs.shape[0], 1, model.config.vocab_size)
    assert int(cache.index) == start + 1 and [t.data_ptr() for t in step.state()] == pointers
    assert cache.k_all[:, :, :, start].abs().sum() > 0 and cache.k_all[:, :, :, start + 1:].abs().sum() == 0


@pytest.mark.parametrize("top_k,top_p,temperature", [(0, 0.0, 1.0), (5, 0.0, 0.7), (0, 0.8, 1.0), (40, 0.9, 1.3)])
def test_device_sampler_distribution_is_base_strategys(top_k, top_p, temperature):
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 300, generator=gen) * 3
    invalid = [slice(0, 20), 299]
    sampler = DeviceSampler(4, 300, "cpu", top_k, top_p, temperature, invalid, [7], min_gen_length=2)
    strategy = BaseStrategy(top_k=top_k, top_p=top_p, temperature=temperature, invalid_slices=invalid,
                            end_tokens=[7], min_gen_length=2)
    x = sampler.filter_logits(logits)
    assert torch.equal(x, strategy.filter_logits(logits))
    expected = torch.softmax(top_k_logits(x, top_k, top_p), dim=-1)
    assert torch.equal(sampler.probabilities(x), expected)
    ids = sampler(logits)
    assert (expected.gather(1, ids[:, None]) > 0).all() and int(sampler.generated) == 1


def test_tensor_parallel_is_refused(model, monkeypatch):
    from model import mpu
    monkeypatch.setattr(mpu, "get_model_parallel_world_size", lambda: 2)
    seqs, lengths, layout = generation_layout([[20001, 20002, 150001, 150004]], [2], [True], 2)
    with pytest.raises(ValueError, match="model-parallel size 1"):
        static_filling_sequence(model, seqs, lengths, _greedy(), layout)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_graph_ids_equal_eager():
    m = load_fixture_model(torch.float16).cuda()
    rows, mask_positions, gmask = _prompts()
    seqs, lengths, layout = generation_layout(rows, mask_positions, gmask, 6)
    eager, _ = static_filling_sequence(m, seqs.cuda(), lengths, _greedy(), layout, use_graph=False)
    graph, _ = static_filling_sequence(m, seqs.cuda(), lengths, _greedy(), layout, use_graph=True)
    assert graph.tolist() == eager.tolist()
