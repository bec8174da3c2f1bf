"""Task classes: file groups and the evaluation loop (saved predictions and resume: evaluation/records.py; the
original's report lines: evaluation/report.py).

A task evaluates every data file of every group: model inputs are packed into micro-batches of similar length,
the batches are dealt round-robin to the data-parallel ranks, and the per-input records are gathered back in data
order. Records are what is saved (`predictions/<file>.jsonl`) and what the metrics are computed from, so a resumed
file gives exactly the numbers of a fresh run.
"""
import os
import sys
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Type

import numpy as np
import torch
from tqdm import tqdm

from evaluation.configs import (BaseConfig, GenerationTaskConfig, LanguageModelTaskConfig, MultiChoiceTaskConfig,
                                TaskType)
from evaluation.dataset import (EvaluationDataset, GenerationTaskDataset, LanguageModelTaskDataset,
                                MultiChoiceTaskDataset)
from evaluation.metrics import call_metric, decode_text, resolve_metrics
from evaluation.records import RecordStore, config_dict, jsonable
from evaluation.report import group_metrics, print_file_metrics, print_group_metrics
from evaluation.utils import (check_readable_folder, gather_records, is_rank_0, match_files, pack_by_length,
                              print_rank_0, shard_batches)
from model import mpu
from model.errors import UserError


@dataclass
class RunOptions:
    """What evaluate.py adds to the original's behaviour (all optional for programmatic use)."""
    output_path: Optional[str] = None  # None: no results.json / predictions / resume
    limit: Optional[int] = None  # model inputs per file (samples; windows for plain-text LM files)
    seed: int = 1234  # torch seed set before each file
    checkpoint: Any = None  # identity of the weights, part of the resume key
    progress: bool = True  # tqdm bar per file on rank 0
    config_path: Optional[str] = None  # the YAML the config came from (for error messages)


def find_data_files(config: BaseConfig) -> Dict[str, List[str]]:
    """{group: sorted files relative to config.path} for the file pattern(s) (recursive globs; each real folder
    entered once, so symlink loops are followed once)."""
    check_readable_folder(config.path, f"task {config.name}: data folder",
                          " (--data-path joined with the config's path); see docs/evaluation-data.md")
    patterns = {"all": config.file_pattern} if isinstance(config.file_pattern, str) else config.file_pattern
    groups = {name: match_files(config.path, pattern) for name, pattern in patterns.items()}
    if not any(groups.values()):
        shown = ", ".join(f"{k}: {v}" for k, v in patterns.items())
        raise UserError(f"task {config.name}: no data file under {config.path} matches file_pattern ({shown}); "
                        f"see docs/evaluation-data.md")
    return groups


