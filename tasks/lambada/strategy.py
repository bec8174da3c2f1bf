"""Beam search for LAMBADA: the continuation may not begin with any banned prefix (punctuation)."""
import torch

from generation import BeamSearchStrategy

BANNED = -65504


class BeamSearchStrategyForLAMBADA(BeamSearchStrategy):
    def __init__(self, *args, banned_prefix=(), **kwargs):
        super().__init__(*args, **kwargs)
        self.banned_prefix = [list(p) for p in banned_prefix if len(p) > 0]

    def forward(self, logits, tokens, mems):
        """logits [B, beams, V], tokens [B, beams, T]: when `len(prefix) - 1` tokens have been generated, ban the
        prefix's last token for every beam that ends with the rest of the prefix (for all beams if it is 1 long)."""
        logits = logits.float().clone()
        for prefix in self.banned_prefix:
            if self.length_generated != len(prefix) - 1:
                continue
            if len(prefix) == 1:
                logits[..., prefix[0]] = BANNED
                continue
            head = torch.tensor(prefix[:-1], dtype=tokens.dtype, device=tokens.device)
            hit = (tokens[..., -len(head):] == head).all(dim=-1)  # [B, beams]
            column = logits[..., prefix[-1]]
            logits[..., prefix[-1]] = torch.where(hit, torch.full_like(column, BANNED), column)
        return super().forward(logits, tokens, mems)
