"""The token / position / attention layout of a GLM sample, defined once for generation and evaluation.

Every model input is a `Layout`: its tokens and position ids, a context block of `prefix` tokens (bidirectional,
or causal when the task is unidirectional) and causal `segments` after it that see the context and themselves only
(a multiple-choice answer, a generation's `sop`, a language-model window's text).

Conventions (model-math.md, original-repo.md §14 and Appendix A):
- the model's attention mask is bool with True = may NOT attend (SAT's); `collate_layouts` is the only place that
  turns layouts into such masks, and `DecodingLayout` the only place that extends them over generated tokens;
- position rule: with [MASK]/[sMASK] the `sop` and every generated (or scored) token take the mask's position;
  with [gMASK] positions just continue;
- padding (right, id `PAD_ID`, position 0) is seen by no row.
"""
from dataclasses import dataclass, field
from typing import Dict, List, Sequence, Tuple

import numpy as np
import torch

from model.tokenizer import PAD_ID


@dataclass
class Layout:
    tokens: np.ndarray  # int64 [length]
    position_ids: np.ndarray  # int64 [length]
    prefix: int  # rows and columns [0, prefix) are the context block
    prefix_causal: bool = False  # the context block is causal (unidirectional) instead of bidirectional
    segments: List[Tuple[int, int]] = field(default_factory=list)  # causal blocks [start, end) after the context

    def __len__(self) -> int:
        return len(self.tokens)


def _allowed(layout: Layout, out: torch.Tensor) -> None:
    """Write the layout's may-attend pattern into the zeroed bool `out` [L, L] (inverted by the caller)."""
    p = layout.prefix
    out[:p, :p] = torch.ones(p, p, dtype=torch.bool).tril_() if layout.prefix_causal else True
    for start, end in layout.segments:
        n = end - start
        out[start:end, :p] = True
        out[start:end, start:end] = torch.ones(n, n, dtype=torch.bool).tril_()


def collate_layouts(layouts: Sequence[Layout]) -> Dict[str, torch.Tensor]:
    """tokens / position_ids [B, L] (right-padded) and attention_mask [B, 1, L, L] (True = may NOT attend)."""
    length = max(len(x) for x in layouts)
    b = len(layouts)
    tokens = torch.full((b, length), PAD_ID, dtype=torch.long)
    positions = torch.zeros((b, length), dtype=torch.long)
    allowed = torch.zeros((b, length, length), dtype=torch.bool)
    for i, x in enumerate(layouts):
        tokens[i, :len(x)] = torch.from_numpy(x.tokens)
        positions[i, :len(x)] = torch.from_numpy(x.position_ids)
        _allowed(x, allowed[i])
    return {"tokens": tokens, "position_ids": positions, "attention_mask": (~allowed).unsqueeze(1)}


# ---- Samples ------------------------------------------------------------------------------------------------------

def multiple_choice_sample(text: List[int], choices: List[List[int]], is_single_token: bool, mask_id: int,
                           sop_id: int, use_task_mask=False, unified_multitask_encoding=False,
                           unidirectional=False) -> Tuple[Layout, List[np.ndarray], List[List[int]]]:
    """Context (+ mask), then one causal `[sop] + choice[:-1]` block per choice that sees the whole context.

    Returns the layout, and per choice the rows whose next-token log-probs are summed and the ids scored there.
    Positions: the mask's position for every choice token with [MASK] (a count from it with multitask encoding),
    a count from the end of the context (`division`) with [gMASK]. Unidirectional tasks (which the original's
    multiple choice ignored; this follows its later code) use the causal prefix form `[gMASK, sop] + text[:-1]` and
    start each choice block with the last text token.
    With single-token choices only one block (`[sop]`) is built and every choice is read at its row.
    """
    blank_filling = mask_id in text
    if blank_filling:
        tokens = list(text)
        mask_position = text.index(mask_id)
    elif unidirectional:
        tokens = [mask_id, sop_id] + list(text[:-1])
        mask_position = len(tokens)
    else:
        mask_position = len(text)
        tokens = list(text) + [mask_id]
    positions = list(range(len(tokens)))
    division = len(tokens)
    first = text[-1] if unidirectional and not blank_filling else sop_id
    segments, rows = [], []
    for choice in choices[:1] if is_single_token else choices:
        start = len(tokens)
        if use_task_mask:
            positions += list(range(division, division + len(choice)))
        elif blank_filling or not unified_multitask_encoding:
            positions += [mask_position] * len(choice)
        else:
            positions += list(range(mask_position, mask_position + len(choice)))
        tokens += [first] + list(choice[:-1])
        segments.append((start, len(tokens)))
        rows.append(np.arange(start, start + len(choice)))
    layout = Layout(np.asarray(tokens, dtype=np.int64), np.asarray(positions, dtype=np.int64), division,
                    prefix_causal=unidirectional and not blank_filling, segments=segments)
    if is_single_token:
        return layout, [rows[0]] * len(choices), [list(c) for c in choices]
    return layout, rows, [list(c) for c in choices]


