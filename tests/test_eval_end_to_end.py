"""evaluate.py end to end on the synthetic data: report lines, results.json, predictions, resume, --limit, errors."""
import math
import subprocess
import sys

import numpy as np
import pytest

from evaluation.metrics import decode_text
from evaluation.model import ModelForEvaluation
from tests.eval_helpers import (EVAL_DATA, load_results, model_argv, read_jsonl, report_lines, run_evaluate,
                                write_jsonl, write_small_tasks, write_yaml)
from tests.helpers import ROOT


@pytest.fixture
def argv(tmp_path, test_tokenizer_path, monkeypatch):
    monkeypatch.chdir(ROOT)  # task YAMLs are given relative to the repository, as in the README
    return ["--data-path", str(EVAL_DATA), "--output-path", str(tmp_path / "out"), *model_argv(test_tokenizer_path)]


def test_hand_checked_metrics_and_report_lines(argv, tmp_path, monkeypatch, test_tokenizer):
    """Fixed model answers through the whole pipeline: every printed number is computed by hand below."""
    answers = {"How long": "35 minutes", "Where is": "the corner", "What did": "height"}

    def generate_text(self, batch, strategy, return_all_beams=False):
        texts = [decode_text(test_tokenizer, t.tolist()) for t in batch["tokens"]]
        out = [test_tokenizer.tokenize(next(a for k, a in answers.items() if k in text)) for text in texts]
        return [[o] for o in out] if return_all_beams else out

    monkeypatch.setattr(ModelForEvaluation, "cond_log_prob", lambda self, b: [[-1.0, -2.0]] * len(b["tokens"]))
    monkeypatch.setattr(ModelForEvaluation, "generate_text", generate_text)
    monkeypatch.setattr(ModelForEvaluation, "calculate_loss", lambda self, b: [12.0] * len(b["tokens"]))
    out = tmp_path / "out"
    stdout = run_evaluate(argv + ["--task", "tasks/bloom/glue_cola.yaml", "tasks/bloom/mc_taco.yaml",
                                  "tasks/language-modeling/wikitext-2.yaml", "tasks/language-modeling/pile.yaml"])
    lines = report_lines(stdout)
    # glue_cola: always choice 0; labels 0 1 0 0 0 -> 80 %, 0 1 0 -> 66.667 %; average weighted by 5 and 3 samples
    cola = lines.index("Evaluating task glue_cola:")
    assert lines[cola - 3:cola] == ["", "", repr_config(out, "glue_cola")]
    assert lines[cola:cola + 7] == [
        "Evaluating task glue_cola:",
        "    Evaluating group validation:",
        "        Finish prompt_a/validation.jsonl, Accuracy = 80.000",
        "        Finish prompt_b/validation.jsonl, Accuracy = 66.667",
        "Evaluation results of task glue_cola:",
        "    Group validation Accuracy: max = 80.000, median = 73.333, average = 75.000",
        "Finish task glue_cola in T."]
    # mc_taco: "35 minutes" = target (EM 1, F1 1); "the corner" vs "near the corner" (F1 2/3);
    # "height" vs "the height of the tree" (normalised "height of tree": F1 1/2)
    assert "        Finish prompt_a/validation_pp.jsonl, EM = 33.333, F1 = 72.222" in lines
    assert lines[lines.index("Evaluation results of task mc_taco:") + 1:][:3] == [
        "      Group validation: ",
        "        Metric EM: max = 33.333, median = 33.333, average = 33.333",
        "        Metric F1: max = 72.222, median = 72.222, average = 72.222"]
    # WikiText-2: one window with loss 12 over 24 space-separated words
    assert f"        Finish wiki.test.tokens, PPL = {math.exp(12 / 24):.3f}" in lines
    # Pile: one window per non-empty document, loss 12 each; UTF-8 bytes 26 + 31 (Pile-CC) and 51 (Wikipedia)
    pile = lines.index("Evaluation results of task Pile:")
    assert lines[pile + 1:pile + 5] == ["    Finish group test:", f"        Pile-CC = {24 / 57 / math.log(2):.3f}",
                                       f"        Wikipedia (en) = {12 / 51 / math.log(2):.3f}", ""]
    assert lines[-1] == "Finish 4 task(s) in T"

    results = load_results(out, "glue_cola")
    assert results["task"] == "glue_cola" and results["config"]["micro_batch_size"] == 30
    assert results["files"]["prompt_a/validation.jsonl"] == {"Accuracy": 80.0, "n": 5}
    assert results["groups"]["validation"]["Accuracy"] == pytest.approx({"max": 80, "median": 220 / 3, "average": 75})
    records = read_jsonl(out / "glue_cola/predictions/prompt_b/validation.jsonl.jsonl")
    assert records == [{"index": i, "prediction": 0, "choice_logprobs": [-1.0, -2.0]} for i in range(3)]
    gen = read_jsonl(out / "mc_taco/predictions/prompt_a/validation_pp.jsonl.jsonl")
    assert [r["prediction_text"] for r in gen] == ["35 minutes", "the corner", "height"]
    assert read_jsonl(out / "WikiText-2/predictions/wiki.test.tokens.jsonl")[0]["loss"] == 12.0
    assert load_results(out, "Pile")["files"]["test_tokenized.jsonl"]["n"] == 3


