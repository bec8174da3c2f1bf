"""Prompt encoding and the tokens / positions / attention masks of generate.py (original-repo.md Appendix A)."""
import pytest
import torch

from generation import (encode_prompt, generation_invalid_slices, generation_layout, get_masks_and_position_ids,
                        round_budget, check_prompt)
from model.errors import UserError
from model.tokenizer import SPECIAL_IDS

MASK, GMASK, SMASK, SOP, EOP, EOS = (SPECIAL_IDS[n] for n in ("[MASK]", "[gMASK]", "[sMASK]", "sop", "eop", "eos"))


class WordTokenizer:
    """One id per whitespace-separated word (20100 + its index); specials rendered as the icetk tokenizer does."""

    num_tokens = 150000
    piece_count = 130000
    end_tokens = [EOP, EOS]

    def __init__(self):
        self.words = {}

    def tokenize(self, text):
        return [20100 + self.words.setdefault(w, len(self.words)) for w in text.split()]

    def detokenize(self, ids):
        names = {i: f"[{n}]" for n, i in SPECIAL_IDS.items()}
        inverse = {20100 + i: w for w, i in self.words.items()}
        return " ".join(names.get(i) or inverse.get(i, f"<{i}>") for i in ids)

    def get_command(self, name):
        return SPECIAL_IDS[name]


@pytest.fixture
def tok():
    return WordTokenizer()


def allowed(mask):
    """bool [L, L] of what each row may attend to (the layout masks use True = may NOT attend)."""
    return ~mask.view(mask.shape[-2], mask.shape[-1])


def test_mask_infill_layout_of_appendix_a(tok):
    """'A B [MASK] C': seq = a b MASK c eos; input + sop; sop and generated tokens take the mask's position."""
    p = encode_prompt("A B [MASK] C", tok)
    a, b, c = tok.tokenize("A B C")
    assert p.ids == [a, b, MASK, c, EOS] and p.mask_id == MASK and not p.use_gmask and p.text == "A B [MASK] C"
    seq = torch.tensor([p.ids + [SOP]])
    tokens, mask, positions = get_masks_and_position_ids(seq, mask_position=2, max_gen_length=3, gmask=False)
    assert tokens.tolist() == [[a, b, MASK, c, EOS, SOP, -1, -1, -1]]
    assert positions.tolist() == [[0, 1, 2, 3, 4, 2, 2, 2, 2]]
    A = allowed(mask)
    for row in range(5):  # context rows see the whole context, not sop
        assert A[row].tolist() == [True] * 5 + [False] * 4
    assert A[5].tolist() == [True] * 6 + [False] * 3  # sop
    for t in range(6, 9):  # generated rows are causal and see everything before them
        assert A[t].tolist() == [True] * (t + 1) + [False] * (8 - t)


def test_gmask_appended_without_mask(tok):
    p = encode_prompt("Who is the greatest artist?", tok)
    text = tok.tokenize("Who is the greatest artist?")
    assert p.ids == text + [GMASK]  # no eos: the text now ends with a mask
    assert p.use_gmask and p.mask_id == GMASK and p.text == "Who is the greatest artist? [gMASK]"
    _, mask, positions = get_masks_and_position_ids(torch.tensor([p.ids + [SOP]]), len(text), 4, gmask=True)
    assert positions.tolist() == [list(range(len(text) + 2 + 4))]  # positions continue through the generation
    A = allowed(mask)
    ctx = len(text) + 2
    assert A[0, :ctx - 1].all() and not A[0, ctx - 1]


def test_mask_precedence_and_eos(tok):
    p = encode_prompt("x [sMASK] y [MASK] z [gMASK]", tok)
    assert p.mask_id == MASK and p.ids[-1] == GMASK  # [MASK] wins; the others stay as literal tokens
    assert p.ids.count(SMASK) == 1 and p.ids.count(MASK) == 1 and EOS not in p.ids
    p = encode_prompt("x [gMASK] y [sMASK]", tok)
    assert p.mask_id == SMASK and not p.use_gmask and p.ids[-1] == SMASK
    p = encode_prompt("[gMASK] y", tok)
    assert p.mask_id == GMASK and p.use_gmask and p.ids == [GMASK] + tok.tokenize("y") + [EOS]
    p = encode_prompt("text with MASK] but no mask", tok)  # a stray 'MASK]' is text, not a mask
    assert p.ids[-1] == GMASK and p.use_gmask
    assert encode_prompt("纯中文[MASK]。", tok).english is False and encode_prompt("A [MASK]", tok).english


def test_several_masks_layout(tok):
    """Two [MASK]s: the first round fills the first one; the second stays in the (bidirectional) context."""
    p = encode_prompt("A [MASK] B [MASK] C", tok)
    a, b, c = tok.tokenize("A B C")
    assert p.ids == [a, MASK, b, MASK, c, EOS]
    _, mask, positions = get_masks_and_position_ids(torch.tensor([p.ids + [SOP]]), 1, 2, gmask=False)
    assert positions.tolist() == [[0, 1, 2, 3, 4, 5, 1, 1, 1]]
    A = allowed(mask)
    assert A[3, :6].all() and not A[3, 6:].any()  # the second mask sees the context (not sop)


def test_batched_layout_pads_on_the_right_and_keeps_each_rows_positions():
    rows = [[1, 2, 3, MASK, 4, EOS, SOP], [5, 6, GMASK, SOP]]
    seqs, lengths, layout = generation_layout(rows, [3, 2], [False, True], 2)
    assert seqs.tolist() == [rows[0], [5, 6, GMASK, SOP, 0, 0, 0]] and lengths.tolist() == [7, 4]
    full, mask, positions = layout(seqs)
    assert full.shape == (2, 9) and (full[:, 7:] == -1).all()
    assert positions[0].tolist() == [0, 1, 2, 3, 4, 5, 3, 3, 3]
    assert positions[1, :4].tolist() == [0, 1, 2, 3] and positions[1, 7:].tolist() == [4, 5]  # as if unpadded
    A = ~mask[1, 0]
    assert not A[:, 4:7].any()  # nobody sees the padding
    assert A[7].tolist() == [True] * 4 + [False] * 3 + [True, False]  # first generated token: context, sop, itself
    assert A[0].tolist() == [True] * 3 + [False] * 6  # context rows: bidirectional context, not sop


def test_invalid_ids_for_generation():
    tok = WordTokenizer()
    assert generation_invalid_slices(tok) == [slice(0, 20000), slice(150000, EOP), slice(EOP + 1, None)]
    tok.piece_count = 1000  # a tokenizer file with fewer pieces: the missing text ids are invalid too
    assert generation_invalid_slices(tok) == [slice(0, 20000), slice(21000, EOP), slice(EOP + 1, None)]


def test_budget_and_too_long_prompts(tok):
    assert round_budget(10, 256, None, 2048) == 246  # --out-seq-length counts the context
    assert round_budget(10, 256, 50, 2048) == 50  # --max-new-tokens does not
    assert round_budget(2040, 4096, 100, 2048) == 8  # both stop at the model's maximum length
    p = encode_prompt("w " * 30, tok)
    with pytest.raises(UserError, match="text too long"):
        check_prompt(p, 256, None, max_sequence_length=32)
    with pytest.raises(UserError, match="no room to generate"):
        check_prompt(p, 20, None, max_sequence_length=2048)
    check_prompt(p, 20, max_new_tokens=5, max_sequence_length=2048)
