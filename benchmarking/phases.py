"""The timed phases: the original's encode forward, batch-1/8 decoding per weight format, evaluation scoring.

Each phase writes its raw figures; ratios against the machine's limits come later (benchmarking/report.py).
A phase predicted (from a smaller run of the same path) to take longer than PHASE_BUDGET_S is skipped and
reported as unavailable, so the benchmark finishes on any CPU.
"""
import gc
import statistics
import time
from typing import Dict, List, Optional

import torch

from benchmarking.arithmetic import forward_flops
from benchmarking.timing import best_time, sync, timed
from initialize import build_model
from model import KVCache, mpu
from model.layout import collate_layouts, multiple_choice_sample
from model.tokenizer import NUM_IMAGE_TOKENS, NUM_TOKENS, SPECIAL_IDS

PHASE_BUDGET_S = 60.0  # a single timed call predicted longer than this is skipped ("n/a")


def random_text_ids(shape, generator, vocab_size: int = NUM_TOKENS) -> torch.Tensor:
    """Random text token ids (never special ids), as a real prompt has."""
    return torch.randint(NUM_IMAGE_TOKENS, min(vocab_size, NUM_TOKENS), shape, generator=generator)


def run_encode(model, lengths: List[int], device, results: dict, cfg) -> None:
    """The original's benchmark: one forward of batch 1 at each length (tokens all ones, positions arange(n), a
    random mask); prints `Encode {n}: {ms} ms`."""
    gen = torch.Generator().manual_seed(1234)

    def inputs(n):
        tokens = torch.ones(1, n, dtype=torch.long, device=device)
        positions = torch.arange(n, device=device).unsqueeze(0)
        mask = (torch.randn(1, 1, n, n, generator=gen) < 0.5).to(device)  # as the original: a random mask
        return tokens, positions, mask

    warm = inputs(min(lengths))
    rate = forward_flops(cfg, min(lengths), min(lengths)) / timed(lambda: model(*warm), device)  # first call
    for n in sorted(lengths):
        flops = forward_flops(cfg, n, n) / mpu.get_model_parallel_world_size()
        if flops / rate > PHASE_BUDGET_S:
            mpu.print_rank_0(f"Encode {n}: n/a (predicted {flops / rate:.0f} s at this machine's rate: skipped)")
            continue
        args = inputs(n)
        mpu.barrier()
        t = best_time(lambda: model(*args), device, 2 if n == min(lengths) else 1)
        mpu.barrier()
        mpu.print_rank_0(f"Encode {n}: {t * 1e3:.2f} ms")
        rate = flops / t
        results[f"prefill.{n}.ms"] = t * 1e3
        results[f"prefill.{n}.flops"] = flops
        results[f"prefill.{n}.flop_per_s"] = flops / t


def prefill(model, tokens: torch.Tensor, cache: KVCache, device) -> torch.Tensor:
    """The prompt of every row at once (a bidirectional context, as GLM's); logits of its last token."""
    batch, prompt = tokens.shape
    positions = torch.arange(prompt, device=device).expand(batch, prompt)
    mask = torch.zeros(1, 1, prompt, prompt, dtype=torch.bool, device=device)
    return model.forward_with_cache(tokens, positions, mask, cache,
                                    logits_index=torch.full((batch,), prompt - 1, device=device))


def greedy(logits: torch.Tensor) -> torch.Tensor:
    """The next token of each row [b, 1], picked from fp32 logits as generation's strategies pick (torch's argmax over
    150528 bf16 logits takes ~5x as long as over fp32 ones: 0.55 vs 0.11 ms here)."""
    return logits[:, -1].float().argmax(-1, keepdim=True)


def decode_step(model, next_tokens: torch.Tensor, cache: KVCache, device) -> torch.Tensor:
    """One greedy token per row against the cache; the next tokens [b, 1]."""
    length = cache.length
    logits = model.forward_with_cache(next_tokens, torch.full((next_tokens.shape[0], 1), length, device=device),
                                      torch.zeros(1, 1, 1, length + 1, dtype=torch.bool, device=device), cache)
    return greedy(logits)


