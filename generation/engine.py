"""Continuous batching: many blank-filling sequences decoded together, each joining and leaving between steps.

One batch `KVCache` of `slots` rows holds every running sequence. Its column counter T is shared: a decode step
writes one token per row at column T. A sequence occupies its row's columns [start, T): its context is prefilled
alone (batch 1, its own round layout from `model.layout.round_sample` / `DecodingLayout`, exactly as generate.py's
prefill) and its keys/values are copied into columns [T - c, T) of its row. Keys are stored after RoPE, so the
column a key sits in does not matter, only the mask: each step gives every row its own position id (from its
DecodingLayout) and a mask row that lets it see its own columns only, as its layout says.

When the wasted columns before the oldest live sequence outgrow the live span, or T reaches the cache's end, all
rows move left together (`_rebase`); a context longer than T moves them right. A multi-mask prompt fills its
blanks left to right, each round re-entering as a new prefill (as `fill_blanks` re-encodes round by round).
Token choice is the generation layer's `BaseStrategy` (one per sequence: its temperature, top-k, top-p, seed),
so greedy output is generate.py's. Beam search requests run `fill_blanks` whole, outside the batch (`run_beam`).

Echo requests read the prompt as the evaluation's language model does (`[gMASK] sop text`, generation/scoring.py)
and continue that reading: those with max_tokens 0 or 1 need no decode step and are scored together, many per
forward (`score`, the token of max_tokens 1 taken from the same forward); longer ones prefill their window through
the cache (`_echo_prefill`) and decode in the batch like any other row.

Every rank of a tensor-parallel group runs the same `Engine.apply(work)` calls in the same order; sampled ids are
broadcast from the source rank inside the strategy, so all ranks hold the same state and the same events.

Faults are contained per sequence: whatever one sequence's own work raises (encoding, prefill, its strategy, its
text), non-finite logits in its row, or a token generation never allows end that sequence alone with an error
event; its slot is freed and its cache row zeroed (masked columns still meet the values), the others go on. The
checks read the gathered logits and broadcast ids, so every TP rank decides alike, and the ranks agree on the
failed slots after each apply. What `apply` raises outside one sequence's work is an engine-level failure.
"""
import math
import os
import traceback
from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Tuple

import torch

from generation.blank_filling import (MASK_PRECEDENCE, _Output, _splice, encode_prompt, encode_prompt_ids,
                                      fill_blanks, generation_invalid_slices, generation_layout, round_budget)
from generation.faults import FaultInjection, SequenceFault
from generation.scoring import TokenLogprob, echo_layout, score_texts, window_logprobs
from generation.strategies import BaseStrategy, BeamSearchStrategy, _invalid_mask
from model import KVCache, mpu
from model.layout import collate_layouts

_UNLIMITED = 1 << 30  # out_seq_length when max_tokens is the per-blank cap


@dataclass
class SequenceSpec:
    """One sequence to generate, as every rank needs it (picklable: rank 0 broadcasts it)."""
    seq_id: int
    text: str
    max_tokens: int  # per blank (0: score only)
    temperature: float = 1.0  # 0: greedy
    top_k: int = 0
    top_p: float = 0.0
    seed: Optional[int] = None
    stop: Tuple[str, ...] = ()
    logprobs: Optional[int] = None  # alternatives per token; None: no log-probs
    echo: bool = False  # score the prompt's own tokens first (generation/scoring.py), and continue that reading
    ids: Optional[Tuple[int, ...]] = None  # the prompt as token ids (always set with echo: the ids scored)
    num_beams: int = 1
    length_penalty: float = 1.0
    no_repeat_ngram_size: int = 0


def is_scoring(spec: SequenceSpec) -> bool:
    """An echo request that needs no decode step (max_tokens 0 or 1): scored in a batch by `Engine.score`."""
    return spec.echo and spec.max_tokens <= 1


@dataclass
class Event:
    """What one sequence produced in one `apply`: new text (a delta), its tokens' log-probs, and at the end the
    finish reason and the final result."""
    seq_id: int
    text: str = ""
    logprobs: List[TokenLogprob] = field(default_factory=list)
    finish_reason: Optional[str] = None  # "stop", "length", "cancelled" or "error"
    result: Optional[dict] = None  # text, blanks, prompt_tokens, completion_tokens
    error: Optional[str] = None  # finish_reason "error": what went wrong, one line


