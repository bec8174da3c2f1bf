"""Blank filling / text generation with GLM-130B (the original's generate.py), interactive or from a file.

    bash scripts/generate.sh                                  # interactive
    bash scripts/generate.sh --input-source prompts.txt --batch-size 8
    bash scripts/generate.sh --sampling-strategy BeamSearchStrategy --num-beams 4

Flags are the original's (SAT's --top_k/--top_p/--num-beams/... and the repo's --sampling-strategy,
--min-gen-length, --print-all-beams) plus the README's spellings --top-k, --top-p, --print-all-beam, and:
  --out-seq-length N   as the original: a cap on the WHOLE sequence, context included (each blank may generate
                       N - current length tokens); default 256.
  --max-new-tokens N   instead a per-blank cap on generated tokens, whatever the context length.
  --batch-size N       file input: decode N prompts together (same outputs as one by one under greedy decoding).
  --deterministic-beam-search  beam candidates are the top ones (as the evaluation) instead of sampled ones.
See docs/generation.md for the layouts, the strategies and every difference from the original.
"""
import argparse
import os
import sys
import time
from datetime import datetime
from typing import List, Optional, Tuple

import torch

from generation import (BaseStrategy, BeamSearchStrategy, check_prompt, encode_prompt, fill_blanks_batch,
                        generation_invalid_slices)
from initialize import initialize, initialize_model_and_tokenizer
from model import mpu
from model.errors import UserError, main_entry

PROMPT = "\nPlease Input Query (stop to exit) >>> "


def add_generation_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("generation")
    g.add_argument("--sampling-strategy", default="BaseStrategy", choices=["BaseStrategy", "BeamSearchStrategy"])
    g.add_argument("--min-gen-length", type=int, default=0, help="minimum number of tokens each blank generates")
    g.add_argument("--print-all-beams", "--print-all-beam", dest="print_all_beams", action="store_true",
                   help="print every beam, not only the best")
    g.add_argument("--temperature", type=float, default=1.0)
    g.add_argument("--top_p", "--top-p", dest="top_p", type=float, default=0.0, help="nucleus sampling (0 = off)")
    g.add_argument("--top_k", "--top-k", dest="top_k", type=int, default=0, help="top-k sampling (0 = off, 1 = greedy)")
    g.add_argument("--num-beams", type=int, default=1)
    g.add_argument("--length-penalty", type=float, default=0.0,
                   help="beam search: finished beams rank by score / ((5 + length) / 6) ** length_penalty")
    g.add_argument("--no-repeat-ngram-size", type=int, default=0)
    g.add_argument("--deterministic-beam-search", action="store_true",
                   help="beam search takes the top candidates instead of sampling them")
    g.add_argument("--out-seq-length", type=int, default=256,
                   help="cap on the whole sequence, context included (the original's meaning)")
    g.add_argument("--max-new-tokens", type=int, default=None,
                   help="cap on the tokens generated per blank (replaces --out-seq-length's budget)")
    g.add_argument("--input-source", default="interactive", help="'interactive' or a file with one prompt per line")
    g.add_argument("--output-path", default="./samples")
    g.add_argument("--with-id", action="store_true", help="input lines are '<id>\\t<text>'; output goes to <id>.txt")
    g.add_argument("--batch-size", type=int, default=1, help="prompts decoded together (file input)")


