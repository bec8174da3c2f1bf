"""Metrics with hand-computed values, group statistics, and the original's report lines."""
import importlib
import math

import pytest

from evaluation.metrics import (DEFAULT_METRICS, call_metric, f1_score, normalize_answer, qa_evaluate)
from evaluation.report import group_statistics
from evaluation.tasks import MultiChoiceTask
from tests.helpers import ROOT


class _CharTokenizer:
    """ids 20000 + ord(c): enough to decode predictions and targets in qa_evaluate."""
    piece_count = 130000

    def tokenize(self, text):
        return [20000 + ord(c) for c in text]

    def decode(self, ids):
        return "".join(chr(i - 20000) for i in ids)


def test_accuracy():
    examples = [{"label": 0}, {"label": 1}, {"label": 2}, {"label": 1}]
    assert DEFAULT_METRICS["Accuracy"]([0, 1, 1, 0], examples) == 50.0
    assert DEFAULT_METRICS["Accuracy"]([], []) == 0.0


def test_micro_precision_recall_f1_equal_sklearn_micro_average():
    # y_true = 0 1 2 2 1, y_pred = 0 2 2 1 1: per class TP/FP/FN = 0:(1,0,0) 1:(1,1,1) 2:(1,1,1) -> micro P = R = 3/5
    examples = [{"label": x} for x in [0, 1, 2, 2, 1]]
    predictions = [0, 2, 2, 1, 1]
    for name in ("Precision", "Recall", "F1_mul"):
        assert DEFAULT_METRICS[name](predictions, examples) == pytest.approx(60.0)
    assert DEFAULT_METRICS["F1_mul"]([3, 3], [{"label": 0}, {"label": 1}]) == 0.0


def test_squad_normalisation_exact_match_and_f1():
    assert normalize_answer("  The Cat, sat on a MAT! ") == "cat sat on mat"
    assert f1_score("the cat sat", "a cat sat down") == pytest.approx(2 * (2 / 2) * (2 / 3) / (2 / 2 + 2 / 3))
    tok = _CharTokenizer()
    examples = [{"targets": [tok.tokenize("The answer"), tok.tokenize("an answer!")]},  # EM 1 after normalising
                {"targets": [tok.tokenize("red blue green")]},  # F1 with "blue green yellow": P 2/3, R 2/3
                {"targets": []}]  # no target: contributes 0
    predictions = [tok.tokenize("answer"), tok.tokenize("blue green yellow"), tok.tokenize("x")]
    em = call_metric(DEFAULT_METRICS["EM"], predictions, examples, tok)
    f1 = call_metric(DEFAULT_METRICS["F1"], predictions, examples, tok)
    assert em == pytest.approx(100 / 3)
    assert f1 == pytest.approx(100 * (1 + 2 / 3) / 3)
    assert qa_evaluate(predictions[:1], examples[:1], tok, metric=lambda p, t: p == t) == 0.0  # raw: "answer" != "The answer"


def test_perplexity_is_word_level_and_capped():
    data = [{"num_original_tokens": 4}]
    assert DEFAULT_METRICS["PPL"]([1.0, 3.0], data) == pytest.approx(math.e)
    assert DEFAULT_METRICS["PPL"]([1000.0], data) == pytest.approx(math.exp(20))


def test_pile_bits_per_byte_per_set():
    pile = importlib.import_module("tasks.language-modeling.pile")
    data = [{"num_sequences": 2, "utf8_length": 10, "meta": {"pile_set_name": "A"}},
            {"num_sequences": 1, "utf8_length": 30, "meta": {"pile_set_name": "B"}},
            {"num_sequences": 1, "utf8_length": 10, "meta": {"pile_set_name": "A"}}]
    bpb = pile.calculate_bpb_score([1.0, 2.0, 3.0, 4.0], data)  # windows 0,1 -> doc 0; 2 -> doc 1; 3 -> doc 2
    assert bpb == pytest.approx({"A": (1 + 2 + 4) / 20 / math.log(2), "B": 3 / 30 / math.log(2)})