def repr_config(out, name):
    return (f"MultiChoiceTaskConfig(name='{name}', type=<TaskType.MULTICHOICE: 'mul'>, "
            f"path='{EVAL_DATA}/bloom/glue_cola', module=None, metrics=['Accuracy'], use_task_mask=False, "
            f"use_multitask_encoding=False, unidirectional=False, max_seq_length=2048, "
            f"file_pattern={{'validation': '**/validation.jsonl'}}, micro_batch_size=30)")


def test_custom_task_modules_on_the_fixture_model(argv, tmp_path):
    out = tmp_path / "out"
    stdout = run_evaluate(argv + ["--task", "tasks/mmlu", "tasks/ethnic/crows-pair", "tasks/ethnic/stereoset",
                                  "tasks/lambada/lambada.yaml", "tasks/language-modeling/pile.yaml"])
    lines = report_lines(stdout)
    # Pile: the windows' losses per set over the UTF-8 bytes (26 + 31 for Pile-CC, 51 for Wikipedia)
    losses = [r["loss"] for r in read_jsonl(out / "Pile/predictions/test_tokenized.jsonl.jsonl")]
    assert len(losses) == 3
    assert f"        Pile-CC = {(losses[0] + losses[2]) / 57 / math.log(2):.3f}" in lines
    assert f"        Wikipedia (en) = {losses[1] / 51 / math.log(2):.3f}" in lines
    # MMLU: four groups, then "Overall" over all files at indentation level 0
    files = load_results(out, "MMLU")["files"]
    acc = [files[f]["Accuracy"] for f in files]
    weights = [files[f]["n"] for f in files]
    assert (f"Group Overall Accuracy: max = {max(acc):.3f}, median = {np.median(acc):.3f}, "
            f"average = {np.average(acc, weights=weights):.3f}") in lines
    assert load_results(out, "MMLU")["overall"]["Accuracy"]["max"] == max(acc)
    # CrowS-Pairs: per bias type, the share of pairs where sentence 1 is at least as likely as sentence 2
    data = read_jsonl(EVAL_DATA / "data/crows-pair-dataset.jsonl")
    records = read_jsonl(out / "CROWS/predictions/crows-pair-dataset.jsonl.jsonl")
    diff, bias = {}, {}
    for item, r in zip(data, records):
        sign = 1 if item["sent_ID"] == 1 else -1
        diff[item["pair_ID"]] = diff.get(item["pair_ID"], 0) + sign * r["choice_logprobs"][0]
        bias[item["pair_ID"]] = item["bias_type"]
    for category in ("gender", "age"):
        pairs = [p for p in diff if bias[p] == category]
        score = sum(diff[p] >= 0 for p in pairs) / len(pairs)
        assert f"category:{category}        score:{round(score * 100, 2)}" in lines
    assert "Special metric for CrowsPair" in lines
    # StereoSet: headers then per-category scores; the prediction is the best log-prob per token
    stereo = lines.index("Evaluation results of task StereoSet:")
    assert lines[stereo + 1] == "LMS" and lines[stereo + 1:].index("SS") == 4 and "ICAT" in lines[stereo:]
    assert all(r["prediction"] in (0, 1, 2) for r in read_jsonl(out / "StereoSet/predictions/stereoset-dataset.jsonl.jsonl"))
    # LAMBADA: a first word (maybe empty for a random model), exact match of stripped text
    lam = read_jsonl(out / "LAMBADA/predictions/test.jsonl.jsonl")
    assert len(lam) == 2 and all(" " not in r["prediction_text"].strip() for r in lam)
    assert "    Group test Accuracy: max = 0.000, median = 0.000, average = 0.000" in lines