def validate_generation_args(args) -> None:
    checks = [(args.temperature > 0, f"--temperature must be positive, got {args.temperature}"),
              (0.0 <= args.top_p <= 1.0, f"--top_p must be in [0, 1], got {args.top_p}"),
              (args.top_k >= 0, f"--top_k must be >= 0, got {args.top_k}"),
              (args.num_beams >= 1, f"--num-beams must be >= 1, got {args.num_beams}"),
              (args.no_repeat_ngram_size >= 0, f"--no-repeat-ngram-size must be >= 0, got {args.no_repeat_ngram_size}"),
              (args.min_gen_length >= 0, f"--min-gen-length must be >= 0, got {args.min_gen_length}"),
              (args.out_seq_length > 0, f"--out-seq-length must be positive, got {args.out_seq_length}"),
              (args.max_new_tokens is None or args.max_new_tokens > 0,
               f"--max-new-tokens must be positive, got {args.max_new_tokens}"),
              (args.batch_size >= 1, f"--batch-size must be >= 1, got {args.batch_size}")]
    for ok, message in checks:
        if not ok:
            raise UserError(message)
    if args.input_source != "interactive":
        if not os.path.isfile(args.input_source):
            raise UserError(f"--input-source {args.input_source!r} is neither 'interactive' nor a readable file")
        if not any(line.strip() for line in read_input_lines(args.input_source)):  # before the model loads
            raise UserError(f"--input-source {args.input_source} has no prompts (it is empty or holds only blank "
                            f"lines): nothing to generate")


def read_input_lines(path: str) -> List[str]:
    """The lines of an --input-source file; UserError when it cannot be read as UTF-8 text."""
    try:
        with open(path, encoding="utf-8") as f:
            return f.read().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read --input-source {path}: {e}") from None


def build_strategy(args, tokenizer):
    end_tokens = [tokenizer.get_command("eop"), tokenizer.get_command("eos")]
    invalid = generation_invalid_slices(tokenizer, end_tokens)
    if args.sampling_strategy == "BaseStrategy":
        return BaseStrategy(batch_size=1, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                            end_tokens=end_tokens, invalid_slices=invalid, min_gen_length=args.min_gen_length)
    return BeamSearchStrategy(1, args.num_beams, length_penalty=args.length_penalty, consider_end=True,
                              end_tokens=end_tokens, invalid_slices=invalid,
                              no_repeat_ngram_size=args.no_repeat_ngram_size, min_gen_length=args.min_gen_length,
                              deterministic=args.deterministic_beam_search)


def parse_line(line: str, with_id: bool) -> Tuple[Optional[str], str]:
    """(query id or None, text) of one input; UserError when --with-id is set and the line is not '<id>\\t<text>'."""
    if not with_id:
        return None, line
    parts = line.split("\t")
    if len(parts) != 2 or not parts[0].strip():
        raise UserError("--with-id expects '<id><TAB><text>' (exactly one tab)")
    query_id = parts[0].strip()
    if "/" in query_id or query_id in (".", ".."):
        raise UserError(f"query id {query_id!r} is not a plain file name (it names the output file <id>.txt)")
    return query_id, parts[1].strip()


def output_file(output_path: str, query_id: Optional[str], text: str) -> str:
    """<id>.txt with --with-id, else '<first 20 chars of the text without '/'>-<MM-DD-HH-MM-SS>.txt' (SAT's
    timed_name); a name already taken in that second gets -1, -2, ... instead of being overwritten."""
    if query_id is not None:
        return os.path.join(output_path, query_id + ".txt")
    stem = f"{text.replace('/', '')[:20]}-{datetime.now().strftime('%m-%d-%H-%M-%S')}"
    path, n = os.path.join(output_path, stem + ".txt"), 0
    while os.path.exists(path):
        n += 1
        path = os.path.join(output_path, f"{stem}-{n}.txt")
    return path


