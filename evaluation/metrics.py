"""Metrics registered by name (`DEFAULT_METRICS`), as the original's evaluation/metrics.py defines them.

A metric is `fn(predictions, examples)` or `fn(predictions, examples, tokenizer)` (the QA metrics decode token ids),
where `predictions` are in data order and `examples` are the dataset's items. Values are percentages except PPL.
"""
import inspect
import math
import re
import string
from collections import Counter
from functools import partial
from typing import Any, Callable, Dict, Iterable, List, Sequence

import numpy as np

from model.errors import UserError
from model.tokenizer import text_id_range


def accuracy_metric(predictions: Sequence[Any], examples: Sequence[dict]) -> float:
    """100 · #(prediction == label) / #samples."""
    correct = sum(int(p == e["label"]) for p, e in zip(predictions, examples))
    return correct * 100.0 / max(len(predictions), 1)


# ---- Precision / Recall / F1 (micro average) --------------------------------------------------------------------

def _micro_counts(predictions: Sequence[Any], examples: Sequence[dict]):
    """Summed true positives, false positives and false negatives over every label seen in either list.

    This is sklearn's `average='micro'` over the union of labels (its default `labels=None`): for single-label
    predictions every wrong prediction is one false positive (for the predicted class) and one false negative
    (for the true class), so micro precision = micro recall = micro F1 = accuracy.
    """
    y_pred = np.asarray([str(p) for p in predictions])
    y_true = np.asarray([str(e["label"]) for e in examples])
    tp = fp = fn = 0
    for label in np.union1d(y_true, y_pred):
        pred_is, true_is = y_pred == label, y_true == label
        tp += int(np.sum(pred_is & true_is))
        fp += int(np.sum(pred_is & ~true_is))
        fn += int(np.sum(~pred_is & true_is))
    return tp, fp, fn


def precision_metric(predictions, examples) -> float:
    tp, fp, _ = _micro_counts(predictions, examples)
    return 100.0 * tp / (tp + fp) if tp + fp else 0.0  # sklearn's zero_division default gives 0 too


def recall_metric(predictions, examples) -> float:
    tp, _, fn = _micro_counts(predictions, examples)
    return 100.0 * tp / (tp + fn) if tp + fn else 0.0


def f1_mul_metric(predictions, examples) -> float:
    tp, fp, fn = _micro_counts(predictions, examples)
    return 100.0 * 2 * tp / (2 * tp + fp + fn) if tp else 0.0


# ---- SQuAD-style QA metrics ---------------------------------------------------------------------------------------

_PUNCTUATION = set(string.punctuation)


def normalize_answer(s: str) -> str:
    """SQuAD normalisation: lower case, drop ASCII punctuation, drop a/an/the, collapse whitespace."""
    s = "".join(ch for ch in s.lower() if ch not in _PUNCTUATION)
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


def f1_score(prediction: str, ground_truth: str) -> float:
    pred_tokens = normalize_answer(prediction).split()
    truth_tokens = normalize_answer(ground_truth).split()
    same = sum((Counter(pred_tokens) & Counter(truth_tokens)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred_tokens), same / len(truth_tokens)
    return 2 * precision * recall / (precision + recall)


def exact_match_score(prediction: str, ground_truth: str) -> bool:
    return normalize_answer(prediction) == normalize_answer(ground_truth)


def metric_max_over_ground_truths(metric_fn: Callable, prediction: str, ground_truths: List[str]) -> float:
    if not ground_truths:
        return 0.0
    return max(metric_fn(prediction, truth) for truth in ground_truths)


def decode_text(tokenizer, ids: Iterable[int]) -> str:
    """icetk's raw decode of the text ids; special or out-of-vocabulary ids are left out (icetk would crash)."""
    lo, hi = text_id_range(tokenizer)
    return tokenizer.decode([int(i) for i in ids if lo <= int(i) < hi])


def qa_evaluate(predictions, examples, tokenizer, metric: Callable) -> float:
    """100 · mean over samples of the best `metric` against any decoded target (0 when there is none)."""
    assert len(predictions) == len(examples)
    score = 0.0
    for prediction, example in zip(predictions, examples):
        truths = [decode_text(tokenizer, t) for t in example.get("targets", [])]
        if truths:
            score += metric_max_over_ground_truths(metric, decode_text(tokenizer, prediction), truths)
    return 100.0 * score / max(len(predictions), 1)


qa_exact_match = partial(qa_evaluate, metric=exact_match_score)
qa_f1 = partial(qa_evaluate, metric=f1_score)


# ---- Language modelling -------------------------------------------------------------------------------------------

def calculate_perplexity(losses: Sequence[float], examples: Sequence[dict]) -> float:
    """Word-level perplexity of a file: exp(min(20, Σ loss / space-separated word count))."""
    return math.exp(min(20.0, float(np.sum(losses)) / examples[0]["num_original_tokens"]))


DEFAULT_METRICS: Dict[str, Callable] = {
    "Accuracy": accuracy_metric,
    "EM": qa_exact_match,
    "F1": qa_f1,
    "PPL": calculate_perplexity,
    "Precision": precision_metric,
    "Recall": recall_metric,
    "F1_mul": f1_mul_metric,
}


def resolve_metrics(names: Sequence[str], where: str) -> Dict[str, Callable]:
    unknown = [n for n in names if n not in DEFAULT_METRICS]
    if unknown:
        raise UserError(f"{where}: field 'metrics' has unknown metric {unknown[0]!r}; "
                        f"known: {', '.join(DEFAULT_METRICS)}")
    return {n: DEFAULT_METRICS[n] for n in names}


def _wants_tokenizer(fn: Callable) -> bool:
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    if "tokenizer" in params:
        return True
    positional = [p for p in params.values()
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is p.empty]
    return len(positional) >= 3


def call_metric(fn: Callable, predictions, examples, tokenizer) -> Any:
    if _wants_tokenizer(fn):
        return fn(predictions, examples, tokenizer=tokenizer)
    return fn(predictions, examples)
