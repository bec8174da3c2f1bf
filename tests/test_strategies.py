"""BaseStrategy (temperature, top-k, top-p, invalid ids, end tokens) and BeamSearchStrategy, on synthetic logits."""
import math

import pytest
import torch

from generation.strategies import (FILTER_VALUE, BaseStrategy, BeamSearchStrategy, _categorical, top_k_logits)

EOP, EOS = 7, 8  # end tokens in the small synthetic vocabularies below


# --- top-k / top-p filtering ------------------------------------------------------------------------------------
def test_top_k_keeps_ties_with_the_kth():
    logits = torch.tensor([[1.0, 3.0, 2.0, 2.0, 0.0]])
    out = top_k_logits(logits, top_k=2)
    assert out[0].tolist() == [FILTER_VALUE, 3.0, 2.0, 2.0, FILTER_VALUE]  # both 2.0 tie with the 2nd largest


def test_top_p_keeps_the_first_token_over_p_and_the_top_token():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = probs.log().view(1, -1)
    kept = lambda p: (top_k_logits(logits, top_p=p)[0] > FILTER_VALUE).tolist()  # noqa: E731
    assert kept(0.6) == [True, True, False, False]  # 0.5 < 0.6, 0.8 crosses: kept
    assert kept(0.85) == [True, True, True, False]
    assert kept(0.1) == [True, False, False, False]  # the top token always stays


def test_top_p_works_per_row_for_batches():
    torch.manual_seed(0)
    logits = torch.randn(5, 50) * 3
    batched = top_k_logits(logits, top_k=10, top_p=0.7)
    for row in range(5):
        assert torch.equal(batched[row], top_k_logits(logits[row:row + 1], top_k=10, top_p=0.7)[0])
    assert len({int((batched[r] > FILTER_VALUE).sum()) for r in range(5)}) > 1  # rows really differ


@pytest.mark.parametrize("top_k,top_p,vocab", [(0, 0.9, 3000), (0, 0.5, 3000), (0, 0.99, 200000), (20, 0.0, 500),
                                               (20, 0.6, 500), (0, 0.0, 100)])
def test_candidates_equal_the_filtered_softmax(top_k, top_p, vocab):
    """The fast path (probe of the 1024 best ids, full sort as fallback) keeps the same ids with the same probs."""
    torch.manual_seed(1)
    logits = torch.randn(3, vocab) * 4
    strategy = BaseStrategy(top_k=top_k, top_p=top_p)
    ids, probs = strategy.candidates(logits)
    expected = torch.softmax(top_k_logits(logits, top_k, top_p), dim=-1)
    dense = probs if ids is None else torch.zeros_like(logits).scatter_(1, ids, probs)
    dense = dense / dense.sum(-1, keepdim=True)
    assert torch.allclose(dense, expected, atol=1e-4)
    # fp32 cumulative sums may move the nucleus edge by a few ids of negligible probability (1e-6 each)
    differ = (dense > 0) != (expected > 1e-30)
    assert (expected * differ).sum() < 1e-3 and (dense * differ).sum() < 1e-3


def test_categorical_draws_in_proportion_and_never_zeros():
    gen = torch.Generator().manual_seed(0)
    probs = torch.tensor([[0.5, 0.0, 0.3, 0.2, 0.0]]).repeat(20000, 1)
    draws = _categorical(probs, gen)
    freq = torch.bincount(draws, minlength=5).float() / len(draws)
    assert freq[1] == 0 and freq[4] == 0
    assert torch.allclose(freq, torch.tensor([0.5, 0.0, 0.3, 0.2, 0.0]), atol=0.015)


def test_temperature_sharpens_and_flattens():
    logits = torch.tensor([[2.0, 1.0, 0.0]])
    for t in (0.5, 1.0, 2.0):
        filtered = BaseStrategy(temperature=t, top_k=0).filter_logits(logits)
        assert torch.allclose(filtered, logits / t)


