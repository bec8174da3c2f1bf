"""Evaluation data files -> model inputs (tokens, position ids, attention masks), as §7.5-7.6 of the original.

Every model input is a `model.layout.Layout` (tokens, positions, which rows see which; the one sample-layout module
shared with generation). The attention masks are built per batch from the layouts, padded only to the longest input
of the batch (the original padded every batch to a multiple of 32; padding is masked, so only the amount of work
changes).

Deliberate differences from the original (documented in docs/evaluation-data.md):
- an empty multiple-choice answer is scored as `[eop]` (the original crashed), as the original's later code does;
- a generation target given as one string counts as a one-element list (the original's metrics broke on it);
- multiple-choice contexts are truncated with the file-wide single-token flag, so no input exceeds max_seq_length;
- unidirectional language-model windows score each token once (the original re-scored the window overlaps).
"""
import math
from bisect import bisect_right
from itertools import accumulate
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from evaluation.configs import (BaseConfig, GenerationTaskConfig, LanguageModelTaskConfig,
                                MultiChoiceTaskConfig)
from evaluation.utils import check_whole_file_size, get_tokenized_input, open_data_file, read_json_items
from model.errors import UserError
from model.layout import (Layout, collate_layouts, generation_batch, generation_sample, language_model_window,
                          multiple_choice_sample)


def left_truncate(ids: List[int], keep: int) -> List[int]:
    return ids[len(ids) - keep:] if len(ids) > keep else ids


class EvaluationDataset:
    """The examples of one data file (`data`, what metrics see) and its model inputs (`len(self)` of them).
    `items`: records given in memory instead of the file's lines (the lm-eval model's requests); `path` then only
    names them in messages."""

    def __init__(self, path: str, config: BaseConfig, tokenizer, limit: Optional[int] = None,
                 items: Optional[Sequence[Any]] = None):
        self.path = path
        self.config = config
        self.tokenizer = tokenizer
        self.limit = limit
        self.items = items
        self.mask_id = tokenizer.get_command("[MASK]")
        self.gmask_id = tokenizer.get_command("[gMASK]")
        self.sop_id = tokenizer.get_command("sop")
        self.eop_id = tokenizer.get_command("eop")
        self.task_mask_id = self.gmask_id if config.use_task_mask else self.mask_id
        self.data: List[dict] = []
        self.load()

    def load(self) -> None:
        lines = read_json_items(self.path, self.limit) if self.items is None else enumerate(self.items, 1)
        for line, item in lines:
            self.data.extend(self.process_single_item(item, f"{self.path}:{line}: "))

    def process_single_item(self, item: dict, where: str) -> List[dict]:
        raise NotImplementedError

    def context_ids(self, item: dict, where: str) -> List[int]:
        """The `inputs` ids (or `inputs_pretokenized` tokenized): one text."""
        text = get_tokenized_input(item, "inputs", self.tokenizer, where)
        if text and isinstance(text[0], list):
            raise UserError(f"{where}field 'inputs' must be one text, not a list of texts")
        return text

    def __len__(self) -> int:
        return len(self.data)

    def sample_length(self, index: int) -> int:
        """Tokens of model input `index` (what batches are packed by)."""
        raise NotImplementedError

    def collate(self, indices: Sequence[int]) -> Dict[str, Any]:
        raise NotImplementedError


# ---- Multiple choice ----------------------------------------------------------------------------------------------