class _Rows(KVCache):
    """The first n rows of a batch cache (views: what the model writes lands in the batch cache)."""

    def __init__(self, cache: KVCache, n: int):  # no super().__init__: nothing is allocated
        self.k, self.v = [t[:n] for t in cache.k], [t[:n] for t in cache.v]
        self.length, self.max_length, self._pending = cache.length, cache.max_length, 0


@dataclass
class _Round:
    """One blank being generated: its layout (positions, mask over context + generated) and its tokens."""
    ctx: int
    positions: torch.Tensor  # [ctx + budget]
    mask: torch.Tensor  # [ctx + budget, ctx + budget], True = blocked
    budget: int
    mask_position: int
    start: int = 0  # cache column of the context's first token
    tokens: List[int] = field(default_factory=list)  # sampled, end token included


class _Sequence:
    def __init__(self, spec: SequenceSpec, tokenizer, end_tokens, invalid, slot: Optional[int]):
        self.spec, self.slot = spec, slot  # slot None: a scoring request, never in the batch
        if spec.ids is not None:
            self.prompt = encode_prompt_ids(spec.ids, tokenizer)
            self.has_mask = any(tokenizer.get_command(m) in spec.ids for m in MASK_PRECEDENCE)
        else:
            self.prompt = encode_prompt(spec.text, tokenizer)
            self.has_mask = any(m in spec.text for m in MASK_PRECEDENCE)
        self.output = _Output(seq=list(self.prompt.ids))
        self.strategy = _sampling_strategy(spec, end_tokens, invalid)
        self.round: Optional[_Round] = None
        self.needs_prefill = True
        self.shown = ""  # text streamed so far
        self.completion_tokens = 0
        self.finish_reason = "length"


def _describe(error: Exception) -> str:
    """One line for the client: a SequenceFault's message; for anything else its type, message and where it rose."""
    if isinstance(error, SequenceFault):
        return str(error)
    frames = traceback.extract_tb(error.__traceback__)
    where = f" ({os.path.basename(frames[-1].filename)}:{frames[-1].lineno})" if frames else ""
    message = (str(error).strip().splitlines() or [""])[0]
    return f"internal error: {type(error).__name__}: {message}{where}"


def _finite_logprobs(logprobs: List[TokenLogprob]) -> List[TokenLogprob]:
    """The scored tokens' log-probs, checked: a non-finite one (a model fault) fails the request, never reaches JSON."""
    if any(e.logprob is not None and not math.isfinite(e.logprob) for e in logprobs):
        raise SequenceFault("the model produced non-finite log-probs (NaN or Inf) for this prompt")
    return logprobs


def _sampling_strategy(spec: SequenceSpec, end_tokens, invalid) -> BaseStrategy:
    generator = None if spec.seed is None else torch.Generator().manual_seed(spec.seed)
    greedy = spec.temperature == 0
    return BaseStrategy(batch_size=1, temperature=1.0 if greedy else spec.temperature,
                        top_k=1 if greedy else spec.top_k, top_p=0.0 if greedy else spec.top_p,
                        end_tokens=end_tokens, invalid_slices=invalid, generator=generator)


