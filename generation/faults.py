"""What ends one sequence of a batch with an error, and the test-only hook that injects such faults.

The engine (generation/engine.py) runs each sequence's own work (prompt encoding, prefill, token choice, text) so
that whatever it raises ends that sequence alone; `SequenceFault` is the fault the engine itself detects (non-finite
logits, an impossible token), its message is what the client reads.

GLM_TEST_FAULTS is FOR TESTS ONLY (never set it in production): comma-separated `kind:marker` pairs. A sequence
whose prompt text contains `marker` gets the fault:
    raise   when it has generated FAULT_AT_TOKEN tokens (mid-decode), its token choice raises (a bug in a strategy,
            sampling or the tokenizer)
    nan     when it has generated FAULT_AT_TOKEN tokens, its row of the step's logits and every key/value of its
            cache row become NaN (a numeric fault of the model)
    fatal   when it is admitted, the engine's apply raises outside any sequence's work (an engine-level failure:
            the server answers 503 and exits non-zero)
"""
import os
from typing import List, Optional, Tuple

import torch

ENV = "GLM_TEST_FAULTS"
KINDS = ("raise", "nan", "fatal")
FAULT_AT_TOKEN = 2


class SequenceFault(Exception):
    """One sequence cannot go on (its message says why, in one line); the others are not affected."""


class InjectedFault(RuntimeError):
    """Raised by the GLM_TEST_FAULTS hook."""


class FaultInjection:
    """The parsed GLM_TEST_FAULTS: which prompts get which fault."""

    def __init__(self, spec: str):
        self.rules: List[Tuple[str, str]] = []
        for item in filter(None, (part.strip() for part in spec.split(","))):
            kind, _, marker = item.partition(":")
            if kind not in KINDS or not marker:
                raise ValueError(f"{ENV}: {item!r} is not kind:marker with kind one of {', '.join(KINDS)}")
            self.rules.append((kind, marker))

    @classmethod
    def from_env(cls) -> Optional["FaultInjection"]:
        spec = os.environ.get(ENV, "")
        return cls(spec) if spec.strip() else None

    def _marked(self, text: str, kind: str) -> bool:
        return any(k == kind and m in text for k, m in self.rules)

    def _due(self, seq, kind: str) -> bool:
        return seq.completion_tokens == FAULT_AT_TOKEN and self._marked(seq.spec.text, kind)

    def on_admit(self, spec) -> None:
        """Before a newcomer's admission, outside its own work: the engine-level failure."""
        if self._marked(spec.text, "fatal"):
            raise InjectedFault(f"{ENV}: engine-level fault injected by sequence {spec.seq_id}")

    def on_step(self, feeding, logits: torch.Tensor, cache) -> None:
        """After a decode step, before its logits [n, V] are checked: NaN rows."""
        for seq in feeding:
            if self._due(seq, "nan"):
                logits[seq.slot].fill_(float("nan"))
                for t in cache.k + cache.v:
                    t[seq.slot].fill_(float("nan"))

    def on_take(self, seq) -> None:
        """At the start of one sequence's token choice."""
        if self._due(seq, "raise"):
            raise InjectedFault(f"{ENV}: fault injected into sequence {seq.spec.seq_id}")