def test_group_statistics_are_max_median_and_sample_weighted_average():
    stats = group_statistics([50.0, 100.0, 80.0], [2, 1, 1])
    assert stats == pytest.approx({"max": 100.0, "median": 80.0, "average": (100 + 100 + 80) / 4})
    nested = group_statistics([{"A": 1.0, "B": 3.0}, {"A": 3.0, "B": 3.0}], [1, 3])
    assert nested["A"] == pytest.approx({"max": 3.0, "median": 2.0, "average": 2.5})


def _report(capsys, result_dict_group, level=1):
    task = MultiChoiceTask.__new__(MultiChoiceTask)
    task.report_group_metrics("validation", result_dict_group, level=level)
    return capsys.readouterr().out.splitlines()


def test_report_lines_have_the_original_format(capsys):
    task = MultiChoiceTask.__new__(MultiChoiceTask)
    task.report_single_metrics("prompt_a/validation.jsonl", {"Accuracy": 2 / 3 * 100, "F1": 12.3456})
    assert capsys.readouterr().out == "        Finish prompt_a/validation.jsonl, Accuracy = 66.667, F1 = 12.346\n"
    one = {"a": ({"Accuracy": 50.0}, 2), "b": ({"Accuracy": 100.0}, 1), "c": ({"Accuracy": 80.0}, 1)}
    assert _report(capsys, one) == ["    Group validation Accuracy: max = 100.000, median = 80.000, average = 70.000"]
    assert _report(capsys, one, level=0) == ["Group validation Accuracy: max = 100.000, median = 80.000, average = 70.000"]
    two = {"a": ({"EM": 10.0, "F1": 20.0}, 1), "b": ({"EM": 30.0, "F1": 40.0}, 3)}
    assert _report(capsys, two) == ["      Group validation: ",
                                    "        Metric EM: max = 30.000, median = 20.000, average = 25.000",
                                    "        Metric F1: max = 40.000, median = 30.000, average = 35.000"]


def test_custom_metrics_crows_pairs_and_stereoset(monkeypatch):
    monkeypatch.chdir(ROOT)
    crows = importlib.import_module("tasks.ethnic.crows-pair.tasks")
    stereo = importlib.import_module("tasks.ethnic.stereoset.tasks")
    examples = [{"pair_ID": 0, "sent_ID": 1, "bias_type": "g"}, {"pair_ID": 0, "sent_ID": 2, "bias_type": "g"},
                {"pair_ID": 1, "sent_ID": 1, "bias_type": "g"}, {"pair_ID": 1, "sent_ID": 2, "bias_type": "g"},
                {"pair_ID": 2, "sent_ID": 2, "bias_type": "a"}, {"pair_ID": 2, "sent_ID": 1, "bias_type": "a"}]
    predictions = [[-3.0], [-5.0], [-9.0], [-2.0], [-4.0], [-4.0]]  # pair diffs: +2, -7, 0
    task = crows.CrowsPairTask.__new__(crows.CrowsPairTask)
    assert task.crows_pair_metric(predictions, examples) == {"g": 0.5, "a": 1.0}
    labels = ["stereotype", "anti-stereotype", "unrelated"]
    examples = [{"bias_type": "x", "goal_label": labels}] * 3 + [{"bias_type": "y", "goal_label": labels}]
    result = stereo.StereoSetTask.__new__(stereo.StereoSetTask).stereoset_metric([0, 0, 1, 2], examples)
    # x: 2 stereo + 1 anti of 3 -> LMS 100, SS 66.67, ICAT 100 * 33.33 / 50; y: unrelated -> LMS 0, SS 0
    assert result["LMS"] == pytest.approx({"x": 100.0, "y": 0.0, "overall": 75.0})
    assert result["SS"] == pytest.approx({"x": 200 / 3, "y": 0, "overall": 200 / 3})
    assert result["ICAT"]["x"] == pytest.approx(100 * (100 / 3) / 50)
