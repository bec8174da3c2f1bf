"""`glm130b`: an lm-evaluation-harness model that scores the way GLM-130B's own evaluation does, in-process.

Through an OpenAI API every harness scores causally (the context read left to right). GLM-130B's evaluation reads
the context bidirectionally and scores the answer in a blank; this model gives lm-eval that quantity, computed by
the evaluation's own datasets and ModelForEvaluation:
- `loglikelihood(context, continuation)`: evaluate.py's default multiple-choice scoring. The context, with [MASK]
  appended, is read bidirectionally; the continuation is scored in the blank after sop
  (model.layout.multiple_choice_sample). The continuations of one context are the choices of one sample, so the
  context is computed once. Context and continuation are tokenized apart, as the evaluation tokenizes `inputs` and
  `choices`. `is_greedy`: every continuation token is the most likely one at its row.
- `loglikelihood_rolling(text)`: evaluate.py's language-model scoring ([gMASK] windows of max_seq_length - 1 tokens
  advancing by generation_length; LanguageModelTaskDataset), summed over the document's windows.
- `generate_until(context, gen_kwargs)`: generate.py's generation for a prompt without a mask (`context [gMASK] sop`,
  greedy unless do_sample), cut at the first `until` string.

Parallelism: every rank of a tensor-parallel group makes the same calls (lm-eval runs the same on each); lm-eval
shares the documents out over `rank` / `world_size`, the data-parallel rank and size, as evaluate.py shares out
its batches. Only scripts/lm_eval.sh's entry (lm_eval_harness.py) imports this module.
"""
from collections import OrderedDict
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from lm_eval.api.model import LM
from tqdm import tqdm

from evaluation.configs import GenerationTaskConfig, LanguageModelTaskConfig, MultiChoiceTaskConfig, TaskType
from evaluation.dataset import GenerationTaskDataset, LanguageModelTaskDataset, MultiChoiceTaskDataset
from evaluation.model import ModelForEvaluation
from evaluation.utils import pack_by_length
from generation import BaseStrategy, generation_invalid_slices
from model import mpu
from model.errors import UserError

MODEL_NAME = "glm130b"
DEFAULT_BATCH_SIZE = 8
DEFAULT_MAX_GEN_TOKS = 256


