"""The batched decoding loop (the original's `batch_filling_sequence`, evaluation/model.py), over a KV cache.

`get_masks_and_position_ids(seqs)` describes the whole final layout, exactly as in the original: it returns the
tokens padded to their final length L, the attention mask over all L positions (bool, True = may NOT attend,
[B|1, 1, L, L]) and the position ids [B, L]. The first L - ctx positions after the context are generated, one per
step, at the same column for every row (a right-padded row's first token goes after its padding, as in the original).

With the KV cache (default), the whole context is run once (prefill) and then one token per step: the model sees
exactly what the original's mems loop fed it, without re-concatenating the past. Beam search reorders the cache
rows with the strategy's `beam_index` (index_select over the batch x beam rows). `use_cache=False` recomputes the
whole sequence at every step (the reference the cache path is tested against).

The first step takes the logits at row `context_lengths - 1` of each sequence (its last real token), later steps
the newest row, as in the original. Tokens of finished rows (-1) are fed to the model as id 0; their results are
ignored.
"""
from typing import Callable, Optional, Sequence

import torch

from model import KVCache


def _rows(tensor: torch.Tensor, row_source: torch.Tensor) -> torch.Tensor:
    """The rows of a per-sequence tensor that the current rows come from (a [1, ...] tensor broadcasts)."""
    return tensor if tensor.shape[0] == 1 else tensor.index_select(0, row_source.to(tensor.device))


class _Decoder:
    """The model side of the loop: the prefill of the contexts, then one token per row and step, with the rows'
    layout (positions, mask) following the beams they continue. With use_cache=False every step recomputes the
    whole sequence (the reference the KV-cache path is tested against)."""

    def __init__(self, model, position_ids: torch.Tensor, attention_mask: torch.Tensor, use_cache: bool):
        self.model, self.position_ids, self.attention_mask = model, position_ids, attention_mask
        self.use_cache = use_cache
        self.cache = None
        self.row_source = None  # which input sequence each current row continues

    def prefill(self, seqs: torch.Tensor, context_lengths: torch.Tensor) -> torch.Tensor:
        """Logits [rows, 1, V] at each sequence's last real token (row context_lengths - 1)."""
        rows, ctx = seqs.shape
        self.row_source = torch.arange(rows, device=seqs.device)
        first = (context_lengths - 1).to(seqs.device)
        positions, mask = self.position_ids[:, :ctx], self.attention_mask[:, :, :ctx, :ctx]
        if self.use_cache:
            self.cache = KVCache(self.model, rows, self.position_ids.shape[-1])
            return self.model.forward_with_cache(seqs, positions, mask, self.cache, logits_index=first)
        logits = self.model(seqs, positions, mask)[0]
        return logits[torch.arange(rows, device=logits.device), first.to(logits.device)].unsqueeze(1)

    def reorder(self, flat: torch.Tensor) -> None:
        """The current rows continue rows `flat` of the previous step (beam search's selection)."""
        self.row_source = self.row_source.index_select(0, flat)
        if self.cache is not None:
            self.cache.reorder(flat)

    def step(self, tokens: torch.Tensor, column: int) -> torch.Tensor:
        """Logits [rows, 1, V] after the newest token of each row (at `column`); tokens [B, beams, T]."""
        rows = self.row_source
        if self.cache is not None:
            new = tokens[..., -1].reshape(-1, 1).clamp_min(0)
            return self.model.forward_with_cache(new, _rows(self.position_ids, rows)[:, column:column + 1],
                                                 _rows(self.attention_mask[:, :, column:column + 1, :column + 1], rows),
                                                 self.cache)
        flat_tokens = tokens.reshape(-1, tokens.shape[-1]).clamp_min(0)
        return self.model(flat_tokens, _rows(self.position_ids, rows)[:, :column + 1],
                          _rows(self.attention_mask[:, :, :column + 1, :column + 1], rows))[0][:, -1:]