# --- BaseStrategy forward ---------------------------------------------------------------------------------------
def test_greedy_invalid_ids_and_end_tokens():
    s = BaseStrategy(batch_size=2, top_k=1, end_tokens=[EOP, EOS], invalid_slices=[slice(0, 2), 5])
    tokens = torch.zeros(2, 3, dtype=torch.long)
    logits = torch.tensor([[9.0, 9.0, 1.0, 2.0, 0.0, 8.0, 0.0, 0.0, 0.0],   # 0, 1 and 5 are invalid: picks 3
                           [0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 5.0, 0.0]])  # picks eop: row 1 is done
    tokens, _ = s.forward(logits, tokens)
    assert tokens[:, -1].tolist() == [3, EOP] and not s.is_done
    tokens, _ = s.forward(logits, tokens)
    assert tokens[:, -1].tolist() == [3, -1]  # a finished row gets -1
    s.mark_done(0)
    tokens, _ = s.forward(logits, tokens)
    assert tokens[:, -1].tolist() == [-1, -1] and s.is_done
    tokens, _ = s.finalize(tokens, None)
    assert not s.is_done  # reset for the next generation


def test_sampling_never_picks_invalid_ids():
    torch.manual_seed(0)
    s = BaseStrategy(batch_size=64, top_k=0, temperature=5.0, invalid_slices=[slice(0, 20), slice(30, None)])
    tokens, _ = s.forward(torch.randn(64, 100), torch.zeros(64, 1, dtype=torch.long))
    assert ((tokens[:, -1] >= 20) & (tokens[:, -1] < 30)).all()


def test_base_min_gen_length_bans_end_tokens():
    s = BaseStrategy(top_k=1, end_tokens=[EOP], min_gen_length=2)
    logits = torch.zeros(1, 9)
    logits[0, EOP], logits[0, 4] = 5.0, 1.0
    tokens = torch.zeros(1, 1, dtype=torch.long)
    for _ in range(3):
        tokens, _ = s.forward(logits, tokens)
    assert tokens[0, 1:].tolist() == [4, 4, EOP]


# --- BeamSearchStrategy ------------------------------------------------------------------------------------------
def _beam(**kw):
    defaults = dict(batch_size=1, num_beams=2, length_penalty=1.0, consider_end=True, end_tokens=[EOP, EOS],
                    deterministic=True)
    defaults.update(kw)
    return BeamSearchStrategy(**defaults)


def _logprob_logits(rows):
    """Logits whose log-softmax are the given per-beam probability rows (zeros allowed)."""
    return torch.tensor(rows, dtype=torch.float32).clamp_min(1e-12).log()


def test_length_penalty_ranks_finished_beams_like_the_original():
    s = _beam(num_beams=3, length_penalty=1.0)
    # Same raw score, different lengths: the longer beam has the better penalised score.
    s._add_end_beams(-2.0, torch.zeros(4, dtype=torch.long), 0)
    s._add_end_beams(-2.0, torch.zeros(10, dtype=torch.long), 0)
    s._add_end_beams(-1.0, torch.zeros(4, dtype=torch.long), 0)
    penalised = s.end_beams_penalized_scores[0]
    assert [len(b) for b in s.end_beams[0]] == [4, 10, 4]
    assert penalised == pytest.approx([-1.0 / (9 / 6), -2.0 / (15 / 6), -2.0 / (9 / 6)])
    s._add_end_beams(-9.0, torch.zeros(4, dtype=torch.long), 0)  # worse than all three: dropped
    assert len(s.end_beams[0]) == 3 and min(s.end_beams_penalized_scores[0]) > -9.0 / 1.5
    lp0 = _beam(num_beams=2, length_penalty=0.0)
    lp0._add_end_beams(-2.0, torch.zeros(4, dtype=torch.long), 0)
    lp0._add_end_beams(-2.0, torch.zeros(10, dtype=torch.long), 0)
    assert lp0.end_beams_penalized_scores[0] == [-2.0, -2.0]
    assert [len(b) for b in lp0.end_beams[0]] == [10, 4]  # ties: the newer beam goes first, as the original


