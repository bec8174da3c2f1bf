"""Evaluate GLM-130B on YAML tasks (the original's evaluate.py, plus saved predictions, resume and --limit).

    torchrun --nproc_per_node MP evaluate.py --data-path DATA --task tasks/bloom/glue_cola.yaml tasks/mmlu ... MODEL_ARGS

--task takes YAML files and folders (searched recursively). Each task's `path` is joined to --data-path. Results go to
<output-path>/<task name>/results.json and predictions/<data file>.jsonl; a rerun skips the files already done with
the same config, checkpoint and --limit.
"""
import importlib
import os
import sys
import time
import warnings
from typing import List, Tuple, Type

from evaluation import DEFAULT_CLASS, ModelForEvaluation, RunOptions, print_rank_0
from evaluation.configs import BaseConfig, build_config, read_yaml, task_type_of
from evaluation.metrics import resolve_metrics
from evaluation.tasks import BaseTask, find_data_files
from evaluation.utils import check_readable_folder, match_files
from model import mpu
from model.errors import UserError, main_entry


def add_evaluation_args(parser):
    group = parser.add_argument_group("evaluation")
    group.add_argument("--task", nargs="+", default=[], help="task YAML files and/or folders of them (recursive)")
    group.add_argument("--data-path", required=True, help="base folder of the evaluation data (see docs/evaluation-data.md)")
    group.add_argument("--output-path", default="outputs",
                       help="results.json and predictions/ per task go to OUTPUT_PATH/<task name>/ (default: outputs)")
    group.add_argument("--limit", type=int, default=None,
                       help="evaluate only the first N samples of each data file (windows for plain-text LM files)")


def find_all_tasks(entries: List[str]) -> List[str]:
    """YAML files named directly, and every *.yaml under each folder (recursively, sorted)."""
    found = []
    for entry in entries:
        if os.path.isdir(entry):
            yamls = [os.path.relpath(os.path.join(entry, p)) for p in match_files(entry, "**/*.yaml")]
            if not yamls:
                raise UserError(f"--task {entry}: no task YAML (*.yaml) in this folder or below it")
            found.extend(yamls)
        elif os.path.isfile(entry):
            found.append(entry)
        else:
            raise UserError(f"--task {entry}: no such file or folder")
    return found


def load_task_class(module: str, config_path: str) -> Type[BaseTask]:
    """`package.module.ClassName` (folders with dashes work, e.g. tasks.ethnic.crows-pair.tasks.CrowsPairTask)."""
    module_name, _, class_name = module.rpartition(".")
    if not module_name:
        raise UserError(f"{config_path}: field 'module' must be package.module.ClassName, got {module!r}")
    try:
        mod = importlib.import_module(module_name)
    except ImportError as e:
        raise UserError(f"{config_path}: field 'module': cannot import {module_name} ({e}); run from the "
                        f"repository root or put the package on PYTHONPATH") from None
    cls = getattr(mod, class_name, None)
    if not (isinstance(cls, type) and issubclass(cls, BaseTask)):
        raise UserError(f"{config_path}: field 'module': {module_name} has no task class {class_name}")
    return cls


def load_task(path: str) -> Tuple[Type[BaseTask], BaseConfig]:
    raw = read_yaml(path)
    task_type = task_type_of(raw, path)
    module = raw.get("module")
    if module is not None and not isinstance(module, str):
        raise UserError(f"{path}: field 'module' must be a dotted class path such as tasks.mmlu.task.MMLU")
    if module:
        cls = load_task_class(module, path)
    elif task_type in DEFAULT_CLASS:
        cls = DEFAULT_CLASS[task_type]
    else:
        raise UserError(f"{path}: field 'type' {task_type.value!r} has no default task class; "
                        f"set 'module' to a custom one")
    config = build_config(raw, cls.config_class(), path)
    if cls.metrics is BaseTask.metrics:  # metric names come from the YAML: check them before the model loads
        resolve_metrics(config.metrics, path)
    return cls, config


def checkpoint_identity(args, tokenizer) -> dict:
    """What makes two runs' predictions interchangeable (part of the resume key)."""
    load = os.path.realpath(args.load) if args.load else None
    try:
        with open(os.path.join(load, "latest")) as f:
            iteration = f.read().strip()
    except (OSError, TypeError):
        iteration = None
    names = ["num_layers", "hidden_size", "num_attention_heads", "inner_hidden_size", "vocab_size",
             "max_sequence_length", "layernorm_epsilon", "fp16", "bf16", "fp32", "exact_rope", "attention",
             "quantization_bit_width"]
    return {"load": load, "iteration": iteration, "tokenizer": getattr(tokenizer, "model_path", None),
            **{n: getattr(args, n, None) for n in names}}


def _one_line_warnings():
    def show(message, category, filename, lineno, file=None, line=None):
        if mpu.get_rank() == 0:
            print(f"warning: {message}", file=sys.stderr, flush=True)
    warnings.showwarning = show


@main_entry
def main(argv=None):
    from initialize import initialize, initialize_model_and_tokenizer
    args = initialize(add_evaluation_args, argv)
    _one_line_warnings()
    if args.limit is not None and args.limit < 1:
        raise UserError(f"--limit must be at least 1, got {args.limit}")
    check_readable_folder(args.data_path, "--data-path")
    if not args.task:
        raise UserError("no task given: pass --task with task YAML files or folders (e.g. --task tasks/mmlu)")
    print_rank_0("> Loading task configs")
    tasks = []
    for path in find_all_tasks(args.task):
        cls, config = load_task(path)
        tasks.append((path, cls, config))
        print_rank_0(f"    Task {config.name} loaded from config {path}")
    print_rank_0(f"> Successfully load {len(tasks)} task(s)")
    for _, _, config in tasks:  # missing data fails now, not after the model has loaded
        config.path = os.path.join(args.data_path, config.path)
        find_data_files(config)

    model, tokenizer = initialize_model_and_tokenizer(args)
    model = ModelForEvaluation(model)
    options = dict(output_path=args.output_path, limit=args.limit, seed=args.seed,
                   checkpoint=checkpoint_identity(args, tokenizer))
    start = time.time()
    for path, cls, config in tasks:
        task = cls(model, tokenizer, config, RunOptions(config_path=path, **options))
        task.evaluate()
    print_rank_0(f"Finish {len(tasks)} task(s) in {time.time() - start:.1f}s")


if __name__ == "__main__":
    main()
