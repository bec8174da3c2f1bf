"""Blank filling as generate.py does it (original-repo.md §5.4, Appendix A), for one prompt or a batch.

Prompt encoding (`encode_prompt`):
- the mask type generated is [MASK] if the text has one, else [sMASK], else [gMASK]; masks of the other types stay in
  the context as literal special tokens;
- the text is split at the masks, each piece tokenized on its own, the mask ids inserted between the pieces;
- a text without any mask gets [gMASK] appended (and " [gMASK]" in the text shown as `Input:`);
- a text that does not end with a mask gets eos (20002) appended.

One generation round per mask, left to right. The round's input is the sequence + sop (`generation_layout`):
the context (everything before sop) attends bidirectionally, sop and the generated tokens causally (they see the
whole context); the context cannot see sop. For [MASK]/[sMASK], sop and every generated token take the mask's
position id; for [gMASK] the positions continue (sop = len - 1, then +1 per token). Generation stops at eop or eos;
the generated span (end token dropped) replaces the mask in place and the next round re-encodes the whole sequence.

Length budget of a round (`round_budget`): `--out-seq-length` keeps the original's meaning, a cap on the whole
sequence (context + generated), so a round may generate out_seq_length - len(input) tokens; `max_new_tokens`, when
given, is a per-blank limit instead. Both are capped so that input + generated fits in max_sequence_length. A round
with no room left fills its blank with nothing (as the original); the first round must have room (UserError).

Fixes of the original's limits:
- any number of prompts decode together: rows are right-padded (padding is masked out and gets no position), and
  every row keeps its own positions and budget, so a batch gives the same tokens as one prompt at a time;
- beam search keeps every beam's own history across masks: the next mask is filled by continuing the search from
  all beams of the previous one (their cumulative scores carried over), and each output's blanks, styled text and
  answer are those of its own sequence (the original restarted from beam 0 and mixed the per-beam records);
- the "MASK]" substring tests became tests on real mask tokens (a stray "MASK]" in the text no longer disables
  generation); the global `args` dependency is gone (explicit parameters);
- `generation_invalid_slices` keeps generation to ids the tokenizer can decode (see its docstring).
"""
import re
from dataclasses import dataclass, field
from typing import Callable, List, Optional, Sequence

import torch

from generation.decoding import batch_filling_sequence
from model.errors import UserError
from model.layout import DecodingLayout, generation_batch, round_sample
from model.tokenizer import text_id_range

MASK_PATTERN = re.compile(r"\[[sg]?MASK\]")
MASK_PRECEDENCE = ("[MASK]", "[sMASK]", "[gMASK]")
GMASK_STYLE = ("\033[4m", "\033[0m")  # underline
MASK_STYLE = ("\x1b[0;32m\033[4m", "\033[0m\x1b[0m")  # green + underline


@dataclass
class EncodedPrompt:
    text: str  # the raw text as the original shows it (" [gMASK]" appended when it was added)
    ids: List[int]  # context ids with mask ids in place (and eos when the text does not end with a mask)
    mask_id: int  # the mask type that is generated
    use_gmask: bool
    english: bool  # pure ASCII text: blanks are set off with spaces in the styled output


def encode_prompt(raw_text: str, tokenizer) -> EncodedPrompt:
    found = MASK_PATTERN.findall(raw_text)
    pieces = MASK_PATTERN.split(raw_text)
    mask_name = next((m for m in MASK_PRECEDENCE[:2] if m in found), "[gMASK]")
    ids: List[int] = []
    for piece, mask in zip(pieces, found):
        ids += tokenizer.tokenize(piece) if piece else []
        ids.append(tokenizer.get_command(mask))
    ids += tokenizer.tokenize(pieces[-1]) if pieces[-1] else []
    text = raw_text
    if not found:
        ids.append(tokenizer.get_command("[gMASK]"))
        text = raw_text + " [gMASK]"
    elif pieces[-1] != "":  # the text does not end with a mask
        ids.append(tokenizer.get_command("eos"))
    return EncodedPrompt(text=text, ids=ids, mask_id=tokenizer.get_command(mask_name),
                         use_gmask=mask_name == "[gMASK]", english=raw_text.isascii())


