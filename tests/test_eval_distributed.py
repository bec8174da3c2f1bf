"""Data- and tensor-parallel evaluation with real processes (gloo on CPU) give the single-process results.

- torchrun, 2 processes, data parallel: bit-identical records (the same micro-batches are computed, only by
  different ranks);
- torchrun, 2 processes, tensor parallel (ckpt_tp2): the same predictions and report, numbers within tolerance;
- scripts/evaluate_multiple_node.sh: the DeepSpeed launcher with a two-host hostfile, one launcher per "node"
  (--no_ssh --node_rank 0/1 on 127.0.0.1), the model split 2-way across the two nodes (TP=2): the same
  predictions and report, log-probs and losses within float tolerance.
"""
import os
import subprocess
from pathlib import Path

import pytest

from tests.eval_helpers import (EVAL_DATA, model_argv, read_jsonl, report_lines, run_evaluate, write_small_tasks)
from tests.helpers import ROOT, free_port, torchrun

TASKS = ["mul.yaml", "gen.yaml", "beam.yaml", "lm.yaml"]
PREDICTIONS = {"mul": "prompt_a/validation.jsonl", "gen": "prompt_a/validation_pp.jsonl",
               "beam": "prompt_a/validation_pp.jsonl", "lm": "wiki.test.tokens"}


@pytest.fixture(scope="module")
def single_run(tmp_path_factory, test_tokenizer_path):
    tmp = tmp_path_factory.mktemp("single")
    tasks = write_small_tasks(tmp / "tasks", TASKS)
    stdout = run_evaluate(["--data-path", str(EVAL_DATA), "--output-path", str(tmp / "out"), "--task", *tasks,
                           *model_argv(test_tokenizer_path)])
    return tmp, tasks, stdout


def _records(out: Path, task: str):
    return read_jsonl(out / task / "predictions" / (PREDICTIONS[task] + ".jsonl"))


def _close(a, b, tol):
    if isinstance(a, float) or isinstance(b, float):
        return abs(a - b) <= tol * max(1.0, abs(a))
    if isinstance(a, list):
        return len(a) == len(b) and all(_close(x, y, tol) for x, y in zip(a, b))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_close(a[k], b[k], tol) for k in a)
    return a == b


def _stdout_lines(text):
    """The report, without launcher log lines and with progress bars (ended by carriage returns) removed."""
    lines = [line.split("\r")[-1] for line in report_lines(text)]
    lines = [line for line in lines if not line.startswith(("[20", "> Model initialized"))]
    return lines[lines.index("> Loading task configs"):]


def test_two_process_data_parallel_equals_single_process(single_run, tmp_path, test_tokenizer_path):
    tmp, tasks, stdout = single_run
    out = tmp_path / "out"
    proc = torchrun(ROOT / "evaluate.py", ["--data-path", EVAL_DATA, "--output-path", out, "--task", *tasks,
                                           *model_argv(test_tokenizer_path)], nprocs=2, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for task in PREDICTIONS:
        assert _records(out, task) == _records(tmp / "out", task), task
    assert _stdout_lines(proc.stdout) == _stdout_lines(stdout)


def test_tensor_parallel_two_processes_equals_single_process(single_run, tmp_path, test_tokenizer_path):
    tmp, tasks, stdout = single_run
    out = tmp_path / "out"
    proc = torchrun(ROOT / "evaluate.py", ["--data-path", EVAL_DATA, "--output-path", out, "--task", *tasks,
                                           *model_argv(test_tokenizer_path, 2)], nprocs=2, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for task in PREDICTIONS:
        assert _close(_records(out, task), _records(tmp / "out", task), 1e-4), task
    assert _stdout_lines(proc.stdout) == _stdout_lines(stdout)


def test_two_nodes_through_the_deepspeed_launcher_with_tp2(single_run, tmp_path, test_tokenizer_path):
    tmp, tasks, stdout = single_run
    config = tmp_path / "model_fixture_tp2.sh"
    tp2 = ROOT / "tests/data/sat-parity-tiny/ckpt_tp2"
    config.write_text(f'CHECKPOINT_PATH="{tp2}"\nMP_SIZE=2\nMODEL_ARGS="{" ".join(model_argv(test_tokenizer_path, 2))}"\n')
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node-a slots=1\nnode-b slots=1\n")
    out = tmp_path / "out"
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MODEL_CONFIG": str(config), "DATA_PATH": str(EVAL_DATA),
           "HOST_FILE_PATH": str(hostfile), "NUM_WORKERS": "2", "NUM_GPUS_PER_WORKER": "1"}
    procs = []
    for node in (0, 1):
        node_env = {**env, "DEEPSPEED_ARGS": f"--no_ssh --node_rank {node} --master_addr 127.0.0.1 --master_port {port}"}
        (tmp_path / f"node{node}").mkdir()
        procs.append(subprocess.Popen(["bash", str(ROOT / "scripts/evaluate_multiple_node.sh"), *tasks,
                                       "--output-path", str(out)], cwd=tmp_path / f"node{node}", env=node_env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
    logs = [p.communicate(timeout=300)[0].decode() for p in procs]  # bytes: keep the progress bars' \r
    assert [p.returncode for p in procs] == [0, 0], logs[0][-3000:] + logs[1][-3000:]
    for task in PREDICTIONS:
        assert _close(_records(out, task), _records(tmp / "out", task), 1e-4), task
    assert _stdout_lines(logs[0]) == _stdout_lines(stdout)
    log_files = list((tmp_path / "node0" / "logs").glob("*.log"))
    assert len(log_files) == 1 and "Finish 4 task(s)" in log_files[0].read_text()
    assert _stdout_lines(log_files[0].read_bytes().decode()) == _stdout_lines(stdout)