def generation_sample(text: List[int], max_gen_length: int, mask_id: int, sop_id: int, use_task_mask=False,
                      unidirectional=False) -> Dict[str, object]:
    """`text + [sop]` when the text holds the mask to fill (blank-filling tasks), else `text + [mask, sop]` (or the
    causal prefix form `[mask, sop] + text`). use_task_mask: the mask is a [gMASK]; see `round_sample`."""
    if mask_id in text:
        mask_position = text.index(mask_id)
        tokens = list(text) + [sop_id]
    else:
        mask_position = len(text)
        tokens = [mask_id, sop_id] + list(text) if unidirectional else list(text) + [mask_id, sop_id]
    return round_sample(tokens, mask_position, max_gen_length, use_task_mask, unidirectional)


def round_sample(tokens: Sequence[int], mask_position: int, max_gen_length: int, continue_positions: bool,
                 unidirectional=False) -> Dict[str, object]:
    """One generation input whose last token starts the generated span (`sop`, or the last text token of the
    unidirectional prefix form): the layout and `target_position_ids` [max_gen_length] of the generated tokens.

    continue_positions ([gMASK]): positions count on; else ([MASK]/[sMASK]) the last input token and every
    generated token take `mask_position`. The context (all but the last token) is bidirectional, the last token
    causal after it; unidirectional makes the whole input causal."""
    ctx = len(tokens)
    positions = np.arange(ctx, dtype=np.int64)
    targets = np.arange(ctx, ctx + max(0, max_gen_length), dtype=np.int64)
    if not continue_positions:
        positions[ctx - 1:] = mask_position
        targets[:] = mask_position
    ids = np.asarray(list(tokens), dtype=np.int64)
    if unidirectional:
        layout = Layout(ids, positions, ctx, prefix_causal=True)
    else:
        layout = Layout(ids, positions, ctx - 1, segments=[(ctx - 1, ctx)])
    return {"layout": layout, "target_position_ids": targets}


def language_model_window(prompt: List[int], text: List[int], mask_id: int, sop_id: int,
                          next_token: bool = False) -> Tuple[Layout, np.ndarray]:
    """`prompt + [gMASK, sop] + text[:-1]`: the prompt (with the mask) bidirectional, the text causal after it.
    Returns the layout and the targets (`prompt + [mask] + text`: the text's next tokens). next_token: the input
    holds the whole text, so its last row predicts the token after it (the targets stay the same)."""
    input_ids = list(prompt) + [mask_id, sop_id] + list(text if next_token else text[:-1])
    p = len(prompt) + 1
    layout = Layout(np.asarray(input_ids, dtype=np.int64), np.arange(len(input_ids), dtype=np.int64), p,
                    segments=[(p, len(input_ids))])
    return layout, np.asarray(list(prompt) + [mask_id] + list(text), dtype=np.int64)


# ---- Decoding -----------------------------------------------------------------------------------------------------

def generation_batch(samples: Sequence[Dict[str, object]]) -> Dict[str, torch.Tensor]:
    """Collated generation samples: the context batch plus `context_length` [B] and `target_position_ids` [B, G]."""
    layouts = [s["layout"] for s in samples]
    batch = collate_layouts(layouts)
    batch["layouts"] = layouts
    batch["context_length"] = torch.tensor([len(x) for x in layouts], dtype=torch.long)
    batch["target_position_ids"] = torch.from_numpy(np.stack([s["target_position_ids"] for s in samples]))
    return batch


class DecodingLayout:
    """`get_masks_and_position_ids(seqs)` of the decoding loop for a right-padded generation batch.

    Returns the tokens padded to their final length with -1, the mask [B, 1, C + G, C + G] and positions [B, C + G].
    Generated token t of sample i sits at column C + t (after the padding, at the same column for every row); it
    sees what the sample's last real context token (sop, or the last text token in the unidirectional prefix form)
    sees, plus the earlier generated tokens. Its position id is the sample's own target position, so right padding
    changes nothing but the layout.

    The layout lives on `device`: the decoding device (generate.py, the evaluation), or the CPU for a caller that
    reads its rows on the host (the server's engine). It is computed there whatever device `seqs` is on, and
    returned on the device of `seqs`.
    """

    def __init__(self, batch: Dict, device):
        self.device = torch.device(device)
        self.context_mask = batch["attention_mask"].to(self.device)  # [B, 1, C, C], True = blocked
        self.positions = torch.cat([batch["position_ids"], batch["target_position_ids"]], dim=-1).to(self.device)
        self.context_lengths = batch["context_length"].to(self.device)
        self.max_gen_length = batch["target_position_ids"].shape[-1]

    def __call__(self, seqs: torch.Tensor):
        b, c = seqs.shape
        g, device = self.max_gen_length, self.device
        tokens = torch.nn.functional.pad(seqs, (0, g), value=-1)
        mask = torch.ones((b, 1, c + g, c + g), dtype=torch.bool, device=device)
        mask[:, :, :c, :c] = self.context_mask
        last_row = self.context_mask[torch.arange(b, device=device), 0, self.context_lengths - 1]  # [B, C]
        mask[:, 0, c:, :c] = last_row.unsqueeze(1)
        mask[:, :, c:, c:] = ~torch.ones((g, g), dtype=torch.bool, device=device).tril()
        return tokens, mask.to(seqs.device), self.positions.to(seqs.device)