def _selected_rows(strategy, batch: int, beams: int, new_beams: int, device) -> Optional[torch.Tensor]:
    """Flat indices of the previous rows that the new rows continue, or None when they stay as they were."""
    beam_index = getattr(strategy, "beam_index", None)
    if beam_index is None:
        return None
    flat = (torch.arange(batch, device=device)[:, None] * beams + beam_index.to(device)).view(-1)
    if new_beams == beams and torch.equal(flat, torch.arange(len(flat), device=device)):
        return None
    return flat


def _start(strategy, batch: int, context_lengths, num_beams_in: int, init_scores, max_gen_lengths,
           penalize_padding: bool) -> None:
    if hasattr(strategy, "prepare"):  # strategies written for the original have no prepare/mark_done
        strategy.prepare(batch, context_lengths=None if penalize_padding else context_lengths.view(batch, -1),
                         init_scores=init_scores)
    elif num_beams_in != 1 or max_gen_lengths is not None:
        raise ValueError("num_beams_in and max_gen_lengths need a strategy with prepare() and mark_done()")


def batch_filling_sequence(model, seqs: torch.Tensor, context_lengths, strategy,
                           get_masks_and_position_ids: Callable, *, num_beams_in: int = 1,
                           init_scores: Optional[torch.Tensor] = None,
                           max_gen_lengths: Optional[Sequence[int]] = None, penalize_padding: bool = False,
                           use_cache: bool = True, callback: Optional[Callable] = None):
    """Generate with `strategy` after each of the B sequences `seqs` [B, ctx]; returns `strategy.finalize(...)`.

    context_lengths [B]: real length of each sequence (the rest of its row is right padding).
    num_beams_in: the rows are B // num_beams_in batch elements of num_beams_in beams each (a beam search that
        continues from earlier beams, with their cumulative `init_scores` [B // num_beams_in, num_beams_in]).
    max_gen_lengths: per batch element, how many tokens it may generate (default: all L - ctx); an element that
        reaches its budget is stopped with `strategy.mark_done`, exactly as if the loop had ended for it.
    penalize_padding: let the beam length penalty count the context padding (the original's evaluation did);
        by default it counts each beam's real length, so a padded batch ranks beams as unbatched prompts.
    callback(tokens [B, beams, T], step): called after every step (streaming).
    """
    device = seqs.device
    num_rows, ctx = seqs.shape
    batch = num_rows // num_beams_in
    context_lengths = torch.as_tensor(context_lengths, dtype=torch.long).view(-1)
    _, attention_mask, position_ids = get_masks_and_position_ids(seqs)
    max_gen = position_ids.shape[-1] - ctx
    budgets = [max_gen] * batch if max_gen_lengths is None else [min(int(g), max_gen) for g in max_gen_lengths]
    _start(strategy, batch, context_lengths, num_beams_in, init_scores, max_gen_lengths, penalize_padding)
    tokens = seqs.view(batch, num_beams_in, ctx)
    for b, budget in enumerate(budgets):
        if budget <= 0:  # no room: the element ends with its context as it is
            strategy.mark_done(b, tokens)
    if max_gen <= 0 or strategy.is_done:
        return strategy.finalize(tokens, None)

    with torch.inference_mode():
        decoder = _Decoder(model, position_ids, attention_mask, use_cache)
        logits = decoder.prefill(seqs, context_lengths)
        beams, step = num_beams_in, 0
        while True:
            tokens, _ = strategy.forward(logits.view(batch, beams, -1), tokens, None)
            step += 1
            flat = _selected_rows(strategy, batch, beams, tokens.shape[1], device)
            if flat is not None:
                decoder.reorder(flat)
            beams = tokens.shape[1]
            for b, budget in enumerate(budgets):
                if step == budget < max_gen:
                    strategy.mark_done(b, tokens)
            if callback is not None:
                callback(tokens, step)
            if strategy.is_done or step >= max_gen:
                break
            logits = decoder.step(tokens, ctx + step - 1)
        return strategy.finalize(tokens, None)