def encode_prompt_ids(ids: Sequence[int], tokenizer) -> EncodedPrompt:
    """encode_prompt for a prompt given as token ids (mask ids in place): the same mask choice and the same
    appended [gMASK] / eos; `text` is the ids detokenized."""
    ids = [int(i) for i in ids]
    found = [m for m in MASK_PRECEDENCE if tokenizer.get_command(m) in ids]
    mask_name = next((m for m in MASK_PRECEDENCE[:2] if m in found), "[gMASK]")
    text = tokenizer.detokenize(ids)
    if not found:
        ids.append(tokenizer.get_command("[gMASK]"))
        text += " [gMASK]"
    elif ids[-1] not in {tokenizer.get_command(m) for m in MASK_PRECEDENCE}:
        ids.append(tokenizer.get_command("eos"))
    return EncodedPrompt(text=text, ids=ids, mask_id=tokenizer.get_command(mask_name),
                         use_gmask=mask_name == "[gMASK]", english=text.isascii())


def generation_invalid_slices(tokenizer, end_tokens: Optional[Sequence[int]] = None) -> List[slice]:
    """Ids generation must never pick: all but the tokenizer's text ids and the end tokens.

    That excludes icetk's image tokens (< 20000), text ids the tokenizer file does not have, the special tokens
    other than the end tokens ([MASK], [gMASK], sop, ...), and the model's padding rows after the last special
    id (150008..150527). The original excluded nothing, so a sampled image or padding id crashed detokenization.
    """
    end_tokens = sorted(set(tokenizer.end_tokens if end_tokens is None else end_tokens))
    allowed = sorted([text_id_range(tokenizer)] + [(t, t + 1) for t in end_tokens])
    slices, start = [], 0
    for lo, hi in allowed:
        if lo > start:
            slices.append(slice(start, lo))
        start = max(start, hi)
    slices.append(slice(start, None))
    return slices


def get_masks_and_position_ids(seq: torch.Tensor, mask_position: int, max_gen_length: int, gmask: bool = False):
    """The original's single-row layout: seq [1, ctx] (ending with sop) -> tokens [1, ctx+G] padded with -1,
    attention mask bool [1, 1, L, L] (True = may NOT attend), position ids [1, L]."""
    _, _, layout = generation_layout([seq.view(-1).tolist()], [mask_position], [gmask], max_gen_length)
    return layout(seq.view(1, -1))


def generation_layout(inputs: Sequence[Sequence[int]], mask_positions: Sequence[int], use_gmask: Sequence[bool],
                      max_gen_length: int, device="cpu"):
    """Right-padded batch layout for one round (model/layout.py): inputs are the rows' ids ending with sop.

    Returns (seqs [B, ctx] right-padded, context_lengths [B], get_masks_and_position_ids) where the function gives
    the full-length (ctx + max_gen_length) tokens, mask [B, 1, L, L] and positions [B, L] for the decoding loop,
    computed on `device` (the decoding device; seqs and context_lengths stay on the CPU).
    Generated token t of row b sits at column ctx + t with position len_b + t ([gMASK]) or mask_position_b
    ([MASK]/[sMASK]), as in an unpadded row.
    """
    batch = generation_batch([round_sample(ids, m, max_gen_length, g)
                              for ids, m, g in zip(inputs, mask_positions, use_gmask)])
    return batch["tokens"], batch["context_length"], DecodingLayout(batch, device)


def round_budget(input_length: int, out_seq_length: int, max_new_tokens: Optional[int],
                 max_sequence_length: Optional[int]) -> int:
    """Tokens one round may generate after an input of `input_length` ids (sop included)."""
    budget = out_seq_length - input_length if max_new_tokens is None else max_new_tokens
    if max_sequence_length is not None:
        budget = min(budget, max_sequence_length - input_length)
    return budget


def check_prompt(prompt: EncodedPrompt, out_seq_length: int, max_new_tokens: Optional[int] = None,
                 max_sequence_length: Optional[int] = None) -> None:
    """UserError (one line) when the prompt leaves no room to generate its first blank."""
    n = len(prompt.ids) + 1  # + sop
    if max_sequence_length is not None and n >= max_sequence_length:
        raise UserError(f"text too long: the prompt is {n} tokens (with the added mask, eos and sop) but the model "
                        f"takes at most {max_sequence_length} (--max-sequence-length), generated tokens included")
    if round_budget(n, out_seq_length, max_new_tokens, max_sequence_length) <= 0:
        raise UserError(f"no room to generate: the prompt is {n} tokens and --out-seq-length {out_seq_length} "
                        f"counts the prompt too; raise --out-seq-length or use --max-new-tokens")