class BaseTask(ABC):
    """One task: `evaluate()` runs every file and prints the original's log lines; returns the results dict."""

    dataset_class: Type[EvaluationDataset] = EvaluationDataset
    prediction_key = "prediction"  # the record field the metrics see

    @classmethod
    def config_class(cls) -> Type[BaseConfig]:
        return BaseConfig

    def __init__(self, model, tokenizer, config: BaseConfig, options: Optional[RunOptions] = None):
        self.model = model
        self.tokenizer = tokenizer
        self.config = config
        self.options = options or RunOptions()
        self.config.metrics = list(self.metrics.keys())
        self.file_groups = self.get_file_groups()
        self.verbose = is_rank_0()
        self.store = RecordStore(self.task_dir())

    @property
    def metrics(self) -> Dict[str, Callable]:
        return resolve_metrics(self.config.metrics, self.options.config_path or f"task {self.config.name}")

    # ---- files --------------------------------------------------------------------------------------------------

    def get_file_groups(self) -> Dict[str, List[str]]:
        return find_data_files(self.config)

    def build_dataset(self, relative_path: str) -> EvaluationDataset:
        return self.dataset_class(os.path.join(self.config.path, relative_path), self.config, self.tokenizer,
                                  limit=self.options.limit)

    # ---- the loop -----------------------------------------------------------------------------------------------

    def evaluate(self) -> Dict[str, Any]:
        mpu.barrier()
        start = time.time()
        print_rank_0("\n")
        print_rank_0(f"{self.config}")
        print_rank_0(f"Evaluating task {self.config.name}:")
        result_dict_all: Dict[str, Dict[str, Tuple[Dict[str, Any], int]]] = {}
        for group_name, files in self.file_groups.items():
            print_rank_0(f"    Evaluating group {group_name}:")
            result_dict_group = {}
            for file in files:
                result = self.evaluate_file(file)
                if result is not None:
                    result_dict_group[file] = result
                    if self.verbose:
                        self.report_single_metrics(file, result[0])
            result_dict_all[group_name] = result_dict_group
        print_rank_0(f"Evaluation results of task {self.config.name}:")
        results = None
        if self.verbose:
            for group_name, result_dict_group in result_dict_all.items():
                if result_dict_group:
                    self.report_group_metrics(group_name, result_dict_group)
            self.report_overall_metrics({k: v for group in result_dict_all.values() for k, v in group.items()})
            results = self.results_json(result_dict_all)
            self.store.write_results(results)
        print_rank_0(f"Finish task {self.config.name} in {time.time() - start:.1f}s.")
        return results

    def evaluate_file(self, file: str) -> Optional[Tuple[Dict[str, Any], int]]:
        """(metric values, number of samples) on rank 0; None elsewhere."""
        key = self.resume_key(file) if is_rank_0() else None
        records = self.load_records(file, key) if is_rank_0() else None
        dataset = None
        if records is not None:  # resumed only if complete and consistent with the data as it is now
            dataset = self.build_dataset(file)
            problem = self.records_problem(records, dataset)
            if problem is not None:
                print(f"warning: {self.store.predictions_path(file)}: {problem}; recomputing {file}",
                      file=sys.stderr, flush=True)
                records = None
        resumed = mpu.broadcast_object(records is not None)
        if dataset is None and (not resumed or is_rank_0()):
            dataset = self.build_dataset(file)
        if not resumed:
            torch.manual_seed(self.options.seed)
            records = self.run_file(dataset, file)
            if is_rank_0():
                self.save_records(file, key, records)
        if not is_rank_0():
            return None
        predictions = self.predictions_from_records(records, dataset)
        result = {name: call_metric(fn, predictions, dataset.data, self.tokenizer)
                  for name, fn in self.metrics.items()}
        return result, len(dataset)

    def run_file(self, dataset: EvaluationDataset, file: str) -> List[dict]:
        """Every model input of the file, packed, shared out over the data-parallel ranks, gathered in order."""
        lengths = [dataset.sample_length(i) for i in range(len(dataset))]
        batches = pack_by_length(lengths, self.config.micro_batch_size, self.same_length_batches())
        mine = shard_batches(batches, mpu.get_data_parallel_rank(), mpu.get_data_parallel_world_size())
        local = {}
        bar = tqdm(total=sum(len(b) for b in mine), desc=file, unit="sample", leave=False, dynamic_ncols=True,
                   disable=not (self.options.progress and is_rank_0()))
        with bar:
            for indices in mine:
                batch = dataset.collate(indices)
                for i, record in zip(indices, self.predict_batch(batch, indices, dataset)):
                    local[i] = {"index": i, **record}
                bar.update(len(indices))
        return gather_records(local, len(dataset))

    def same_length_batches(self) -> bool:
        """True when right padding would change results, so micro-batches must not mix input lengths."""
        return False

    @abstractmethod
    def predict_batch(self, batch: Dict[str, Any], indices: Sequence[int], dataset: EvaluationDataset) -> List[dict]:
        """One record (a JSON-able dict, without "index") per model input of the batch."""

    def predictions_from_records(self, records: List[dict], dataset: EvaluationDataset) -> List[Any]:
        return [r[self.prediction_key] for r in records]

    # ---- saved predictions and resume (evaluation/records.py) ----------------------------------------------------

    def task_dir(self) -> Optional[str]:
        if self.options.output_path is None:
            return None
        return os.path.join(self.options.output_path, self.config.name.replace(os.sep, "_"))

    def resume_key(self, file: str) -> Optional[str]:
        identity = {"task_class": f"{type(self).__module__}.{type(self).__qualname__}",
                    "config": config_dict(self.config), "checkpoint": self.options.checkpoint,
                    "limit": self.options.limit, "file": file}
        return self.store.resume_key(identity, os.path.join(self.config.path, file))

    def load_records(self, file: str, key: Optional[str]) -> Optional[List[dict]]:
        return self.store.load(file, key)

    def record_fields(self) -> Tuple[str, ...]:
        """Fields every saved record needs besides "index" (those predictions_from_records reads)."""
        return (self.prediction_key,)

    def records_problem(self, records: List[Any], dataset: EvaluationDataset) -> Optional[str]:
        """Why saved records cannot stand for this file (None: they can): one record per model input, in order,
        each with the fields the metrics read."""
        if len(records) != len(dataset):
            return f"it holds {len(records)} record(s) for {len(dataset)} model input(s)"
        for i, record in enumerate(records):
            if not isinstance(record, dict) or record.get("index") != i:
                return f"record {i + 1} is not the record of model input {i}"
            missing = [f for f in self.record_fields() if f not in record]
            if missing:
                return f"record {i + 1} lacks field '{missing[0]}'"
        return None

    def save_records(self, file: str, key: Optional[str], records: List[dict]) -> None:
        self.store.save(file, key, records)

    def results_json(self, result_dict_all) -> Dict[str, Any]:
        files = {file: {**jsonable(result), "n": n}
                 for group in result_dict_all.values() for file, (result, n) in group.items()}
        groups = {name: self.calc_group_metrics(group) for name, group in result_dict_all.items() if group}
        results = {"task": self.config.name, "config": config_dict(self.config), "files": files, "groups": groups}
        results["run"] = jsonable({"checkpoint": self.options.checkpoint, "limit": self.options.limit,
                                   "seed": self.options.seed})
        overall = self.overall_metrics({k: v for group in result_dict_all.values() for k, v in group.items()})
        if overall is not None:
            results["overall"] = overall
        return results

    def overall_metrics(self, result_dict_all) -> Optional[Dict[str, Any]]:
        """Statistics over the files of all groups for results.json (None: the task reports none)."""
        return None

    # ---- reports (the original's lines, evaluation/report.py; custom tasks override these hooks) -----------------

    def report_single_metrics(self, file: str, result_dict: Dict[str, Any]) -> None:
        print_file_metrics(file, result_dict)

    @staticmethod
    def calc_group_metrics(result_dict_group: Dict[str, Tuple[Dict[str, Any], int]]) -> Dict[str, Any]:
        return group_metrics(result_dict_group)

    def report_group_metrics(self, group_name: str, result_dict_group, level: int = 1) -> None:
        print_group_metrics(group_name, self.calc_group_metrics(result_dict_group), level)

    def report_overall_metrics(self, result_dict_all) -> None:
        pass


