"""Model inputs built from data files: the original's layouts (Appendix A), windows, packing and data errors."""
import json

import numpy as np
import pytest
import torch

from evaluation.configs import GenerationTaskConfig, LanguageModelTaskConfig, MultiChoiceTaskConfig, TaskType
from evaluation.dataset import GenerationTaskDataset, LanguageModelTaskDataset, MultiChoiceTaskDataset
from evaluation.utils import pack_by_length, shard_batches
from model.errors import UserError
from model.layout import DecodingLayout, collate_layouts, generation_sample, multiple_choice_sample
from tests.eval_helpers import write_jsonl

MASK, GMASK, SOP, EOP = 150000, 150001, 150004, 150005


class WordTokenizer:
    """Each space-separated word is one id (20000 + its index in the vocabulary built on the fly)."""

    def __init__(self):
        self.vocab = {}

    def tokenize(self, text):
        return [20000 + self.vocab.setdefault(w, len(self.vocab)) for w in text.split()]

    def get_command(self, name):
        return {"[MASK]": MASK, "[gMASK]": GMASK, "sop": SOP, "eop": EOP}[name]


def allowed(layout):
    batch = collate_layouts([layout])
    return (~batch["attention_mask"][0, 0]).int().numpy()


def test_multiple_choice_layout_of_appendix_a():
    text, x, y = [1, 2, 3], [11, 12], [21, 22]
    n = len(text)
    layout, rows, ids = multiple_choice_sample(text, [x, y], False, MASK, SOP)
    assert layout.tokens.tolist() == text + [MASK, SOP, 11, SOP, 21]
    assert layout.position_ids.tolist() == [0, 1, 2, n, n, n, n, n]
    assert [r.tolist() for r in rows] == [[n + 1, n + 2], [n + 3, n + 4]] and ids == [x, y]
    expected = np.zeros((8, 8), dtype=int)
    expected[:, :n + 1] = 1  # everyone sees the bidirectional context (text + mask)
    expected[n + 1:n + 3, n + 1:n + 3] = np.tril(np.ones((2, 2)))  # choice x, causal
    expected[n + 3:, n + 3:] = np.tril(np.ones((2, 2)))  # choice y, causal; never sees x
    expected[:n + 1, n + 1:] = 0
    assert (allowed(layout) == expected).all()
    gm, _, _ = multiple_choice_sample(text, [x, y], False, GMASK, SOP, use_task_mask=True)
    assert gm.position_ids.tolist() == [0, 1, 2, n, n + 1, n + 2, n + 1, n + 2]
    mt, _, _ = multiple_choice_sample(text, [x, y], False, MASK, SOP, unified_multitask_encoding=True)
    assert mt.position_ids.tolist()[n + 1:] == [n, n + 1, n, n + 1]


def test_single_token_choices_share_the_sop_row_and_blank_filling_keeps_the_mask():
    layout, rows, ids = multiple_choice_sample([1, 2], [[7], [8], [9]], True, MASK, SOP)
    assert layout.tokens.tolist() == [1, 2, MASK, SOP]
    assert [r.tolist() for r in rows] == [[3], [3], [3]] and ids == [[7], [8], [9]]
    blank, rows, _ = multiple_choice_sample([1, MASK, 2], [[7, 8]], False, MASK, SOP)
    assert blank.tokens.tolist() == [1, MASK, 2, SOP, 7] and blank.position_ids.tolist() == [0, 1, 2, 1, 1]
    assert rows[0].tolist() == [3, 4]


def test_generation_layouts():
    g = generation_sample([1, 2, 3], 4, GMASK, SOP, use_task_mask=True)
    assert g["layout"].tokens.tolist() == [1, 2, 3, GMASK, SOP]
    assert g["layout"].position_ids.tolist() == [0, 1, 2, 3, 4] and g["target_position_ids"].tolist() == [5, 6, 7, 8]
    expected = np.tril(np.ones((5, 5), dtype=int))
    expected[:4, :4] = 1  # bidirectional over everything but sop
    assert (allowed(g["layout"]) == expected).all()
    m = generation_sample([1, 2, 3], 2, MASK, SOP)
    assert m["layout"].position_ids.tolist() == [0, 1, 2, 3, 3] and m["target_position_ids"].tolist() == [3, 3]
    u = generation_sample([1, 2, 3], 2, GMASK, SOP, use_task_mask=True, unidirectional=True)
    assert u["layout"].tokens.tolist() == [GMASK, SOP, 1, 2, 3]
    assert (allowed(u["layout"]) == np.tril(np.ones((5, 5), dtype=int))).all()


def test_decoding_mask_continues_each_sample_after_the_padding():
    samples = [generation_sample([1, 2, 3], 2, GMASK, SOP, use_task_mask=True),
               generation_sample([4], 2, GMASK, SOP, use_task_mask=True)]
    batch = collate_layouts([s["layout"] for s in samples])
    batch["context_length"] = torch.tensor([5, 3])
    batch["target_position_ids"] = torch.from_numpy(np.stack([s["target_position_ids"] for s in samples]))
    tokens, mask, positions = DecodingLayout(batch, "cpu")(batch["tokens"])
    assert tokens[1].tolist() == [4, GMASK, SOP, 0, 0, -1, -1]
    assert positions[1].tolist() == [0, 1, 2, 0, 0, 3, 4]
    see = (~mask[1, 0]).int()
    assert see[5].tolist() == [1, 1, 1, 0, 0, 1, 0]  # first generated token: the sop row's context + itself
    assert see[6].tolist() == [1, 1, 1, 0, 0, 1, 1]
    assert see[:5, 5:].sum() == 0  # context rows never see generated columns