@dataclass
class _Output:
    """One output (hypothesis) of a prompt and its records, as the original's per-output accumulators."""
    seq: List[int]
    last_pos: int = 0
    styled: str = ""
    blanks: List[str] = field(default_factory=list)
    score: float = 0.0


@dataclass
class BlankFillingResult:
    answers: List[str]  # the whole text with the blanks filled, one per output (beam), best first
    answers_with_style: List[str]  # the same with ANSI-styled blanks (what generate.py prints)
    blanks: List[List[str]]  # per output, the text of each blank in order
    prompt: EncodedPrompt
    sequences: List[List[int]]  # per output, the final ids (blanks spliced in, trailing eos dropped)

    def __iter__(self):  # `answers, answers_with_style, blanks = result`, as the original's return value
        return iter((self.answers, self.answers_with_style, self.blanks))


class _Streamer:
    """Writes the first output's styled text as it is produced (sampling only)."""

    def __init__(self, write: Callable[[str], None], tokenizer, end_tokens, width: int):
        self.write, self.tokenizer, self.end_tokens, self.width = write, tokenizer, set(end_tokens), width
        self.shown = ""

    def step(self, tokens: torch.Tensor, _step: int) -> None:
        generated = tokens[0, 0, self.width:].tolist()
        if -1 in generated:
            generated = generated[:generated.index(-1)]
        if generated and generated[-1] in self.end_tokens:
            generated = generated[:-1]
        self.show(self.tokenizer.detokenize(generated).rstrip("\ufffd"))

    def show(self, text: str) -> None:
        if text.startswith(self.shown) and len(text) > len(self.shown):
            self.write(text[len(self.shown):])
            self.shown = text


def _styles(prompt: EncodedPrompt):
    return GMASK_STYLE if prompt.use_gmask else MASK_STYLE


def fill_blanks_batch(texts: Sequence[str], model, tokenizer, strategy, *, out_seq_length: int = 256,
                      max_new_tokens: Optional[int] = None, max_sequence_length: Optional[int] = None,
                      use_cache: bool = True,
                      stream: Optional[Callable[[str], None]] = None) -> List[BlankFillingResult]:
    """Fill the blanks of every text, decoding the prompts together; one BlankFillingResult per text.

    strategy: a BaseStrategy (one output per prompt) or a BeamSearchStrategy with consider_end=True (num_beams
    outputs, best first). max_sequence_length: default the model's. stream: with a single prompt and a BaseStrategy, receives the styled output text piece by
    piece as it is generated (the pieces concatenate to answers_with_style[0]).
    """
    if max_sequence_length is None:
        max_sequence_length = getattr(getattr(model, "config", None), "max_sequence_length", None)
    prompts = [encode_prompt(t, tokenizer) for t in texts]
    for p in prompts:
        check_prompt(p, out_seq_length, max_new_tokens, max_sequence_length)
    beam = hasattr(strategy, "num_beams")
    if beam and not strategy.consider_end:
        raise ValueError("fill_blanks needs a BeamSearchStrategy with consider_end=True")
    if stream is not None and (beam or len(prompts) != 1):
        stream = None
    sop, eos = tokenizer.get_command("sop"), tokenizer.get_command("eos")
    outputs = [[_Output(seq=list(p.ids))] for p in prompts]
    while True:
        active = [i for i, p in enumerate(prompts) if p.mask_id in outputs[i][0].seq]
        if not active:
            break
        for count in sorted({len(outputs[i]) for i in active}):  # one call per number of outputs (beams) per prompt
            group = [i for i in active if len(outputs[i]) == count]
            _fill_round(model, tokenizer, strategy, [prompts[i] for i in group], [outputs[i] for i in group], sop,
                        out_seq_length, max_new_tokens, max_sequence_length, use_cache, stream)
    results = []
    for p, outs in zip(prompts, outputs):
        answers, styled, sequences = [], [], []
        for o in outs:
            seq = o.seq[:-1] if o.seq and o.seq[-1] == eos else o.seq
            sequences.append(seq)
            tail = tokenizer.detokenize(seq[o.last_pos:])
            if stream is not None and o is outs[0]:
                stream(tail)
            styled.append(o.styled + tail)
            answers.append(tokenizer.detokenize(seq))
        results.append(BlankFillingResult(answers, styled, [o.blanks for o in outs], p, sequences))
    return results