class GLM130BHarness(LM):
    """lm-eval's LM over a loaded GLM130B (this rank's shard) and its tokenizer."""

    def __init__(self, model, tokenizer, max_sequence_length: int, batch_size=DEFAULT_BATCH_SIZE,
                 max_seq_length: Optional[int] = None, generation_length: int = 256, **ignored):
        super().__init__()
        self.glm = ModelForEvaluation(model)
        self.tokenizer = tokenizer
        self.max_seq_length = int(max_seq_length or max_sequence_length)
        if not 4 <= self.max_seq_length <= max_sequence_length:
            raise UserError(f"--model_args max_seq_length={self.max_seq_length}: must be between 4 and the model's "
                            f"{max_sequence_length}")
        self.generation_length = int(generation_length)
        self.batch_size = _batch_size(batch_size)
        self.end_tokens = [tokenizer.get_command("eop"), tokenizer.get_command("eos")]

    # --- lm-eval's distributed interface: the data-parallel group ---------------------------------------------
    @property
    def rank(self) -> int:
        return mpu.get_data_parallel_rank()

    @property
    def world_size(self) -> int:
        return mpu.get_data_parallel_world_size()

    @property
    def device(self) -> torch.device:
        return self.glm.device

    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        parts = [torch.as_tensor(p) for p in mpu.all_gather_object_data_parallel(tensor.cpu())]
        return torch.stack(parts) if tensor.dim() == 0 else torch.cat(parts)

    def gather_object(self, obj, dst=0):
        gathered = mpu.all_gather_object_data_parallel(obj)
        return gathered if self.rank == dst else None

    def barrier(self) -> None:
        mpu.barrier()

    # --- the three request types ---------------------------------------------------------------------------------
    def loglikelihood(self, requests, disable_tqdm: bool = False) -> List[Tuple[float, bool]]:
        samples: Dict[Tuple[int, ...], int] = {}  # context ids -> sample index
        items: List[Dict[str, Any]] = []
        where = []  # per request: (sample index, choice index)
        for context, continuation in (r.args for r in requests):
            key = tuple(self.tokenizer.tokenize(context)) if context else ()
            if key not in samples:
                samples[key] = len(items)
                items.append({"inputs": list(key), "choices": [], "label": 0})
            choices = items[samples[key]]["choices"]
            where.append((samples[key], len(choices)))
            choices.append(self.tokenizer.tokenize(continuation.lstrip()))
        config = MultiChoiceTaskConfig(name=MODEL_NAME, type=TaskType.MULTICHOICE, path="",
                                       max_seq_length=self.max_seq_length, micro_batch_size=self.batch_size)
        dataset = MultiChoiceTaskDataset("<lm-eval loglikelihood requests>", config, self.tokenizer, items=items)
        scores: Dict[int, Tuple[List[float], List[bool]]] = {}
        for indices in self._batches(dataset, "loglikelihood", disable_tqdm):
            logprobs, greedy = self.glm.cond_log_prob(dataset.collate(indices), greedy=True)
            scores.update({i: pair for i, pair in zip(indices, zip(logprobs, greedy))})
        return [(scores[s][0][c], scores[s][1][c]) for s, c in where]

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> List[float]:
        config = LanguageModelTaskConfig(name=MODEL_NAME, type=TaskType.LANGUAGE_MODEL, path="", use_task_mask=True,
                                         max_seq_length=self.max_seq_length, micro_batch_size=self.batch_size,
                                         generation_length=self.generation_length)
        dataset = LanguageModelTaskDataset("<lm-eval loglikelihood_rolling requests>", config, self.tokenizer,
                                           items=[r.args[0] for r in requests])
        totals = [0.0] * len(requests)
        for indices in self._batches(dataset, "loglikelihood_rolling", disable_tqdm):
            for i, loss in zip(indices, self.glm.calculate_loss(dataset.collate(indices))):
                totals[dataset.locate(i)[0]] -= loss
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> List[str]:
        groups: "OrderedDict[str, List[int]]" = OrderedDict()  # requests with the same generation settings
        for k, r in enumerate(requests):
            groups.setdefault(repr(sorted(r.args[1].items())), []).append(k)
        out: List[Optional[str]] = [None] * len(requests)
        for members in groups.values():
            kwargs = dict(requests[members[0]].args[1])
            until = kwargs.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            max_gen = min(int(kwargs.pop("max_gen_toks", DEFAULT_MAX_GEN_TOKS)), self.max_seq_length - 3)
            config = GenerationTaskConfig(name=MODEL_NAME, type=TaskType.GENERATION, path="", use_task_mask=True,
                                          max_seq_length=self.max_seq_length, micro_batch_size=self.batch_size,
                                          max_gen_length=max_gen)
            items = [{"inputs": self.tokenizer.tokenize(requests[k].args[0])} for k in members]
            dataset = GenerationTaskDataset("<lm-eval generate_until requests>", config, self.tokenizer, items=items)
            for indices in self._batches(dataset, "generate_until", disable_tqdm):
                strategy = self._strategy(len(indices), kwargs)
                for i, ids in zip(indices, self.glm.generate_text(dataset.collate(indices), strategy)):
                    out[members[i]] = _cut(self.tokenizer.detokenize(ids), until)
        return out

    # --- helpers -------------------------------------------------------------------------------------------------
    def _batches(self, dataset, what: str, disable_tqdm: bool) -> List[List[int]]:
        batches = pack_by_length([dataset.sample_length(i) for i in range(len(dataset))], self.batch_size)
        return tqdm(batches, desc=f"glm130b {what}", unit="batch", disable=disable_tqdm or mpu.get_rank() != 0)

    def _strategy(self, batch_size: int, kwargs: Dict[str, Any]) -> BaseStrategy:
        """generate.py's BaseStrategy: greedy (top_k 1) unless do_sample with a temperature above 0."""
        temperature = float(kwargs.get("temperature", 0.0) or 0.0)
        sample = bool(kwargs.get("do_sample", False)) and temperature > 0
        invalid = generation_invalid_slices(self.tokenizer, self.end_tokens)
        if not sample:
            return BaseStrategy(batch_size=batch_size, temperature=1.0, top_k=1, end_tokens=self.end_tokens,
                                invalid_slices=invalid)
        return BaseStrategy(batch_size=batch_size, temperature=temperature, top_k=int(kwargs.get("top_k", 0) or 0),
                            top_p=float(kwargs.get("top_p", 0.0) or 0.0), end_tokens=self.end_tokens,
                            invalid_slices=invalid)


def _cut(text: str, until: Sequence[str]) -> str:
    """The text up to the first of the stop strings (lm-eval's `until`)."""
    for stop in until:
        if stop and stop in text:
            text = text[:text.index(stop)]
    return text


def _batch_size(value) -> int:
    """lm-eval's --batch_size: a number, or "auto" (this model's default: it packs inputs by length itself)."""
    if value is None or str(value).startswith("auto"):
        return DEFAULT_BATCH_SIZE
    try:
        size = int(value)
    except (TypeError, ValueError):
        raise UserError(f"--batch_size {value!r}: give a number of samples per forward, or auto") from None
    if size < 1:
        raise UserError(f"--batch_size must be at least 1, got {size}")
    return size


def register(model, tokenizer, max_sequence_length: int) -> None:
    """Make `--model glm130b` build a GLM130BHarness over this process's loaded model (lm-eval's registry)."""
    from lm_eval.api.registry import register_model
    from lm_eval.utils import simple_parse_args_string

    class Loaded(GLM130BHarness):
        @classmethod
        def create_from_arg_string(cls, arg_string: str, additional_config: Optional[dict] = None):
            options = {k: v for k, v in (additional_config or {}).items() if v is not None}
            return cls(model, tokenizer, max_sequence_length, **{**options, **simple_parse_args_string(arg_string)})

        @classmethod
        def create_from_arg_obj(cls, arg_dict: dict, additional_config: Optional[dict] = None):
            options = {k: v for k, v in (additional_config or {}).items() if v is not None}
            return cls(model, tokenizer, max_sequence_length, **{**options, **arg_dict})

    register_model(MODEL_NAME)(Loaded)