def test_resume_after_a_kill_redoes_only_unfinished_files(argv, tmp_path, monkeypatch):
    from evaluation import tasks as tasks_module
    yaml = write_small_tasks(tmp_path / "tasks", ["mul.yaml"])
    calls = []
    real_predict = tasks_module.MultiChoiceTask.predict_batch
    real_save = tasks_module.BaseTask.save_records

    def counting_predict(self, batch, indices, dataset):
        calls.append(dataset.path)
        return real_predict(self, batch, indices, dataset)

    def save_then_die(self, file, key, records):
        real_save(self, file, key, records)
        raise KeyboardInterrupt  # killed right after the first file was written

    monkeypatch.setattr(tasks_module.MultiChoiceTask, "predict_batch", counting_predict)
    monkeypatch.setattr(tasks_module.BaseTask, "save_records", save_then_die)
    with pytest.raises(SystemExit):
        run_evaluate(argv + ["--task", *yaml])
    assert {p.split("/")[-2] for p in calls} == {"prompt_a"}
    monkeypatch.setattr(tasks_module.BaseTask, "save_records", real_save)
    calls.clear()
    resumed = run_evaluate(argv + ["--task", *yaml])
    assert {p.split("/")[-2] for p in calls} == {"prompt_b"}  # 3 samples, micro-batches of 2
    assert len(calls) == 2
    calls.clear()
    again = run_evaluate(argv + ["--task", *yaml])
    assert calls == [] and report_lines(again) == report_lines(resumed)
    limited = run_evaluate(argv + ["--task", *yaml, "--limit", "2"])  # another --limit: a different key
    assert len(calls) == 2 and "Finish prompt_a/validation.jsonl" in limited
    assert len(read_jsonl(tmp_path / "out/mul/predictions/prompt_a/validation.jsonl.jsonl")) == 2


def test_bad_inputs_stop_with_one_line_errors(argv, tmp_path, capsys):
    bad_yaml = write_yaml(tmp_path / "bad.yaml", "name: x\ntype: mul\npath: data\nmicro_batch_size: two\n")
    with pytest.raises(SystemExit) as e:
        run_evaluate(argv + ["--task", str(bad_yaml)])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and err == f"error: {bad_yaml}: field 'micro_batch_size' must be an integer, got 'two'"
    data = tmp_path / "data"
    write_jsonl(data / "x" / "test.jsonl", [{"inputs_pretokenized": "a", "choices_pretokenized": ["b"], "label": 0}])
    (data / "x" / "test.jsonl").open("a").write('{"inputs_pretokenized": "a", "label": 0}\n')
    task = write_yaml(tmp_path / "t.yaml", "name: x\ntype: mul\npath: x\n")
    argv = [a if a != str(EVAL_DATA) else str(data) for a in argv]
    with pytest.raises(SystemExit):
        run_evaluate(argv + ["--task", str(task)])
    err = capsys.readouterr().err.strip()
    assert err == f"error: {data}/x/test.jsonl:2: missing field 'choices_pretokenized' (or pre-tokenized 'choices')"
    with pytest.raises(SystemExit):
        run_evaluate(argv + ["--task", "tasks/mmlu"])
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: task MMLU: data folder {data}/MMLU does not exist") and "\n" not in err


def test_command_line_error_has_no_traceback(tmp_path, test_tokenizer_path):
    bad = write_yaml(tmp_path / "bad.yaml", "name: [x\n")
    proc = subprocess.run([sys.executable, "evaluate.py", "--data-path", str(EVAL_DATA), "--task", str(bad),
                           *model_argv(test_tokenizer_path)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith(f"error: {bad}: malformed YAML") and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_task_folder_without_yaml_is_an_error(tmp_path, test_tokenizer_path, demo_dir):
    """--task DIR with no *.yaml under it stops with one line naming the folder, before the model loads (it used
    to print "Finish 0 task(s)" and exit 0); the same through scripts/evaluate.sh, whose exit status is evaluate.py's."""
    from tests.test_generation_cli import demo_env
    empty = tmp_path / "no-tasks"
    (empty / "sub").mkdir(parents=True)
    (empty / "sub" / "notes.txt").write_text("not a task\n")
    message = f"error: --task {empty}: no task YAML (*.yaml) in this folder or below it"
    # evaluate.py and scripts/evaluate.sh at the same time (independent processes)
    direct = subprocess.Popen([sys.executable, "evaluate.py", "--data-path", str(EVAL_DATA), "--task", str(empty),
                               *model_argv(test_tokenizer_path)], cwd=ROOT, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    # the script tees its output (stderr included) to stdout and logs/; run it elsewhere so logs/ lands in tmp_path
    script = subprocess.Popen(["bash", str(ROOT / "scripts" / "evaluate.sh"), str(empty)], cwd=tmp_path,
                              env={**demo_env(demo_dir), "DATA_PATH": str(EVAL_DATA)}, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    try:
        direct_out, direct_err = direct.communicate(timeout=300)
        script_out, script_err = script.communicate(timeout=300)
    finally:
        for p in (direct, script):
            if p.poll() is None:
                p.kill()
                p.wait()
    assert direct.returncode == 2, direct_err[-2000:]
    assert direct_err.strip() == message and "Traceback" not in direct_out + direct_err
    assert "Model initialized" not in direct_out and "Finish" not in direct_out
    assert script.returncode == 2, script_out[-2000:] + script_err[-2000:]
    assert message in script_out.splitlines() and "Traceback" not in script_out + script_err
    assert "Model initialized" not in script_out and "Finish" not in script_out