def test_padding_is_not_counted_by_the_length_penalty():
    s = _beam(num_beams=1, length_penalty=1.0)
    s.prepare(1, context_lengths=[3])
    tokens = torch.tensor([[[5, 5, 5, 0, 0]]])  # 3 real context ids + 2 padding columns
    logits = _logprob_logits([[[0.0] * 7 + [1.0, 0.0]]])  # eop certain
    s.forward(logits, tokens)
    assert s.end_beams_penalized_scores[0][0] == pytest.approx(0.0)
    s.prepare(1, context_lengths=[3])
    logits = _logprob_logits([[[0.0, 0.0, 0.0, 0.0, 0.5, 0.0, 0.0, 0.5, 0.0]]])
    s.forward(logits, tokens)
    assert s.end_beams_penalized_scores[0][0] == pytest.approx(math.log(0.5) / ((5 + 4) / 6))  # len 3 + eop


def test_first_step_expands_one_beam_and_reports_sources():
    s = _beam(num_beams=3)
    tokens = torch.tensor([[[1, 2]]])
    logits = _logprob_logits([[[0.0, 0.1, 0.2, 0.3, 0.4, 0.0, 0.0, 0.0, 0.0]]])
    tokens, _ = s.forward(logits, tokens)
    assert tokens.shape == (1, 3, 3)
    assert tokens[0, :, -1].tolist() == [4, 3, 2]
    assert s.beam_index.tolist() == [[0, 0, 0]]
    assert s.cached_beam_scores[0].tolist() == pytest.approx([math.log(0.4), math.log(0.3), math.log(0.2)], rel=1e-5)


def test_no_repeat_ngram_bans_repeats_per_beam():
    s = _beam(num_beams=1, no_repeat_ngram_size=2, consider_end=False)
    tokens = torch.tensor([[[1, 2]]])
    favourite = _logprob_logits([[[0.0, 0.05, 0.05, 0.7, 0.2, 0.0, 0.0, 0.0, 0.0]]])  # always prefers 3
    for _ in range(6):
        tokens, _ = s.forward(favourite, tokens)
    generated = tokens[0, 0].tolist()
    bigrams = list(zip(generated[1:], generated[2:]))  # the bigrams that end in a generated token
    assert len(bigrams) == len(set(bigrams)), generated
    assert generated[2:4] == [3, 3]  # (3, 3) is used once, then banned
    s1 = _beam(num_beams=1, no_repeat_ngram_size=1, consider_end=False)
    tokens = torch.tensor([[[1, 2]]])
    for _ in range(4):
        tokens, _ = s1.forward(favourite, tokens)
    assert len(set(tokens[0, 0, 2:].tolist())) == 4  # n = 1: no generated token repeats


def test_min_gen_length_and_consider_end():
    row = [0.0, 0.0, 0.0, 0.2, 0.1, 0.0, 0.0, 0.7, 0.0]  # eop is the most likely
    s = _beam(num_beams=2, min_gen_length=2, end_tokens=[EOP])
    tokens = torch.tensor([[[1]]])
    tokens, _ = s.forward(_logprob_logits([[row]]), tokens)
    assert not s.end_beams[0]  # eop banned at length 0
    tokens, _ = s.forward(_logprob_logits([[row, row]]), tokens)
    assert not s.end_beams[0]  # and at length 1
    tokens, _ = s.forward(_logprob_logits([[row, row]]), tokens)
    assert s.end_beams[0] and all(int(b[-1]) == EOP for b in s.end_beams[0])
    beams, _ = s.finalize(tokens, None)
    assert len(beams) == 1 and len(beams[0]) == 2  # finished beams, best first
    assert all(int(b[-1]) == EOP and len(b) == 4 for b in beams[0])
    no_end = _beam(num_beams=2, consider_end=False)
    out, _ = no_end.finalize(tokens, None)
    assert torch.equal(out, tokens)  # without consider_end the live beams come back as they are


