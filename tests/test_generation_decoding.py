"""The decoding loop on the SAT fixture model: parity with SAT's generation, KV cache vs recomputation, batching."""
import pytest
import torch

from generation import (BaseStrategy, BeamSearchStrategy, batch_filling_sequence, fill_blanks, fill_blanks_batch,
                        generation_invalid_slices, generation_layout)
from tests.helpers import fixture_cases, load_fixture_model, logits_error, reference
from tests.test_generation_layout import MASK, WordTokenizer

TEXT_ONLY = [slice(0, 20000), slice(150000, None)]  # the fixture's greedy restriction: text ids [20000, 150000)
END = [150005, 20002]


class RecordingGreedy(BaseStrategy):
    """Greedy, recording the logits row the loop hands over at every step."""

    def __init__(self, **kw):
        super().__init__(top_k=1, end_tokens=END, **kw)
        self.rows = []

    def forward(self, logits, tokens, mems=None, temperature=None):
        self.rows.append(logits.reshape(-1, logits.shape[-1]).float().clone())
        return super().forward(logits, tokens, mems, temperature)


@pytest.fixture(scope="module")
def model():
    return load_fixture_model()


def _fixture_gen(model, use_cache):
    prompt = fixture_cases()["gen"]["prompt"]  # 9 text ids, [gMASK], sop
    seqs, lengths, layout = generation_layout([prompt], [len(prompt) - 2], [True], 8)
    strategy = RecordingGreedy(invalid_slices=TEXT_ONLY)
    tokens, _ = batch_filling_sequence(model, seqs, lengths, strategy, layout, use_cache=use_cache)
    return tokens[0, 0, len(prompt):].tolist(), torch.cat(strategy.rows)


@pytest.mark.parametrize("run,dtype,tol", [("mp1_fp32", torch.float32, 2e-4), ("mp1_fp16", torch.float16, 0.1)])
def test_greedy_loop_reproduces_sat(run, dtype, tol):
    m = load_fixture_model(dtype) if dtype != torch.float32 else load_fixture_model()
    expected = fixture_cases()["gen"]["generated"]
    for use_cache in (True, False):
        generated, rows = _fixture_gen(m, use_cache)
        assert generated == expected
        err = logits_error(rows, reference(run), "gen_step_logits")
        assert err <= tol, f"{run} cache={use_cache}: max |diff| {err:.3g}"


def _prompts():
    torch.manual_seed(0)
    lengths = [7, 12, 4]
    rows = [torch.randint(20000, 30000, (n,)).tolist() for n in lengths]
    rows[0][3] = MASK
    rows[1] += [150001]
    rows[2][1] = MASK
    return [r + [150004] for r in rows], [3, len(rows[1]) - 1, 1], [False, True, False]


@pytest.mark.parametrize("beams", [1, 3])
def test_kv_cache_equals_full_recomputation(model, beams):
    rows, mask_positions, gmask = _prompts()
    seqs, lengths, layout = generation_layout(rows, mask_positions, gmask, 6)
    results = []
    for use_cache in (True, False):
        if beams == 1:
            strategy = RecordingGreedy(invalid_slices=TEXT_ONLY)
        else:
            strategy = BeamSearchStrategy(3, beams, length_penalty=1.0, consider_end=True, end_tokens=END,
                                          invalid_slices=TEXT_ONLY, no_repeat_ngram_size=2, deterministic=True)
        out, _ = batch_filling_sequence(model, seqs, lengths, strategy, layout, use_cache=use_cache)
        if beams == 1:
            results.append((out.tolist(), strategy.rows))
        else:
            results.append(([[b.tolist() for b in per] for per in out], strategy.final_scores))
    (cached, cached_extra), (full, full_extra) = results
    assert cached == full
    if beams == 1:
        assert max((a - b).abs().max().item() for a, b in zip(cached_extra, full_extra)) < 1e-4
    else:
        for (raw_a, _), (raw_b, _) in zip(cached_extra, full_extra):
            assert raw_a == pytest.approx(raw_b, abs=1e-4)


def test_padded_batch_equals_one_row_at_a_time(model):
    rows, mask_positions, gmask = _prompts()
    seqs, lengths, layout = generation_layout(rows, mask_positions, gmask, 5)
    batched, _ = batch_filling_sequence(model, seqs, lengths, RecordingGreedy(invalid_slices=TEXT_ONLY), layout)
    width = seqs.shape[1]
    for i, row in enumerate(rows):
        s, n, lay = generation_layout([row], [mask_positions[i]], [gmask[i]], 5)
        single, _ = batch_filling_sequence(model, s, n, RecordingGreedy(invalid_slices=TEXT_ONLY), lay)
        assert batched[i, 0, width:].tolist() == single[0, 0, len(row):].tolist()


