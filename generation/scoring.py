"""Echo scoring: a text's own tokens scored as the evaluation's language model scores a window, many texts per forward.

A text is read as `[gMASK] sop text` (model.layout.language_model_window: [gMASK] the bidirectional prompt, the text
causal after sop), so token k gets log p(text[k] | [gMASK] sop text[:k]), the quantity evaluate.py's language-model
scoring sums. A text that starts with sop (the start token lm-eval puts before a document) uses it as the window's
own sop: that token's log-prob is None and the rest is scored from the same window. With `next_token` the window
also holds the text's last token, whose row gives the logits of the token after the text (echo with max_tokens >= 1
needs no second forward).

`score_texts` puts several texts into one forward, as the evaluation packs samples: texts that begin alike (the
answers lm-eval asks about one question) share one row, their common beginning computed once and each one's rest a
causal block after it (the packing of multiple_choice_sample, read left to right), and the rows are right-padded
together (collate_layouts). Only the scored rows' logits are computed; log-probs and alternatives come from the
vocabulary shards (model/mpu.py).
"""
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
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
    logits [V] of the token after it; one forward for all texts. Texts that begin alike (the answers of one
    question) share one row: their common beginning once, then each one's rest as a causal block that sees it."""
    sop = tokenizer.get_command("sop")
    scored = [scored_part(ids, sop) for ids in texts]
    layouts, rows = [], [None] * len(texts)  # rows[i]: (layout index, the rows predicting text i's tokens)
    for members, shared in _sharing(scored):
        layout, member_rows = _packed_window(tokenizer, [scored[i] for i in members], shared,
                                             [next_token[i] for i in members])
        for i, r in zip(members, member_rows):
            rows[i] = (len(layouts), r)
        layouts.append(layout)
    wanted = [sorted({r for i in range(len(texts)) if rows[i][0] == g for r in rows[i][1]})
              for g in range(len(layouts))]
    width = max(len(w) for w in wanted)
    batch = collate_layouts(layouts)
    device = next(model.parameters()).device
    index = torch.tensor([w + w[:1] * (width - len(w)) for w in wanted], device=device)
    shard = model.logits(batch["tokens"].to(device), batch["position_ids"].to(device),
                         batch["attention_mask"].to(device), logits_index=index, parallel_output=True)
    out = []
    for i, (ids, top, nt) in enumerate(zip(texts, tops, next_token)):
        g, member_rows = rows[i]
        column = {r: k for k, r in enumerate(wanted[g])}
        own = shard[g, [column[r] for r in member_rows]]
        n = len(scored[i])
        out.append((window_logprobs(tokenizer, ids, own[:n], top),
                    mpu.gather_from_model_parallel_region(own[n]) if nt else None))
    return out


def _sharing(scored: Sequence[Sequence[int]]) -> List[Tuple[List[int], int]]:
    """Groups of texts that share their beginning, in order: (members, tokens shared). A text joins the first group
    whose first member shares at least half of the text (and 2 tokens); every member keeps a token of its own."""
    groups: List[Tuple[List[int], int]] = []
    for i, text in enumerate(scored):
        for k, (members, shared) in enumerate(groups):
            common = _common_length(scored[members[0]], text)
            if common >= max(2, len(text) // 2):
                groups[k] = (members + [i], min(shared, common))
                break
        else:
            groups.append(([i], len(text)))
    return [(members, min([shared] + [len(scored[i]) - 1 for i in members])) for members, shared in groups]


def _common_length(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _packed_window(tokenizer, texts: Sequence[Sequence[int]], shared: int, next_token: Sequence[bool]):
    """`[gMASK] sop texts[0][:shared]`, causal, then per text the rest of its window as a causal block that sees
    that beginning: each text's tokens get exactly the log-probs of its own window. Returns the layout and, per
    text, the rows whose logits predict its tokens (and, with next_token, the token after it)."""
    tokens = [tokenizer.get_command("[gMASK]"), tokenizer.get_command("sop")] + list(texts[0][:shared])
    prefix = len(tokens)
    segments, rows = [], []
    for text, nt in zip(texts, next_token):
        start = len(tokens)
        tokens += list(text[shared:len(text) - 1]) + (list(text[-1:]) if nt else [])
        if len(tokens) > start:
            segments.append((start, len(tokens)))
        rows.append(list(range(1, shared + 2)) + list(range(start, len(tokens))))
    positions = list(range(prefix))
    for start, end in segments:
        positions += range(prefix, prefix + end - start)
    layout = Layout(np.asarray(tokens, dtype=np.int64), np.asarray(positions, dtype=np.int64), prefix,
                    prefix_causal=True, segments=segments)
    return layout, rows


def window_logprobs(tokenizer, ids: Sequence[int], shard_rows: torch.Tensor, top: int) -> List[TokenLogprob]:
    """The TokenLogprobs of `ids` from the vocab-sharded logits of the rows that predict their scored part
    ([n, V/mp], row j predicting scored token j)."""
    sop = tokenizer.get_command("sop")
    scored = scored_part(ids, sop)
    targets = torch.tensor(scored, dtype=torch.long, device=shard_rows.device)
    chosen, values, alt_ids = mpu.vocab_parallel_scores(shard_rows, targets, top)
    alternatives = [{tokenizer.id_text(i): v for v, i in zip(vs, js)}
                    for vs, js in zip(values.tolist(), alt_ids.tolist())]
    texts = tokenizer.token_texts(ids)
    lead = len(ids) - len(scored)
    out = [TokenLogprob(texts[0], None, {})] if lead else []
    return out + [TokenLogprob(t, lp, alt) for t, lp, alt in zip(texts[lead:], chosen.tolist(), alternatives)]