class MultiChoiceTaskDataset(EvaluationDataset):
    """`inputs(_pretokenized)`, `choices(_pretokenized)` (a list), `label` (index of the right choice)."""

    config: MultiChoiceTaskConfig
    required_fields: Tuple[str, ...] = ()  # extra fields a custom task needs on every line

    def load(self) -> None:
        super().load()
        self.is_single_token = all(len(c) == 1 for item in self.data for c in item["choices"])
        for item in self.data:
            self._truncate(item)

    def process_single_item(self, item, where):
        text = self.context_ids(item, where)
        choices = get_tokenized_input(item, "choices", self.tokenizer, where)
        if not isinstance(choices, list) or not choices or not all(isinstance(c, list) for c in choices):
            raise UserError(f"{where}field 'choices' must be a non-empty list of answers")
        for name in ("label",) + tuple(self.required_fields):
            if name not in item:
                raise UserError(f"{where}missing field '{name}'")
        label = item["label"]
        if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < len(choices):
            raise UserError(f"{where}field 'label' must be a choice index in [0, {len(choices)}), got {label!r}")
        if self.config.use_task_mask and self.gmask_id in text:
            raise UserError(f"{where}the context contains [gMASK]: blank filling needs [MASK] and use_task_mask: false")
        blank = self.mask_id in text and not self.config.use_task_mask
        if blank and (self.config.use_multitask_encoding or self.config.unidirectional):
            raise UserError(f"{where}the context contains [MASK] (blank filling), which "
                            f"use_multitask_encoding and unidirectional do not support")
        choices = [c if c else [self.eop_id] for c in choices]
        extra = {k: v for k, v in item.items() if not k.startswith(("inputs", "choices"))}
        return [{**extra, "text": text, "choices": choices, "label": label, "_where": where}]

    def _truncate(self, item: dict) -> None:
        max_len = self.config.max_seq_length
        tgt = 1 if self.is_single_token else sum(len(c) for c in item["choices"])
        if tgt + 2 >= max_len:
            raise UserError(f"{item['_where']}the choices take {tgt} tokens, more than max_seq_length "
                            f"{max_len} allows")
        item["text"] = left_truncate(item["text"], max_len - tgt - 2)
        del item["_where"]

    def sample_length(self, index):
        return len(self.build_sample(index)[0])

    def build_sample(self, index: int) -> Tuple[Layout, List[np.ndarray], List[List[int]]]:
        """The layout, and per choice the rows whose next-token log-probs are summed and the ids scored there."""
        item = self.data[index]
        return multiple_choice_sample(
            item["text"], item["choices"], self.is_single_token, self.task_mask_id, self.sop_id,
            use_task_mask=self.config.use_task_mask, unified_multitask_encoding=self.config.use_multitask_encoding,
            unidirectional=self.config.unidirectional)

    def collate(self, indices):
        layouts, rows, ids = zip(*(self.build_sample(i) for i in indices))
        batch = collate_layouts(layouts)
        batch["choice_rows"] = list(rows)
        batch["choice_ids"] = list(ids)
        return batch


# ---- Generation ---------------------------------------------------------------------------------------------------

class GenerationTaskDataset(EvaluationDataset):
    """`inputs(_pretokenized)`, `targets(_pretokenized)`: a list of acceptable answers."""

    config: GenerationTaskConfig

    def process_single_item(self, item, where):
        text = self.context_ids(item, where)
        targets = self._targets(item, where)
        if self.task_mask_id in text and (self.config.use_task_mask or self.config.unidirectional):
            raise UserError(f"{where}the context contains [gMASK]: blank filling needs [MASK] and "
                            f"use_task_mask: false")
        keep = self.config.max_seq_length - self.config.max_gen_length - 2
        extra = {k: v for k, v in item.items() if not k.startswith(("inputs", "targets"))}
        return [{**extra, "text": left_truncate(text, keep), "targets": targets}]

    def _targets(self, item, where) -> List[List[int]]:
        if "targets" not in item and "targets_pretokenized" not in item:
            return []
        if isinstance(item.get("targets_pretokenized"), str) and "targets" not in item:
            return [self.tokenizer.tokenize(item["targets_pretokenized"])]
        targets = get_tokenized_input(item, "targets", self.tokenizer, where)
        if targets and not isinstance(targets[0], list):
            targets = [targets]
        return targets

    def sample_length(self, index):
        return len(self.build_sample(index)["layout"])

    def build_sample(self, index: int) -> Dict[str, Any]:
        c = self.config
        return generation_sample(self.data[index]["text"], c.max_gen_length, self.task_mask_id, self.sop_id,
                                       use_task_mask=c.use_task_mask, unidirectional=c.unidirectional)

    def collate(self, indices):
        return generation_batch([self.build_sample(i) for i in indices])


