"""Echo scoring: a text's own tokens scored as the evaluation's language model scores a window, many texts per forward.

A text is read as `[gMASK] sop text` (model.layout.language_model_window: [gMASK] the bidirectional prompt, the text
causal after sop), so token k gets log p(text[k] | [gMASK] sop text[:k]), the quantity evaluate.py's language-model
scoring sums. A text that starts with sop (the start token lm-eval puts before a document) uses it as the window's
own sop: that token's log-prob is None and the rest is scored from the same window. With `next_token` the window
also holds the text's last token, whose row gives the logits of the token after the text (echo with max_tokens >= 1
needs no second forward).

`score_texts` right-pads several texts into one forward (collate_layouts, as the evaluation packs samples) and computes
the logits of the scored rows only; log-probs and alternatives come from the vocabulary shards (model/mpu.py).
"""
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from model import mpu
from model.layout import Layout, collate_layouts, language_model_window


@dataclass
class TokenLogprob:
    token: str  # the text this token adds (the tokens of a text concatenate to it)
    logprob: Optional[float]  # None: a leading sop, which is not scored
    top: Dict[str, float]


def scored_part(ids: Sequence[int], sop: int) -> List[int]:
    """The tokens that get a log-prob: all of them, or all but a leading sop."""
    return list(ids[1:] if ids and ids[0] == sop else ids)


def echo_layout(ids: Sequence[int], tokenizer, next_token: bool) -> Layout:
    """The window that scores `ids` (and, with next_token, predicts the token after them)."""
    sop = tokenizer.get_command("sop")
    layout, _ = language_model_window([], scored_part(ids, sop), tokenizer.get_command("[gMASK]"), sop,
                                      next_token=next_token)
    return layout


def score_texts(model, tokenizer, texts: Sequence[Sequence[int]], tops: Sequence[int],
                next_token: Sequence[bool]) -> List[Tuple[List[TokenLogprob], Optional[torch.Tensor]]]:
    """Per text: its tokens' log-probs (with `tops[i]` alternatives each) and, where next_token[i], the full-vocabulary
    logits [V] of the token after it; one forward for all texts."""
    sop = tokenizer.get_command("sop")
    layouts = [echo_layout(ids, tokenizer, nt) for ids, nt in zip(texts, next_token)]
    counts = [len(scored_part(ids, sop)) for ids in texts]
    rows = [list(range(1, n + 1 + nt)) for n, nt in zip(counts, next_token)]  # row j predicts scored token j - 1
    width = max(len(r) for r in rows)
    batch = collate_layouts(layouts)
    device = next(model.parameters()).device
    index = torch.tensor([r + r[:1] * (width - len(r)) for r in rows], device=device)
    shard = model.logits(batch["tokens"].to(device), batch["position_ids"].to(device),
                         batch["attention_mask"].to(device), logits_index=index, parallel_output=True)
    out = []
    for b, (ids, top, nt, n) in enumerate(zip(texts, tops, next_token, counts)):
        logprobs = window_logprobs(tokenizer, ids, shard[b, :n], top)
        nxt = mpu.gather_from_model_parallel_region(shard[b, n]) if nt else None
        out.append((logprobs, nxt))
    return out


def window_logprobs(tokenizer, ids: Sequence[int], shard_rows: torch.Tensor, top: int) -> List[TokenLogprob]:
    """The TokenLogprobs of `ids` from the vocab-sharded logits of the rows that predict their scored part
    ([n, V/mp], row j predicting scored token j)."""
    sop = tokenizer.get_command("sop")
    scored = scored_part(ids, sop)
    targets = torch.tensor(scored, dtype=torch.long, device=shard_rows.device)
    chosen = mpu.vocab_parallel_log_probs(shard_rows, torch.arange(len(scored), device=shard_rows.device), targets)
    alternatives: List[Dict[str, float]] = [{} for _ in scored]
    if top > 0:
        values, alt_ids = mpu.vocab_parallel_top_log_probs(shard_rows, top)
        alternatives = [{tokenizer.id_text(i): v for v, i in zip(vs, js)}
                        for vs, js in zip(values.tolist(), alt_ids.tolist())]
    texts = tokenizer.token_texts(ids)
    lead = len(ids) - len(scored)
    out = [TokenLogprob(texts[0], None, {})] if lead else []
    return out + [TokenLogprob(t, lp, alt) for t, lp, alt in zip(texts[lead:], chosen.tolist(), alternatives)]