class Engine:
    """Runs `apply(work)` steps: cancel, beam jobs, one scoring batch, at most one prefill, then one decode step for
    every live row."""

    def __init__(self, model, tokenizer, slots: int = 8, max_sequence_length: Optional[int] = None):
        self.model, self.tokenizer = model, tokenizer
        self.max_sequence_length = max_sequence_length or model.config.max_sequence_length
        self.end_tokens = [tokenizer.get_command("eop"), tokenizer.get_command("eos")]
        self.invalid = generation_invalid_slices(tokenizer, self.end_tokens)
        self.cache = KVCache(model, slots, 2 * self.max_sequence_length)
        for t in self.cache.k + self.cache.v:  # masked columns still meet the values (weight 0 x garbage NaN = NaN)
            t.zero_()
        self.slots: List[Optional[_Sequence]] = [None] * slots
        self.device = next(model.parameters()).device
        self.decode_tokens = 0  # generated tokens, all sequences (metrics)
        self._allowed: Optional[List[bool]] = None  # per vocabulary id: may generation pick it (built on first use)
        self._failed_slots: set = set()  # slots whose sequence failed in this apply (ranks agree on them)
        self.faults = FaultInjection.from_env()  # GLM_TEST_FAULTS: tests only (generation/faults.py)

    # --- what the scheduler may ask ----------------------------------------------------------------------------
    def free_slots(self) -> int:
        return self.slots.count(None)

    def live(self) -> int:
        return len(self.slots) - self.free_slots()

    def can_admit(self) -> bool:
        """A newcomer can be prefilled in the next apply: a free slot and no blank waiting to re-enter."""
        return self.free_slots() > 0 and not any(s is not None and s.needs_prefill for s in self.slots)

    # --- one iteration -----------------------------------------------------------------------------------------
    def apply(self, work: dict) -> List[Event]:
        """work: {"cancel": [seq ids], "beam": [specs], "score": [echo specs with max_tokens <= 1], "admit": [spec]
        (at most one)}; the same on every rank. A sequence's own failure ends it with an error event; an exception
        from apply is an engine-level failure."""
        events: List[Event] = []
        self._failed_slots = set()
        for seq_id in work.get("cancel", ()):
            events += self._cancel(seq_id)
        for spec in work.get("beam", ()):
            self._isolated(events, spec.seq_id, None, lambda s: events.append(self.run_beam(s)), spec)
        with torch.inference_mode():
            if work.get("score"):
                events += self.score(work["score"])
            prefilled = self._prefill_waiting(events)
            if work.get("admit") and not prefilled:  # the scheduler sends one only when can_admit()
                spec = work["admit"][0]
                if self.faults is not None:
                    self.faults.on_admit(spec)
                self._isolated(events, spec.seq_id, self.slots.index(None), self._admit, spec, events)
            if self._feeding():
                events += self._step()
        self._agree_on_failures(events)
        return events

    def cancel_all(self) -> List[Event]:
        return [e for s in list(self.slots) if s is not None for e in self._cancel(s.spec.seq_id)]

    # --- fault containment ------------------------------------------------------------------------------------
    def _isolated(self, events: List[Event], seq_id: int, slot: Optional[int], work, *args) -> None:
        """work(*args) is one sequence's own work: whatever it raises ends that sequence alone (an error event, its
        slot and cache row freed)."""
        try:
            work(*args)
        except Exception as e:  # noqa: BLE001 - any fault of one sequence is contained to it
            events.append(self._fail(seq_id, e, slot))

    def _fail(self, seq_id: int, error: Exception, slot: Optional[int] = None) -> Event:
        for i, s in enumerate(self.slots):
            if s is not None and s.spec.seq_id == seq_id:
                slot = i
                self.slots[i] = None
        if slot is not None:
            self._failed_slots.add(slot)
            self._clear_row(slot)
        if self.live() == 0:
            self.cache.length = 0
        return Event(seq_id, finish_reason="error", error=_describe(error))

    def _clear_row(self, slot: int) -> None:
        """Zero a failed sequence's cache row: its next occupant's masked columns still meet these values."""
        for t in self.cache.k + self.cache.v:
            t[slot].zero_()

    def _agree_on_failures(self, events: List[Event]) -> None:
        """Under tensor parallelism a sequence that failed on any rank fails on every rank (one small all-reduce)."""
        if mpu.get_model_parallel_world_size() == 1:
            return
        flags = torch.zeros(len(self.slots), dtype=torch.int32, device=self.device)
        for slot in self._failed_slots:
            flags[slot] = 1
        mpu.all_reduce_model_parallel(flags, torch.distributed.ReduceOp.MAX)
        for slot in flags.nonzero().view(-1).tolist():
            seq = self.slots[slot]
            if slot not in self._failed_slots and seq is not None:
                events.append(self._fail(seq.spec.seq_id, SequenceFault("the sequence failed on another "
                                                                        "tensor-parallel rank"), slot))

    def _check_logits(self, logits: torch.Tensor) -> List[bool]:
        """Per row of logits [n, V]: all finite (NaN or +Inf propagate into the row's max; -Inf is probability 0)."""
        return torch.isfinite(logits.amax(dim=-1)).tolist()

    def _check_token(self, seq: _Sequence, token: int, vocab: int) -> None:
        if self._allowed is None:
            invalid = _invalid_mask(self.invalid, vocab, "cpu")
            self._allowed = [True] * vocab if invalid is None else (~invalid).tolist()
        if not 0 <= token < len(self._allowed) or not self._allowed[token]:
            raise SequenceFault(f"token choice gave id {token}, which generation never picks: the probabilities "
                                f"were not finite (temperature {seq.spec.temperature:g})")

    # --- admission and prefill ---------------------------------------------------------------------------------
    def _admit(self, spec: SequenceSpec, events: List[Event]) -> None:
        slot = self.slots.index(None)
        seq = _Sequence(spec, self.tokenizer, self.end_tokens, self.invalid, slot)
        self.slots[slot] = seq
        if spec.echo:
            self._echo_prefill(seq, events)
        else:
            self._prefill(seq, events)

    # --- echo: the prompt scored as a language-model window, the completion continuing that reading ------------
    def score(self, specs: Sequence[SequenceSpec]) -> List[Event]:
        """Echo requests that need no decode step (max_tokens 0 or 1), all in one forward: their prompts' log-probs
        and, with max_tokens 1, the token chosen from the same forward's last row. The forward is the work of every
        request in it (its failure fails each); what follows is each request's own."""
        try:
            results = score_texts(self.model, self.tokenizer, [s.ids for s in specs],
                                  [s.logprobs or 0 for s in specs], [s.max_tokens > 0 for s in specs])
        except Exception as e:  # noqa: BLE001 - contained to the requests of this forward
            return [self._fail(spec.seq_id, e) for spec in specs]
        events: List[Event] = []
        for spec, (logprobs, next_logits) in zip(specs, results):
            self._isolated(events, spec.seq_id, None, self._scored, spec, logprobs, next_logits, events)
        return events

    def _scored(self, spec: SequenceSpec, logprobs: List[TokenLogprob], next_logits: Optional[torch.Tensor],
                events: List[Event]) -> None:
        seq = _Sequence(spec, self.tokenizer, self.end_tokens, self.invalid, None)
        events.append(Event(spec.seq_id, logprobs=_finite_logprobs(logprobs)))  # the server sends the prompt itself
        if next_logits is None:
            events.append(self._finish(seq, "length"))
            return
        seq.round = self._echo_round(seq, 1)
        seq.needs_prefill = False
        seq.strategy.prepare(1)
        self._take(seq, next_logits, events, self._check_logits(next_logits.view(1, -1))[0])

    def _echo_round(self, seq: _Sequence, budget: int, start: int = 0) -> _Round:
        """The round that continues an echo window: every token causal after [gMASK], positions counting on."""
        ctx = len(echo_layout(seq.spec.ids, self.tokenizer, next_token=True))
        n = ctx + budget
        blocked = ~torch.ones((n, n), dtype=torch.bool).tril()
        return _Round(ctx, torch.arange(n), blocked, budget, seq.output.seq.index(seq.prompt.mask_id), start=start)

    def _echo_prefill(self, seq: _Sequence, events: List[Event]) -> None:
        """An echo request with max_tokens > 1: score its window through the KV cache, take the first token from
        the window's last row, and go on decoding in the batch."""
        layout = echo_layout(seq.spec.ids, self.tokenizer, next_token=True)
        batch = collate_layouts([layout])
        c = len(layout)
        small = KVCache(self.model, 1, c)
        shard = self.model.forward_with_cache(batch["tokens"].to(self.device), batch["position_ids"].to(self.device),
                                              batch["attention_mask"].to(self.device), small, parallel_output=True)
        n = c - 1  # rows 1..c-2 score the text, row c-1 predicts the token after it
        logprobs = window_logprobs(self.tokenizer, seq.spec.ids, shard[0, 1:n], seq.spec.logprobs or 0)
        events.append(Event(seq.spec.seq_id, logprobs=_finite_logprobs(logprobs)))
        seq.needs_prefill = False
        seq.round = self._echo_round(seq, seq.spec.max_tokens, start=self._place(seq, small, c))
        seq.strategy.prepare(1)
        logits = mpu.gather_from_model_parallel_region(shard[0, n])
        self._take(seq, logits, events, self._check_logits(logits.view(1, -1))[0])

    def _prefill_waiting(self, events: List[Event]) -> bool:
        """Re-enter the first sequence waiting for its next blank's prefill; whether one was run."""
        for slot, seq in enumerate(self.slots):
            if seq is not None and seq.needs_prefill:
                self._isolated(events, seq.spec.seq_id, slot, self._prefill, seq, events)
                return True
        return False

    def _prefill(self, seq: _Sequence, events: List[Event]) -> None:
        """Start the sequence's next blank: prefill its round alone, copy its keys/values into its row, and sample
        the blank's first token from the prefill's logits."""
        row = seq.output.seq + [self.tokenizer.get_command("sop")]
        mask_position = seq.output.seq.index(seq.prompt.mask_id)
        budget = round_budget(len(row), _UNLIMITED, seq.spec.max_tokens, self.max_sequence_length)
        seq.needs_prefill, seq.round = False, None
        if budget <= 0:  # no room left: the blank stays empty, as in fill_blanks
            seq.round = _Round(len(row), torch.empty(0), torch.empty(0, 0), 0, mask_position)
            self._end_round(seq, events)
            return
        seqs, _, layout = generation_layout([row], [mask_position], [seq.prompt.use_gmask], budget)
        _, mask, positions = layout(seqs)  # kept on the CPU: each step reads one row of them
        c = seqs.shape[1]
        small = KVCache(self.model, 1, c)
        logits = self.model.forward_with_cache(seqs.to(self.device), positions[:, :c].to(self.device),
                                               mask[:, :, :c, :c].to(self.device), small,
                                               logits_index=torch.tensor([c - 1], device=self.device))
        seq.round = _Round(c, positions[0], mask[0, 0], budget, mask_position, start=self._place(seq, small, c))
        seq.strategy.prepare(1)
        self._take(seq, logits[0, 0], events, self._check_logits(logits[0])[0])

    def _place(self, seq: _Sequence, small: KVCache, c: int) -> int:
        """Copy the prefilled keys/values into the sequence's row, ending at the shared column; returns the start."""
        if self.cache.length < c:
            self._rebase(max(c, self._live_span()))
        t = self.cache.length
        for layer in range(len(self.cache.k)):
            self.cache.k[layer][seq.slot, :, t - c:t] = small.k[layer][0, :, :c]
            self.cache.v[layer][seq.slot, :, t - c:t] = small.v[layer][0, :, :c]
        return t - c

    # --- the shared columns ------------------------------------------------------------------------------------
    def _feeding(self) -> List[_Sequence]:
        """The sequences with a token to feed at the next step (their round's columns are in the cache)."""
        return [s for s in self.slots if s is not None and s.round is not None]

    def _live_span(self) -> int:
        return max([self.cache.length - s.round.start for s in self._feeding()], default=0)

    def _rebase(self, new_length: int) -> None:
        """Move every row's live columns so that the shared counter becomes `new_length`."""
        old, span = self.cache.length, self._live_span()
        if span:
            for tensors in (self.cache.k, self.cache.v):
                for t in tensors:
                    t[:, :, new_length - span:new_length] = t[:, :, old - span:old].clone()
        for s in self._feeding():
            s.round.start += new_length - old
        self.cache.length = new_length

    def _make_room(self) -> None:
        span = self._live_span()
        wasted = self.cache.length - span
        if self.cache.length + 1 > self.cache.max_length or wasted > max(64, span):
            self._rebase(span)

    # --- one decode step ---------------------------------------------------------------------------------------
    def _step(self) -> List[Event]:
        self._make_room()
        feeding = self._feeding()
        n = max(s.slot for s in feeding) + 1
        t = self.cache.length
        tokens = torch.zeros((n, 1), dtype=torch.long)
        positions = torch.zeros((n, 1), dtype=torch.long)
        mask = torch.ones((n, 1, 1, t + 1), dtype=torch.bool)
        mask[:, 0, 0, t] = False  # an idle row sees its own (ignored) token only
        for s in feeding:
            r = s.round
            column = r.ctx + len(r.tokens) - 1  # the newest token's column in its round layout
            tokens[s.slot, 0] = r.tokens[-1]
            positions[s.slot, 0] = r.positions[column]
            mask[s.slot, 0, 0, r.start:] = r.mask[column, :column + 1]
        rows = _Rows(self.cache, n)
        logits = self.model.forward_with_cache(tokens.to(self.device), positions.to(self.device),
                                               mask.to(self.device), rows)
        self.cache.length = rows.length
        if self.faults is not None:
            self.faults.on_step(feeding, logits[:, 0], self.cache)
        finite = self._check_logits(logits[:, 0])
        events: List[Event] = []
        for s in feeding:
            self._isolated(events, s.spec.seq_id, s.slot, self._take, s, logits[s.slot, 0], events, finite[s.slot])
        return events

    def _take(self, seq: _Sequence, logits: torch.Tensor, events: List[Event], finite: bool) -> None:
        """Sample the next token of the sequence's blank from its logits [V]; end the round when it is done."""
        if self.faults is not None:
            self.faults.on_take(seq)
        if not finite:
            raise SequenceFault("the model produced non-finite logits (NaN or Inf) for this sequence")
        r = seq.round
        tokens, _ = seq.strategy.forward(logits.view(1, -1), torch.empty((1, 0), dtype=torch.long,
                                                                          device=logits.device))
        token = int(tokens[0, -1])
        self._check_token(seq, token, logits.shape[-1])
        r.tokens.append(token)
        seq.completion_tokens += 1
        self.decode_tokens += 1
        event = Event(seq.spec.seq_id)
        if seq.spec.logprobs is not None:
            event.logprobs.append(self._token_logprob(seq, logits, token))
        ended = token in self.end_tokens
        stopped = not ended and self._hits_stop(seq)
        if stopped:
            r.tokens.pop()  # the token that completed the stop string is not kept
        if ended or stopped:
            seq.finish_reason = "stop"
        elif len(r.tokens) >= r.budget:
            seq.finish_reason = "length"
        else:
            event.text = self._stream_delta(seq)
            events.append(event)
            return
        events.append(event)
        self._end_round(seq, events)

    def _end_round(self, seq: _Sequence, events: List[Event]) -> None:
        r = seq.round
        generated = [t for t in r.tokens if t not in self.end_tokens]
        seq.output = _splice(seq.output, generated, seq.prompt, self.tokenizer, 0.0)
        seq.round = None
        if seq.prompt.mask_id in seq.output.seq:
            seq.needs_prefill = True
            seq.finish_reason = "length"
            return
        events.append(self._finish(seq, seq.finish_reason))

    # --- text ----------------------------------------------------------------------------------------------------
    def _continuation_only(self, seq: _Sequence) -> bool:
        """A prompt without a mask ([gMASK] appended): its text is the continuation alone (OpenAI's meaning)."""
        return not seq.has_mask

    def _hits_stop(self, seq: _Sequence) -> bool:
        if not seq.spec.stop:
            return False
        generated = [t for t in seq.round.tokens if t not in self.end_tokens]
        blank = self.tokenizer.detokenize(generated)
        return any(s in blank for s in seq.spec.stop)

    def _visible(self, seq: _Sequence, text: str, final: bool) -> str:
        """The text a client may see: cut at a stop string; while running, without a tail that may start one."""
        text = text.rstrip("\ufffd") if not final else text
        for s in seq.spec.stop:
            if s in text:
                text = text[:text.index(s)]
        if not final:
            for s in seq.spec.stop:
                for k in range(min(len(s) - 1, len(text)), 0, -1):
                    if text.endswith(s[:k]):
                        text = text[:-k]
                        break
        return text

    def _current_text(self, seq: _Sequence) -> str:
        generated = [t for t in seq.round.tokens if t not in self.end_tokens]
        if self._continuation_only(seq):
            return self.tokenizer.detokenize(generated)
        return self.tokenizer.detokenize(seq.output.seq[:seq.round.mask_position] + generated)

    def _stream_delta(self, seq: _Sequence, final_text: Optional[str] = None) -> str:
        if final_text is not None:
            text = final_text
        elif self._continuation_only(seq):
            text = self._visible(seq, self._current_text(seq), final=False)
        else:  # a filled prompt: stop strings end a blank (_hits_stop), the prompt's own text is never cut
            text = self._current_text(seq).rstrip("\ufffd")
        if text.startswith(seq.shown) and len(text) > len(seq.shown):
            delta, seq.shown = text[len(seq.shown):], text
            return delta
        return ""

    # --- the end of a sequence -----------------------------------------------------------------------------------
    def _finish(self, seq: _Sequence, reason: str, free: bool = True) -> Event:
        eos = self.tokenizer.get_command("eos")
        ids = seq.output.seq[:-1] if seq.output.seq and seq.output.seq[-1] == eos else seq.output.seq
        blanks = seq.output.blanks
        if self._continuation_only(seq):
            text = self._visible(seq, blanks[0] if blanks else "", final=True)
        else:
            text = self.tokenizer.detokenize(ids)
        if free and seq.slot is not None and self.slots[seq.slot] is seq:
            self.slots[seq.slot] = None
        if self.live() == 0:
            self.cache.length = 0
        result = {"text": text, "blanks": list(blanks), "prompt_tokens": len(seq.prompt.ids),
                  "completion_tokens": seq.completion_tokens}
        return Event(seq.spec.seq_id, text=self._stream_delta(seq, text), finish_reason=reason, result=result)

    def _cancel(self, seq_id: int) -> List[Event]:
        for i, s in enumerate(self.slots):
            if s is not None and s.spec.seq_id == seq_id:
                self.slots[i] = None
                if self.live() == 0:
                    self.cache.length = 0
                return [Event(seq_id, finish_reason="cancelled")]
        return []

    # --- log-probs -----------------------------------------------------------------------------------------------
    def _token_logprob(self, seq: _Sequence, logits: torch.Tensor, token: int) -> TokenLogprob:
        """The token just taken (last in its round): the text it adds to the blank ("" for an end token, which is not
        part of the text), its log-prob and the best alternatives."""
        logp = torch.log_softmax(logits.float(), dim=-1)
        generated = [t for t in seq.round.tokens if t not in self.end_tokens]
        text = "" if token in self.end_tokens else self.tokenizer.token_texts(generated, len(generated) - 1)[0]
        top = {}
        if seq.spec.logprobs > 0:
            values, ids = torch.topk(logp, seq.spec.logprobs)
            top = {self.tokenizer.id_text(i): float(v) for v, i in zip(values.tolist(), ids.tolist())}
        return TokenLogprob(text, float(logp[token]), top)

    # --- beam search, outside the batch ----------------------------------------------------------------------------
    def run_beam(self, spec: SequenceSpec) -> Event:
        """A beam-search request through fill_blanks as generate.py runs it (the batch waits meanwhile)."""
        strategy = BeamSearchStrategy(1, spec.num_beams, length_penalty=spec.length_penalty, consider_end=True,
                                      end_tokens=self.end_tokens, invalid_slices=self.invalid,
                                      no_repeat_ngram_size=spec.no_repeat_ngram_size, deterministic=True)
        result = fill_blanks(spec.text, self.model, self.tokenizer, strategy, out_seq_length=_UNLIMITED,
                             max_new_tokens=spec.max_tokens, max_sequence_length=self.max_sequence_length)
        prompt = result.prompt
        blanks = result.blanks[0]
        continuation = not any(m in spec.text for m in ("[MASK]", "[sMASK]", "[gMASK]"))
        text = blanks[0] if continuation and blanks else result.answers[0]
        generated = len(result.sequences[0]) - len(prompt.ids) + len(blanks)
        self.decode_tokens += max(0, generated)
        return Event(spec.seq_id, text=text, finish_reason="stop",
                     result={"text": text, "blanks": blanks, "prompt_tokens": len(prompt.ids),
                             "completion_tokens": max(0, generated)})