def _word_tok():
    tok = WordTokenizer()
    tok.tokenize("A B C D E F G H the capital of is and")
    return tok


TEXTS = ["A B [MASK] C D", "the capital of A is [MASK] and of B is [MASK] .", "E F G H", "H [sMASK] G"]


@pytest.mark.parametrize("beam", [False, True])
def test_fill_blanks_batch_equals_single_prompts(model, beam):
    tok = _word_tok()
    invalid = generation_invalid_slices(tok)

    def strategy():
        if beam:
            return BeamSearchStrategy(1, 2, length_penalty=1.0, consider_end=True, end_tokens=END,
                                      invalid_slices=invalid, no_repeat_ngram_size=3, deterministic=True)
        return BaseStrategy(top_k=1, end_tokens=END, invalid_slices=invalid)

    limits = dict(out_seq_length=22, max_sequence_length=128)
    batch = fill_blanks_batch(TEXTS, model, tok, strategy(), **limits)
    for text, result in zip(TEXTS, batch):
        single = fill_blanks(text, model, tok, strategy(), **limits)
        assert single.answers == result.answers and single.blanks == result.blanks
        assert single.answers_with_style == result.answers_with_style
        assert len(result.answers) == (2 if beam else 1)
        for seq in result.sequences:  # --out-seq-length caps the whole sequence (+ sop) of every round
            assert len(seq) + 1 <= 22 + 1


def test_beams_keep_their_own_history_across_masks(model):
    """Each output's blanks, styled text and answer describe that output's own sequence."""
    tok = _word_tok()
    strategy = BeamSearchStrategy(1, 3, length_penalty=1.0, consider_end=True, end_tokens=END,
                                  invalid_slices=generation_invalid_slices(tok), deterministic=True)
    text = "the capital of A is [MASK] and of B is [MASK] ."
    result = fill_blanks(text, model, tok, strategy, max_new_tokens=4, max_sequence_length=128)
    assert len(result.answers) == 3
    for answer, blanks, styled, seq in zip(result.answers, result.blanks, result.answers_with_style, result.sequences):
        assert len(blanks) == 2
        rebuilt = text.replace("[MASK]", "{}").format(*blanks).split()
        assert answer.split() == rebuilt and tok.detokenize(seq) == answer
        assert styled.count("\x1b[0;32m\033[4m") == 2 and all(b in styled for b in blanks)
    assert len(set(result.answers)) == 3


def test_budgets_per_blank(model):
    tok = _word_tok()
    greedy = BaseStrategy(top_k=1, end_tokens=END, invalid_slices=generation_invalid_slices(tok))
    result = fill_blanks("A [MASK] B [MASK] C", model, tok, greedy, max_new_tokens=3, max_sequence_length=128)
    assert [len(b.split()) for b in result.blanks[0]] == [3, 3]  # random weights never end early here
    prompt_len = len("A [MASK] B [MASK] C".split()) + 1  # + eos
    result = fill_blanks("A [MASK] B [MASK] C", model, tok, greedy, out_seq_length=prompt_len + 1 + 4,
                         max_sequence_length=128)
    assert [len(b.split()) for b in result.blanks[0]] == [4, 1]  # the removed first mask frees one slot


def test_streamed_text_is_the_styled_output(model, test_tokenizer):
    torch.manual_seed(0)
    pieces = []
    strategy = BaseStrategy(top_k=0, top_p=0.9, temperature=0.8, end_tokens=END,
                            invalid_slices=generation_invalid_slices(test_tokenizer))
    result = fill_blanks("The capital of France is [MASK], and of Japan [MASK].", model, test_tokenizer, strategy,
                         max_new_tokens=6, max_sequence_length=128, stream=pieces.append)
    assert len(pieces) > 6 and "".join(pieces) == result.answers_with_style[0]


@pytest.mark.parametrize("beam", [False, True])
def test_per_element_budgets_in_one_batch(model, beam):
    rows, mask_positions, gmask = _prompts()
    seqs, lengths, layout = generation_layout(rows, mask_positions, gmask, 4)
    if beam:
        strategy = BeamSearchStrategy(3, 2, consider_end=True, end_tokens=END, invalid_slices=TEXT_ONLY,
                                      deterministic=True)
    else:
        strategy = BaseStrategy(top_k=1, end_tokens=END, invalid_slices=TEXT_ONLY)
    out, _ = batch_filling_sequence(model, seqs, lengths, strategy, layout, max_gen_lengths=[0, 2, 4])
    width = seqs.shape[1]
    if beam:
        generated = [[len(b) - width for b in per] for per in out]
        assert generated == [[0], [2, 2], [4, 4]]  # no budget: the single context beam comes back as it is
    else:
        assert [sum(t >= 0 for t in row[0, width:].tolist()) for row in out] == [0, 2, 4]