# ---- Language modelling -------------------------------------------------------------------------------------------

class LanguageModelTaskDataset(EvaluationDataset):
    """A plain text file is one document (in-memory `items`: one document each); it is scored in windows of
    max_seq_length - 1 tokens that advance by generation_length, each later window with the preceding tokens as a
    bidirectional prompt."""

    config: LanguageModelTaskConfig
    limit_counts_windows = True  # --limit counts windows (False: documents, for multi-document files)

    def load(self) -> None:
        self.load_documents()
        self.weights = list(accumulate(d["num_sequences"] for d in self.data))
        self.left_weights = [0] + self.weights[:-1]
        self.num_windows = self.weights[-1] if self.weights else 0
        if self.limit is not None and self.limit_counts_windows:
            self.num_windows = min(self.num_windows, self.limit)

    def load_documents(self) -> None:
        if self.items is not None:
            for raw_text in self.items:
                self.add_document(raw_text)
            return
        try:
            with open_data_file(self.path) as f:
                check_whole_file_size(f, self.path, "a plain-text document")
                raw_text = f.read()
        except UnicodeDecodeError as e:
            raise UserError(f"{self.path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
        self.add_document(raw_text)

    def add_document(self, raw_text: str) -> None:
        tokens = self.tokenizer.tokenize(raw_text)
        self.data.append({"raw_text": tokens, "num_original_tokens": len(raw_text.strip().split(" ")),
                          "num_sequences": self.num_sequences(len(tokens))})

    def num_sequences(self, num_tokens: int) -> int:
        """Windows of a document (none for an empty one)."""
        c = self.config
        if num_tokens == 0:
            return 0
        return max(math.ceil(max(num_tokens - (c.max_seq_length - 1), 0) / c.generation_length) + 1, 1)

    def __len__(self):
        return self.num_windows

    def locate(self, index: int) -> Tuple[int, int]:
        doc = bisect_right(self.weights, index)
        return doc, index - self.left_weights[doc]

    def build_sample(self, index: int) -> Dict[str, Any]:
        c = self.config
        doc, window = self.locate(index)
        start = window * c.generation_length
        tokens = list(self.data[doc]["raw_text"][start:start + c.max_seq_length - 1])
        prompt_length = c.max_seq_length - 1 - c.generation_length
        if window == 0:
            prompt, text, scored = [], tokens, len(tokens)
        elif c.unidirectional:
            prompt, text, scored = [], tokens, len(tokens) - prompt_length
        else:
            prompt, text, scored = tokens[:prompt_length], tokens[prompt_length:], len(tokens) - prompt_length
        layout, targets = language_model_window(prompt, text, self.task_mask_id, self.sop_id)
        loss_mask = np.zeros(len(layout), dtype=np.float32)
        loss_mask[len(layout) - scored:] = 1
        return {"layout": layout, "targets": targets, "loss_mask": loss_mask}

    def sample_length(self, index):
        c = self.config
        doc, window = self.locate(index)
        start = window * c.generation_length
        n = len(self.data[doc]["raw_text"][start:start + c.max_seq_length - 1])
        return n + 1

    def collate(self, indices):
        samples = [self.build_sample(i) for i in indices]
        batch = collate_layouts([s["layout"] for s in samples])
        length = batch["tokens"].shape[1]
        targets = torch.zeros((len(samples), length), dtype=torch.long)
        loss_mask = torch.zeros((len(samples), length), dtype=torch.float32)
        for i, s in enumerate(samples):
            targets[i, :len(s["targets"])] = torch.from_numpy(s["targets"])
            loss_mask[i, :len(s["loss_mask"])] = torch.from_numpy(s["loss_mask"])
        batch["targets"] = targets
        batch["loss_mask"] = loss_mask
        return batch