def run_decode(model, batch: int, prompt: int, steps: int, device, probe=None, nbytes=None,
               segments: int = 4) -> Dict[str, float]:
    """Prefill `prompt` random tokens per row, then `steps` greedy one-token steps in `segments` stretches with a
    bandwidth probe between stretches; per-step times and per-stretch roofline fractions."""
    tokens = random_text_ids((batch, prompt), torch.Generator().manual_seed(batch), model.config.vocab_size).to(device)
    cache = KVCache(model, batch, prompt + steps)
    start = time.perf_counter()
    logits = prefill(model, tokens, cache, device)
    sync(device)
    prefill_s = time.perf_counter() - start
    nxt = greedy(logits)
    times, fractions = [], []
    bounds = [round(i * steps / segments) for i in range(segments + 1)]
    bw_before = probe() if probe else None
    for seg in range(segments):
        seg_times = []
        for _ in range(bounds[seg], bounds[seg + 1]):
            t0 = time.perf_counter()
            nxt = decode_step(model, nxt, cache, device)
            sync(device)
            seg_times.append(time.perf_counter() - t0)
        times += seg_times
        if probe and seg_times:
            bw_after = probe()
            fractions.append(nbytes * len(seg_times) / sum(seg_times) / max(bw_before, bw_after))
            bw_before = bw_after
    median = statistics.median(times)
    out = {"prefill_ms": prefill_s * 1e3, "step_ms_median": median * 1e3,
           "step_ms_mean": sum(times) / len(times) * 1e3, "tokens_per_s": batch / median,
           "tokens_per_s_mean": batch * len(times) / sum(times), "steps": steps}
    if fractions:
        out["roofline_fraction"] = statistics.median(fractions)
        out["roofline_fraction_segments"] = fractions
    return out


def synthetic_multiple_choice(samples: int, length: int, choices: int = 4, choice_len: int = 3):
    """A batch as evaluation builds it: context + [gMASK], then one causal `[sop] + choice[:-1]` block per choice
    that sees the whole bidirectional context (block-diagonal mask), `length` tokens per sample."""
    gen = torch.Generator().manual_seed(7)
    text_len = length - 1 - choices * choice_len
    layouts, rows, ids = [], [], []
    for _ in range(samples):
        text = random_text_ids((text_len,), gen).tolist()
        opts = [random_text_ids((choice_len,), gen).tolist() for _ in range(choices)]
        layout, r, i = multiple_choice_sample(text, opts, False, SPECIAL_IDS["[gMASK]"], SPECIAL_IDS["sop"],
                                              use_task_mask=True)
        layouts.append(layout)
        rows.append(r)
        ids.append(i)
    batch = collate_layouts(layouts)
    batch["choice_rows"], batch["choice_ids"] = rows, ids
    return batch, choices * choice_len


def run_eval(model, samples: int, length: int, device, results: dict, cfg, prefill_rate: Optional[float]) -> None:
    """Multiple-choice scoring throughput (ModelForEvaluation.cond_log_prob on a synthetic batch)."""
    from evaluation.model import ModelForEvaluation
    batch, scored_rows = synthetic_multiple_choice(samples, length)
    flops = samples * forward_flops(cfg, length, scored_rows) / mpu.get_model_parallel_world_size()
    if prefill_rate is not None and flops / prefill_rate > PHASE_BUDGET_S:
        mpu.print_rank_0(f"Evaluation: n/a (predicted {flops / prefill_rate:.0f} s at this machine's rate: skipped)")
        return
    evaluator = ModelForEvaluation(model)
    evaluator.cond_log_prob(batch)  # warm-up (first use of these shapes)
    t = best_time(lambda: evaluator.cond_log_prob(batch), device, 2)
    results.update({"eval.samples": samples, "eval.tokens_per_sample": length, "eval.ms": t * 1e3,
                    "eval.flops": flops, "eval.flop_per_s": flops / t, "eval.samples_per_s": samples / t})
    mpu.print_rank_0(f"Evaluation: {samples} multiple-choice samples of {length} tokens in {t * 1e3:.1f} ms "
                     f"({flops / t / 1e12:.3f} TFLOP/s)")


def load_model(args, bits, dtype):
    """The model in one weight format: the 16-bit --load quantized while loading, or --load-int8/--load-int4."""
    args.load16 = getattr(args, "load16", args.load)
    converted = getattr(args, f"load_int{bits}", None) if bits else None
    args.quantization_bit_width = bits
    args.from_quantized_checkpoint = converted is not None
    args.load = converted or args.load16
    args.params_dtype = dtype
    return build_model(args)


def free(model) -> None:
    del model
    gc.collect()