@pytest.mark.parametrize("unidirectional", [False, True])
def test_language_model_windows_score_every_token_once(tmp_path, unidirectional):
    words = [f"w{i}" for i in range(30)]
    path = tmp_path / "doc.txt"
    path.write_text(" ".join(words) + " \n")
    config = LanguageModelTaskConfig(name="t", type=TaskType.LANGUAGE_MODEL, path=str(tmp_path), max_seq_length=16,
                                     generation_length=4, use_task_mask=True, unidirectional=unidirectional)
    ds = LanguageModelTaskDataset(str(path), config, WordTokenizer())
    doc = ds.data[0]["raw_text"]
    assert ds.data[0]["num_original_tokens"] == 30 and len(ds) == 1 + -(-(30 - 15) // 4) == 5
    scored = []
    for i in range(len(ds)):
        s = ds.build_sample(i)
        mask = s["loss_mask"].astype(bool)
        scored += s["targets"][mask].tolist()
        if i == 1 and not unidirectional:  # Appendix A, scaled: 11 prompt tokens, gMASK, sop, 3 text inputs
            assert s["layout"].tokens.tolist() == doc[4:15] + [GMASK, SOP] + doc[15:18]
            assert s["targets"].tolist() == doc[4:15] + [GMASK] + doc[15:19]
            assert mask.tolist() == [False] * 12 + [True] * 4
            see = allowed(s["layout"])
            assert see[:12, :12].all() and see[12:, 12:].tolist() == np.tril(np.ones((4, 4))).tolist()
    assert scored == doc


def test_packing_and_data_parallel_sharing():
    batches = pack_by_length([5, 9, 1, 9, 3], 2)
    assert batches == [[1, 3], [0, 4], [2]]
    assert shard_batches(batches, 0, 2) == [[1, 3], [2]] and shard_batches(batches, 1, 2) == [[0, 4]]
    assert pack_by_length([5, 9, 1, 9, 3, 5, 5], 2, same_length=True) == [[1, 3], [0, 5], [6], [4], [2]]


def _mul_config(tmp_path, **kw):
    return MultiChoiceTaskConfig(name="t", type=TaskType.MULTICHOICE, path=str(tmp_path), **kw)


def test_multiple_choice_file_formats(tmp_path):
    tok = WordTokenizer()
    path = write_jsonl(tmp_path / "a.json", [  # JSON lines in a .json file, ids or text, an empty choice
        {"inputs": [20001, 20002], "choices": [[20003], [20004, 20005]], "label": 1, "extra": "kept"},
        {"inputs_pretokenized": "a b c", "choices_pretokenized": ["x", ""], "label": 0}])
    ds = MultiChoiceTaskDataset(str(path), _mul_config(tmp_path), tok)
    assert not ds.is_single_token and ds.data[0]["extra"] == "kept"
    assert ds.data[1]["choices"][1] == [EOP]
    array = tmp_path / "b.json"
    array.write_text(json.dumps([{"inputs": [1], "choices": [[2], [3]], "label": 0}]))
    single = MultiChoiceTaskDataset(str(array), _mul_config(tmp_path), tok)
    assert single.is_single_token and len(single) == 1
    long = write_jsonl(tmp_path / "c.jsonl", [{"inputs": list(range(20000, 20050)), "choices": [[7, 8]], "label": 0}])
    truncated = MultiChoiceTaskDataset(str(long), _mul_config(tmp_path, max_seq_length=20), tok)
    assert truncated.data[0]["text"] == list(range(20034, 20050)) and truncated.sample_length(0) == 19


@pytest.mark.parametrize("line, message", [
    ('{"inputs_pretokenized": "a", "label": 0', "invalid JSON"),
    ('{"inputs_pretokenized": "a", "label": 0}', "missing field 'choices_pretokenized'"),
    ('{"inputs_pretokenized": "a", "choices_pretokenized": ["x"]}', "missing field 'label'"),
    ('{"inputs_pretokenized": "a", "choices_pretokenized": ["x"], "label": 3}', "field 'label'"),
    ('{"inputs": "a b", "choices_pretokenized": ["x"], "label": 0}', "field 'inputs'"),
    ('[1, 2]', "expected a JSON object, got list"),
])
def test_bad_data_lines_give_one_line_errors(tmp_path, line, message):
    path = tmp_path / "d.jsonl"
    path.write_text('{"inputs_pretokenized": "ok", "choices_pretokenized": ["x"], "label": 0}\n' + line + "\n")
    with pytest.raises(UserError) as e:
        MultiChoiceTaskDataset(str(path), _mul_config(tmp_path), WordTokenizer())
    assert message in str(e.value) and "\n" not in str(e.value)
    assert str(e.value).startswith(f"{path}:2: ")


def test_generation_targets_and_truncation(tmp_path):
    path = write_jsonl(tmp_path / "g.jsonl", [
        {"inputs_pretokenized": "a b c d e f", "targets_pretokenized": "one answer"},
        {"inputs_pretokenized": "a", "targets_pretokenized": ["x", "y z"]}])
    config = GenerationTaskConfig(name="t", type=TaskType.GENERATION, path=str(tmp_path), max_seq_length=8,
                                  max_gen_length=3, use_task_mask=True)
    ds = GenerationTaskDataset(str(path), config, WordTokenizer())
    assert [len(t) for t in ds.data[0]["targets"]] == [2] and len(ds.data[1]["targets"]) == 2
    assert len(ds.data[0]["text"]) == 3  # 8 - 3 - 2 tokens kept, from the end
    assert ds.sample_length(0) == 5
