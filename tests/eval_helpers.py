"""Helpers of the evaluation tests: the synthetic data, small task YAMLs, and running evaluate.py in-process."""
import contextlib
import io
import json
import re
from pathlib import Path
from typing import Dict, List

import torch

from tests.helpers import ROOT, fixture_model_args

EVAL_DATA = ROOT / "tests" / "data" / "eval"
TIME = re.compile(r"in \d+\.\ds")


def model_argv(tokenizer_path: str, mp: int = 1) -> List[str]:
    return [*fixture_model_args(mp), "--tokenizer-path", str(tokenizer_path)]


def write_yaml(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def write_jsonl(path: Path, items) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(x, ensure_ascii=False) + "\n" for x in items))
    return path


def read_jsonl(path) -> List[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def run_evaluate(argv: List[str], threads: int = 1) -> str:
    """evaluate.main(argv) in this process; returns what it printed on stdout."""
    import evaluate
    old_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            evaluate.main(argv)
    finally:
        torch.set_num_threads(old_threads)
    return out.getvalue()


def report_lines(stdout: str) -> List[str]:
    """The printed lines (split at newlines only) with task times blanked (they differ from run to run)."""
    lines = stdout.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return [TIME.sub("in T", line) for line in lines]


def load_results(output: Path, task: str) -> Dict:
    return json.loads((output / task / "results.json").read_text())


# Small tasks over tests/data/eval used by several test files (paths relative to the data folder).
SMALL_TASKS = {
    "mul.yaml": "name: 'mul'\ntype: 'mul'\npath: 'bloom/glue_cola'\nfile-pattern:\n  validation: '**/validation.jsonl'\n"
                "micro-batch-size: 2\n",
    "gen.yaml": "name: 'gen'\ntype: 'gen'\npath: 'bloom/mc_taco'\nfile-pattern: '**/*.jsonl'\nuse_task_mask: true\n"
                "max_gen_length: 4\nmicro_batch_size: 2\n",
    "beam.yaml": "name: 'beam'\ntype: 'gen'\npath: 'bloom/mc_taco'\nfile-pattern: '**/*.jsonl'\n"
                 "sampling_strategy: 'BeamSearchStrategy'\nnum_beams: 2\nmax_gen_length: 3\nmicro_batch_size: 2\n",
    "lm.yaml": "name: 'lm'\ntype: 'lm'\npath: 'wikitext-2'\nfile-pattern:\n  test: '**/wiki.test.tokens'\n"
               "max_seq_length: 24\ngeneration_length: 8\nuse_task_mask: true\nmicro_batch_size: 2\n",
}


def write_small_tasks(folder: Path, names=None) -> List[str]:
    names = names or list(SMALL_TASKS)
    return [str(write_yaml(folder / n, SMALL_TASKS[n])) for n in names]
