"""Tensor parallelism: 2 gloo processes generate exactly what one process does, and agree when sampling.

Run by pytest; torchrun also runs this file as the worker (`python tests/test_generation_tp.py OUT TOKENIZER`).
"""
import sys
from pathlib import Path

if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from generation import (BaseStrategy, BeamSearchStrategy, batch_filling_sequence, fill_blanks_batch,  # noqa: E402
                        generation_invalid_slices, generation_layout)
from tests.helpers import fixture_cases, load_fixture_model, logits_error, reference, torchrun  # noqa: E402


END = [150005, 20002]
TEXT_ONLY = [slice(0, 20000), slice(150000, None)]
TEXTS = ["The capital of France is [MASK].", "Tell me a story about a cat.", "清华大学位于[MASK]，[MASK]。"]


class RecordingGreedy(BaseStrategy):
    def __init__(self):
        super().__init__(top_k=1, end_tokens=END, invalid_slices=TEXT_ONLY)
        self.rows = []

    def forward(self, logits, tokens, mems=None, temperature=None):
        self.rows.append(logits.reshape(-1, logits.shape[-1]).float().clone())
        return super().forward(logits, tokens, mems, temperature)


def fixture_greedy(model):
    prompt = fixture_cases()["gen"]["prompt"]
    seqs, lengths, layout = generation_layout([prompt], [len(prompt) - 2], [True], 8)
    strategy = RecordingGreedy()
    tokens, _ = batch_filling_sequence(model, seqs, lengths, strategy, layout)
    return tokens[0, 0, len(prompt):].numpy(), torch.cat(strategy.rows).numpy()


def sampled(model, tokenizer):
    """Sampling and sampled beam search with a different random seed on every rank."""
    invalid = generation_invalid_slices(tokenizer)
    base = BaseStrategy(top_k=0, top_p=0.95, temperature=1.5, end_tokens=END, invalid_slices=invalid)
    beams = BeamSearchStrategy(1, 3, length_penalty=1.0, consider_end=True, end_tokens=END, invalid_slices=invalid,
                               no_repeat_ngram_size=2, deterministic=False)
    limits = dict(max_new_tokens=6, max_sequence_length=128)
    return ([r.answers for r in fill_blanks_batch(TEXTS, model, tokenizer, base, **limits)]
            + [r.answers for r in fill_blanks_batch(TEXTS[:2], model, tokenizer, beams, **limits)])


def greedy_answers(model, tokenizer):
    greedy = BaseStrategy(top_k=1, end_tokens=END, invalid_slices=generation_invalid_slices(tokenizer))
    return [r.answers for r in fill_blanks_batch(TEXTS, model, tokenizer, greedy, max_new_tokens=6,
                                                 max_sequence_length=128)]


def worker(out: str, tokenizer_path: str) -> None:
    import torch.distributed as dist

    from initialize import initialize
    from model import mpu
    from model.tokenizer import IceTokenizer
    from tests.helpers import fixture_model_args

    initialize(argv=fixture_model_args(mp=2))
    rank = mpu.get_model_parallel_rank()
    model = load_fixture_model(ckpt="ckpt_tp2", mp_rank=rank, mp_size=2)
    tokenizer = IceTokenizer(tokenizer_path)
    generated, rows = fixture_greedy(model)
    greedy = greedy_answers(model, tokenizer)
    torch.manual_seed(1000 + rank)  # the ranks' generators differ on purpose
    seeds = [None, None]
    dist.all_gather_object(seeds, torch.rand(1).item())
    samples = sampled(model, tokenizer)
    all_samples = [None, None]
    dist.all_gather_object(all_samples, samples)
    if rank == 0:
        np.savez(out, generated=generated, rows=rows, greedy=np.array(greedy, dtype=object),
                 generators_differ=seeds[0] != seeds[1], ranks_agree=all_samples[0] == all_samples[1],
                 samples=np.array(all_samples, dtype=object))


def test_tp2_generation_equals_tp1_and_ranks_agree(tmp_path, test_tokenizer_path, test_tokenizer):
    out = tmp_path / "tp2.npz"
    proc = torchrun(Path(__file__), [out, test_tokenizer_path], nprocs=2, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = np.load(out, allow_pickle=True)
    assert result["generated"].tolist() == fixture_cases()["gen"]["generated"]
    assert logits_error(torch.tensor(result["rows"]), reference("mp2_fp32"), "gen_step_logits") <= 2e-4
    assert logits_error(torch.tensor(result["rows"]), reference("mp1_fp32"), "gen_step_logits") <= 2e-4
    tp1 = load_fixture_model()
    assert result["greedy"].tolist() == greedy_answers(tp1, test_tokenizer)
    assert bool(result["generators_differ"]) and bool(result["ranks_agree"])  # broadcast decisions, not seeds


if __name__ == "__main__":
    from model.errors import main_entry
    main_entry(worker)(sys.argv[1], sys.argv[2])  # destroys the process group at exit, as the entry scripts do
