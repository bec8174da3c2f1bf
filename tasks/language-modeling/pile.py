"""The Pile: bits per UTF-8 byte for each `pile_set_name`, over JSON-lines documents."""
import math
from bisect import bisect_right
from collections import defaultdict
from itertools import accumulate
from typing import Dict, List

from evaluation import LanguageModelTask, LanguageModelTaskDataset, print_rank_0
from evaluation.utils import check_token_ids, read_json_items
from model.errors import UserError


def calculate_bpb_score(losses: List[float], data: List[Dict]) -> Dict[str, float]:
    """Σ loss (nats) / Σ UTF-8 bytes / ln 2 per pile_set_name (windows are mapped to their documents)."""
    loss_per_set = defaultdict(float)
    bytes_per_set = defaultdict(float)
    for doc in data:
        bytes_per_set[doc["meta"]["pile_set_name"]] += doc["utf8_length"]
    ends = list(accumulate(doc["num_sequences"] for doc in data))
    for window, loss in enumerate(losses):
        loss_per_set[data[bisect_right(ends, window)]["meta"]["pile_set_name"]] += loss
    return {name: loss_per_set[name] / bytes_per_set[name] / math.log(2) for name in loss_per_set}


class PileDataset(LanguageModelTaskDataset):
    """One document per JSON line: `text` (icetk ids, or raw text), `text_pretokenized` (raw text), `meta`.
    --limit counts documents here."""

    limit_counts_windows = False

    def load_documents(self):
        for line, item in read_json_items(self.path, self.limit):
            where = f"{self.path}:{line}: "
            text, raw = item.get("text"), item.get("text_pretokenized")
            if isinstance(text, str):  # raw Pile line: tokenize it here
                raw, text = text, self.tokenizer.tokenize(text)
            if not isinstance(text, list) or not isinstance(raw, str):
                raise UserError(f"{where}expected 'text' (token ids or a string) and 'text_pretokenized' (a string)")
            check_token_ids(text, self.tokenizer, "text", where)
            meta = item.get("meta")
            if not isinstance(meta, dict) or "pile_set_name" not in meta:
                raise UserError(f"{where}missing field 'meta.pile_set_name'")
            if not text:
                continue
            self.data.append({"raw_text": text, "utf8_length": len(raw.encode("utf-8")),
                              "num_sequences": self.num_sequences(len(text)), "meta": meta})


class Pile(LanguageModelTask):
    dataset_class = PileDataset

    @property
    def metrics(self):
        return {"BPB": calculate_bpb_score}

    def report_single_metrics(self, file, result_dict):
        pass

    def report_group_metrics(self, group_name, result_dict_group, level=1):
        output = f"    Finish group {group_name}:\n"
        result = next(iter(result_dict_group.values()))[0]["BPB"]
        for key, value in result.items():
            output += f"        {key} = {value:.3f}\n"
        print_rank_0(output)