def test_consider_end_adds_live_beams_at_finalize():
    s = _beam(num_beams=2, consider_end=True)
    tokens = torch.tensor([[[1]]])
    probs = _logprob_logits([[[0.0, 0.0, 0.0, 0.6, 0.4, 0.0, 0.0, 0.0, 0.0]]])
    tokens, _ = s.forward(probs, tokens)
    tokens, _ = s.forward(_logprob_logits([[[0.0, 0.0, 0.0, 0.7, 0.3, 0.0, 0.0, 0.0, 0.0]] * 2]), tokens)
    beams, _ = s.finalize(tokens, None)
    assert [b.tolist() for b in beams[0]] == [[1, 3, 3], [1, 4, 3]]  # .6*.7 > .4*.7 > .6*.3


def test_done_when_finished_beams_beat_live_ones():
    s = _beam(num_beams=2, length_penalty=0.0)
    tokens = torch.tensor([[[1]]])
    logits = _logprob_logits([[[0.0] * 3 + [0.01, 0.01] + [0.0] * 2 + [0.49, 0.49]]])  # eop and eos: 0.49 each
    tokens, _ = s.forward(logits, tokens)
    assert len(s.end_beams[0]) == 2 and s.is_done


@pytest.mark.parametrize("deterministic", [True, False])
def test_beam_search_is_reproducible(deterministic):
    def run(seed):
        gen = torch.Generator().manual_seed(seed)
        s = _beam(batch_size=2, num_beams=3, deterministic=deterministic, generator=gen, no_repeat_ngram_size=2)
        tokens = torch.tensor([[[1]], [[2]]])
        logits_gen = torch.Generator().manual_seed(123)
        for _ in range(5):
            nb = tokens.shape[1]
            tokens, _ = s.forward(torch.randn(2, nb, 50, generator=logits_gen), tokens)
        beams, _ = s.finalize(tokens, None)
        return [[b.tolist() for b in per] for per in beams]
    assert run(0) == run(0)
    if deterministic:
        assert run(0) == run(1)  # no randomness at all
    else:
        assert any(run(0) != run(s) for s in (1, 2, 3))  # candidates are sampled


def test_sampled_candidates_follow_the_scores():
    """Sampled (generate.py) candidates: K ids drawn without replacement in proportion to exp(score)."""
    counts = torch.zeros(9)
    gen = torch.Generator().manual_seed(0)
    row = [0.0, 0.0, 0.0, 0.4, 0.3, 0.3, 0.0, 0.0, 0.0]
    for _ in range(300):  # 1 beam, 1 end token: 2 candidates, the better one is kept
        s = _beam(num_beams=1, deterministic=False, generator=gen, end_tokens=[EOP])
        tokens, _ = s.forward(_logprob_logits([[row]]), torch.tensor([[[1]]]))
        counts[tokens[0, 0, -1]] += 1
    # P(3 kept) = 1 - P(the pair is {4, 5}) = 1 - 2 * 0.3 * 0.3 / 0.7 = 0.743
    assert 190 < counts[3] < 255 and counts[4] + counts[5] == 300 - counts[3]


def test_mems_are_reordered_with_the_beams():
    s = _beam(num_beams=2, consider_end=False)
    tokens = torch.tensor([[[1], [2]]])
    mems = torch.tensor([10.0, 20.0]).view(1, 1, 2, 1, 1)  # [layers, B, nb, T, d]
    logits = _logprob_logits([[[0.0, 0.0, 0.0, 0.34, 0.33, 0.33, 0.0, 0.0, 0.0],
                               [0.0, 0.0, 0.0, 0.5, 0.45, 0.05, 0.0, 0.0, 0.0]]])
    tokens, mems = s.forward(logits, tokens, mems)
    assert s.beam_index.tolist() == [[1, 1]]
    assert mems.view(-1).tolist() == [20.0, 20.0] and tokens[0, :, 0].tolist() == [2, 2]