def fill_blanks(raw_text: str, model, tokenizer, strategy, **kwargs) -> BlankFillingResult:
    """The original's fill_blanks for one text: `answers, answers_with_style, blanks = fill_blanks(...)`."""
    return fill_blanks_batch([raw_text], model, tokenizer, strategy, **kwargs)[0]


def _fill_round(model, tokenizer, strategy, prompts: List[EncodedPrompt], outputs: List[List[_Output]], sop: int,
                out_seq_length, max_new_tokens, max_sequence_length, use_cache, stream) -> None:
    """Fill the next mask of every prompt (each with its outputs) in one batched decoding call; updates outputs."""
    rows, mask_positions, gmask, budgets = [], [], [], []
    for p, outs in zip(prompts, outputs):
        for o in outs:
            rows.append(o.seq + [sop])
            mask_positions.append(o.seq.index(p.mask_id))
            gmask.append(p.use_gmask)
        budgets.append(min(round_budget(len(o.seq) + 1, out_seq_length, max_new_tokens, max_sequence_length)
                           for o in outs))
    per_prompt = len(outputs[0])  # 1 in the first round; num_beams after a beam-search round
    max_gen = max(0, max(budgets))
    device = next(model.parameters()).device
    seqs, context_lengths, layout = generation_layout(rows, mask_positions, gmask, max_gen, device)
    seqs = seqs.to(device)
    width = seqs.shape[1]
    init_scores = None
    if per_prompt > 1:
        init_scores = torch.tensor([[o.score for o in outs] for outs in outputs], dtype=torch.float32)

    streamer = None
    if stream is not None:
        o, p = outputs[0][0], prompts[0]
        sp = " " if p.english else ""
        stream(tokenizer.detokenize(o.seq[o.last_pos:mask_positions[0]]) + sp + _styles(p)[0])
        streamer = _Streamer(stream, tokenizer, strategy.end_tokens, width)

    result, _ = batch_filling_sequence(model, seqs, context_lengths, strategy, layout, num_beams_in=per_prompt,
                                       init_scores=init_scores, max_gen_lengths=[max(0, b) for b in budgets],
                                       use_cache=use_cache, callback=streamer.step if streamer else None)
    end_tokens = set(strategy.end_tokens)
    final_scores = getattr(strategy, "final_scores", None)
    input_rows = seqs.tolist()
    for e, (p, outs) in enumerate(zip(prompts, outputs)):
        own_rows = input_rows[e * per_prompt:(e + 1) * per_prompt]
        if isinstance(result, list):  # beam search: finished beams, best first
            beams = [beam.tolist() for beam in result[e]]
            scores = final_scores[e][0] if final_scores else [0.0] * len(beams)
        else:
            beams, scores = [result[e, 0].tolist()], [0.0]
        new_outs = []
        for tokens, score in zip(beams, scores):
            src = _source_output(tokens[:width], own_rows)
            generated = tokens[width:]
            if -1 in generated:
                generated = generated[:generated.index(-1)]
            if generated and generated[-1] in end_tokens:
                generated = generated[:-1]
            new_outs.append(_splice(outs[src], generated, p, tokenizer, score))
        if streamer is not None and e == 0:
            streamer.show(new_outs[0].blanks[-1])
            stream(_styles(p)[1] + (" " if p.english else ""))
        outs[:] = new_outs


def _source_output(context_row: List[int], rows: List[List[int]]) -> int:
    """Which input row (output of the previous round) a beam continues: the one its context columns equal."""
    for i, row in enumerate(rows):
        if row == context_row:
            return i
    raise RuntimeError("a beam does not continue any input row")  # cannot happen: beams extend their input rows


def _splice(o: _Output, generated: List[int], prompt: EncodedPrompt, tokenizer, score: float) -> _Output:
    """The original's post-processing: the generated span replaces the mask; styled text and blanks are extended."""
    mask_position = o.seq.index(prompt.mask_id)
    sp = " " if prompt.english else ""
    on, off = _styles(prompt)
    blank = tokenizer.detokenize(generated)
    styled = o.styled + tokenizer.detokenize(o.seq[o.last_pos:mask_position]) + sp + on + blank + off + sp
    return _Output(seq=o.seq[:mask_position] + generated + o.seq[mask_position + 1:],
                   last_pos=mask_position + len(generated), styled=styled, blanks=o.blanks + [blank], score=score)