class Generator:
    """Holds the model, tokenizer and strategy; runs prompts and prints/saves as the original's `process`."""

    def __init__(self, args, model, tokenizer):
        self.args, self.model, self.tokenizer = args, model, tokenizer
        self.strategy = build_strategy(args, tokenizer)
        self.limits = dict(out_seq_length=args.out_seq_length, max_new_tokens=args.max_new_tokens,
                           max_sequence_length=args.max_sequence_length)

    def check(self, text: str) -> None:
        check_prompt(encode_prompt(text, self.tokenizer), **self.limits)

    def run(self, items: List[Tuple[Optional[str], str]], show: bool, interactive: bool = False) -> None:
        """Fill the blanks of (id, text) items decoded together; `show` on the rank that prints and writes.

        interactive (one item): `Input:` is printed before generating and a sampled output streams as it grows."""
        writer = None
        if show and interactive:
            print(f"\nInput: {encode_prompt(items[0][1], self.tokenizer).text}\n", flush=True)
            if isinstance(self.strategy, BaseStrategy):
                sys.stdout.write("Output: ")
                writer = _write
        results = fill_blanks_batch([text for _, text in items], self.model, self.tokenizer, self.strategy,
                                    stream=writer, **self.limits)
        if writer is not None:
            print(flush=True)
        for (query_id, text), result in zip(items, results):
            if not show:
                continue
            if writer is None:
                if not interactive:
                    print(f"\nInput: {result.prompt.text}\n")
                if self.args.print_all_beams and len(result.answers) > 1:
                    for idx, styled in enumerate(result.answers_with_style):
                        print(f"Output beam {idx}:", styled)
                        if len(styled) > 120:
                            print("")
                else:
                    print("Output:", result.answers_with_style[0])
            path = output_file(self.args.output_path, query_id, text)
            try:
                with open(path, "w", encoding="utf-8") as f:
                    f.writelines(answer + "\n" for answer in result.answers)
            except OSError as e:
                raise UserError(f"cannot write {path}: {e.strerror}") from None
        sys.stdout.flush()


def _write(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def _error(message) -> None:
    print(f"error: {message}", file=sys.stderr, flush=True)


def interactive(gen: Generator) -> None:
    """The original's loop: rank 0 reads, every rank runs the query; bad input prints one line and the loop goes on."""
    while True:
        raw_text, is_stop = None, False
        if mpu.get_rank() == 0:
            try:
                raw_text = input(PROMPT).strip()
            except EOFError:
                print(flush=True)
                is_stop = True
            else:
                if not raw_text:
                    print("Query should not be empty!", flush=True)
                    continue
                is_stop = raw_text == "stop"
        raw_text, is_stop = mpu.broadcast_object([raw_text, is_stop])
        if is_stop:
            return
        start = time.time()
        try:
            query_id, text = parse_line(raw_text, gen.args.with_id)
            gen.check(text)
            gen.run([(query_id, text)], show=mpu.get_rank() == 0, interactive=True)
        except UserError as e:
            if mpu.get_rank() == 0:
                _error(e)
            continue
        if mpu.get_rank() == 0:
            print(f"\nTaken time {time.time() - start:.2f}\n", flush=True)


def from_file(gen: Generator) -> None:
    """Line n goes to data-parallel replica n % dp_size; each replica decodes its lines in batches."""
    lines = read_input_lines(gen.args.input_source)
    dp_rank, dp_size = mpu.get_data_parallel_rank(), mpu.get_data_parallel_world_size()
    show = mpu.get_model_parallel_rank() == 0
    failed, batch = 0, []

    def flush():
        if batch:
            start = time.time()
            gen.run([item for _, item in batch], show=show)
            if show:
                print(f"\nTaken time {time.time() - start:.2f}\n", flush=True)
            batch.clear()

    for n, line in enumerate(lines):
        if n % dp_size != dp_rank:
            continue
        if show:
            print(f"Working on No. {n} on model group {mpu.get_rank()}... ", flush=True)
        line = line.strip()
        if not line:
            continue
        try:
            query_id, text = parse_line(line, gen.args.with_id)
            gen.check(text)
        except UserError as e:
            failed += 1
            if show:
                _error(f"line {n + 1}: {e}")
            continue
        batch.append((n, (query_id, text)))
        if len(batch) == gen.args.batch_size:
            flush()
    flush()
    if failed:
        raise UserError(f"{failed} input line(s) were skipped (see the errors above)")


@main_entry
def main(argv=None) -> None:
    args = initialize(add_generation_args, argv)
    validate_generation_args(args)
    model, tokenizer = initialize_model_and_tokenizer(args)
    try:
        os.makedirs(args.output_path, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create --output-path {args.output_path}: {e.strerror}") from None
    gen = Generator(args, model, tokenizer)
    with torch.no_grad():
        if args.input_source == "interactive":
            interactive(gen)
        else:
            from_file(gen)


if __name__ == "__main__":
    main()