class MultiChoiceTask(BaseTask, ABC):
    """Prediction = the choice with the highest summed log-probability (the first one on ties)."""

    config: MultiChoiceTaskConfig
    dataset_class = MultiChoiceTaskDataset

    @classmethod
    def config_class(cls):
        return MultiChoiceTaskConfig

    def predict_batch(self, batch, indices, dataset):
        log_probs = self.model.cond_log_prob(batch)
        return [{"prediction": self.choose(lp, dataset.data[i]), "choice_logprobs": lp}
                for i, lp in zip(indices, log_probs)]

    def choose(self, log_probs: List[float], example: dict) -> Any:
        return int(np.argmax(log_probs))


class GenerationTask(BaseTask, ABC):
    """Greedy (BaseStrategy, top_k=1) or deterministic beam search; prediction = the generated ids."""

    config: GenerationTaskConfig
    dataset_class = GenerationTaskDataset
    prediction_key = "prediction_ids"

    @classmethod
    def config_class(cls):
        return GenerationTaskConfig

    def __init__(self, model, tokenizer, config: GenerationTaskConfig, options: Optional[RunOptions] = None):
        super().__init__(model, tokenizer, config, options)
        self.end_tokens = [tokenizer.get_command("eop"), tokenizer.get_command("eos")]

    def make_strategy(self, batch_size: int):
        from generation import BaseStrategy, BeamSearchStrategy
        c = self.config
        if c.sampling_strategy == "BaseStrategy":
            return BaseStrategy(batch_size=batch_size, temperature=1.0, top_k=1, end_tokens=self.end_tokens)
        if c.sampling_strategy == "BeamSearchStrategy":
            return BeamSearchStrategy(batch_size, c.num_beams, length_penalty=c.length_penalty, consider_end=True,
                                      end_tokens=self.end_tokens, no_repeat_ngram_size=c.no_repeat_ngram_size,
                                      min_gen_length=c.min_gen_length, deterministic=True)
        raise ValueError(f"unknown strategy {c.sampling_strategy}")

    def same_length_batches(self) -> bool:
        # Beam search bans repeated n-grams whose prefix may reach back into the context, where right padding
        # would sit between the context and the generated tokens.
        c = self.config
        return c.sampling_strategy == "BeamSearchStrategy" and c.no_repeat_ngram_size > 0

    def generate(self, batch, return_all_beams=False):
        return self.model.generate_text(batch, self.make_strategy(len(batch["tokens"])), return_all_beams)

    def predict_batch(self, batch, indices, dataset):
        return [{"prediction_ids": ids, "prediction_text": decode_text(self.tokenizer, ids)}
                for ids in self.generate(batch)]


class LanguageModelTask(BaseTask, ABC):
    """Prediction = the summed loss of each window; PPL over the whole file."""

    config: LanguageModelTaskConfig
    dataset_class = LanguageModelTaskDataset
    prediction_key = "loss"

    @classmethod
    def config_class(cls):
        return LanguageModelTaskConfig

    def predict_batch(self, batch, indices, dataset):
        losses = self.model.calculate_loss(batch)
        counts = batch["loss_mask"].sum(dim=-1).long().tolist()
        return [{"loss": loss, "tokens": n} for loss, n in zip(losses, counts)]


DEFAULT_CLASS = {
    TaskType.GENERATION: GenerationTask,
    TaskType.MULTICHOICE: MultiChoiceTask,
    TaskType.LANGUAGE_MODEL: LanguageModelTask,
}
