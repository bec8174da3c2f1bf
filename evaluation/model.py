"""`ModelForEvaluation`: the three questions tasks ask the model (BIG-bench-like API of the original).

- `cond_log_prob(batch)`: per sample, the summed log-probability of each choice;
- `generate_text(batch, strategy)`: per sample, the generated token ids (through the shared decoding loop);
- `calculate_loss(batch)`: per sample, the summed cross entropy over its scored tokens.

Log-probabilities and losses are computed in fp32 from this rank's vocabulary shard (`parallel_output=True`) with
model-parallel reductions, so the full 150528-wide logits are never gathered; at one rank this is exactly a
full-vocabulary log-softmax. (The original took the log-softmax of the fp16 logits and summed in fp16.)
"""
from typing import List, Sequence, Union

import torch

from generation.decoding import batch_filling_sequence
from model import mpu
from model.layout import DecodingLayout


class ModelForEvaluation:
    def __init__(self, model):
        self.model = model
        self.device = next(model.parameters()).device

    def _inputs(self, batch):
        return (batch["tokens"].to(self.device), batch["position_ids"].to(self.device),
                batch["attention_mask"].to(self.device))

    def _logits_shard(self, batch, logits_index=None) -> torch.Tensor:
        """This rank's vocabulary shard of the logits (only rows `logits_index` [b, k] when given)."""
        return self.model.logits(*self._inputs(batch), logits_index=logits_index, parallel_output=True)

    @torch.inference_mode()
    def cond_log_prob(self, batch, greedy: bool = False):
        """Per sample, per choice: Σ_j log p(choice_j | context, choice_<j) (rows and ids from the collator).
        greedy: also, per sample, per choice, whether every choice token is the most likely one at its row."""
        rows_per_sample = [sorted({int(r) for rows in rows_b for r in rows}) for rows_b in batch["choice_rows"]]
        width = max(len(rows) for rows in rows_per_sample)
        index = torch.tensor([rows + rows[:1] * (width - len(rows)) for rows in rows_per_sample], device=self.device)
        logits = self._logits_shard(batch, index)  # [b, width, V/mp]: only the scored rows
        keys, ids, owner = [], [], []  # flat (sample, row) keys, scored ids, and (sample, choice) of each
        for b, (rows_b, ids_b) in enumerate(zip(batch["choice_rows"], batch["choice_ids"])):
            slot = {row: k for k, row in enumerate(rows_per_sample[b])}
            for j, (rows, choice) in enumerate(zip(rows_b, ids_b)):
                keys.extend(b * width + slot[int(r)] for r in rows)
                ids.extend(choice)
                owner.extend([(b, j)] * len(choice))
        keys_t = torch.tensor(keys, dtype=torch.long, device=logits.device)
        unique, inverse = torch.unique(keys_t, return_inverse=True)
        selected = logits.reshape(-1, logits.shape[-1])[unique]
        ids_t = torch.tensor(ids, device=logits.device)
        token_logp = mpu.vocab_parallel_log_probs(selected, inverse, ids_t).tolist()
        out = [[0.0] * len(c) for c in batch["choice_ids"]]
        for (b, j), lp in zip(owner, token_logp):
            out[b][j] += lp
        if not greedy:
            return out
        best = [[True] * len(c) for c in batch["choice_ids"]]
        for (b, j), top in zip(owner, mpu.vocab_parallel_is_argmax(selected, inverse, ids_t).tolist()):
            best[b][j] = best[b][j] and top
        return out, best

    @torch.inference_mode()
    def calculate_loss(self, batch) -> List[float]:
        """Per sample, Σ cross entropy · loss_mask (vocab-parallel, fp32)."""
        logits = self._logits_shard(batch)
        losses = mpu.vocab_parallel_cross_entropy(logits, batch["targets"].to(logits.device))
        return (losses * batch["loss_mask"].to(logits.device)).sum(dim=-1).tolist()

    @torch.inference_mode()
    def generate_text(self, batch, strategy, return_all_beams=False) -> Union[List[List[int]], List[List[List[int]]]]:
        """Generated ids per sample (best beam first; all beams if `return_all_beams`), end token removed."""
        seqs = batch["tokens"].to(self.device)
        context_lengths = batch["context_length"].to(self.device)
        masks_fn = DecodingLayout(batch, self.device)
        output = batch_filling_sequence(self.model, seqs, context_lengths, strategy,
                                        get_masks_and_position_ids=masks_fn)[0]
        return parse_generated(output, seqs.shape[1], strategy.end_tokens, return_all_beams)


def parse_generated(output, context_width: int, end_tokens: Sequence[int], return_all_beams: bool):
    """Per sample: each beam cut at its first -1, a final end token dropped, the context columns removed."""
    if isinstance(output, torch.Tensor):
        output = output.tolist()
    results = []
    for beams in output:
        beams = beams.tolist() if isinstance(beams, torch.Tensor) else beams
        if beams and not isinstance(beams[0], (list, torch.Tensor)):
            beams = [beams]
        parsed = []
        for line in beams:
            line = line.tolist() if isinstance(line, torch.Tensor) else list(line)
            end = line.index(-1) if -1 in line else len(line)
            if end > context_width and line[end - 1] in end_tokens:
                end -= 1
            parsed.append(line[context_width:end])
        results.append(parsed if return_all_beams else parsed[0])
    return results
