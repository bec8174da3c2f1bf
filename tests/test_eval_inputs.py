"""Evaluation inputs that must not make a run silently wrong: resumed predictions that are incomplete or
inconsistent, out-of-vocabulary ids, symlink loops, unreadable paths, data lines too large to hold."""
import glob
import json
import os
import subprocess
import sys

import pytest

from evaluation import utils
from evaluation.configs import GenerationTaskConfig, MultiChoiceTaskConfig, TaskType
from evaluation.dataset import GenerationTaskDataset, LanguageModelTaskDataset, MultiChoiceTaskDataset
from model.errors import UserError
from tests.eval_helpers import EVAL_DATA, model_argv, read_jsonl, report_lines, run_evaluate, write_small_tasks
from tests.helpers import ROOT, file_modes_bind
from tests.test_eval_dataset import WordTokenizer


class VocabTokenizer(WordTokenizer):
    vocab_size = 150009


def mul_config(path):
    return MultiChoiceTaskConfig(name="t", type=TaskType.MULTICHOICE, path=str(path))


@pytest.mark.parametrize("item, field", [
    ({"inputs": [20001, 150009], "choices": [[20002]], "label": 0}, "inputs"),
    ({"inputs": [20001], "choices": [[20002], [-1]], "label": 0}, "choices"),
])
def test_out_of_vocabulary_ids_name_the_file_and_line(tmp_path, item, field):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"inputs": [20001], "choices": [[20002]], "label": 0}) + "\n" + json.dumps(item) + "\n")
    with pytest.raises(UserError) as e:
        MultiChoiceTaskDataset(str(path), mul_config(tmp_path), VocabTokenizer())
    assert str(e.value).startswith(f"{path}:2: field '{field}' holds token id ") and "outside the vocabulary" in \
        str(e.value)


def test_out_of_vocabulary_target_ids_name_the_file_and_line(tmp_path):
    path = tmp_path / "g.jsonl"
    path.write_text(json.dumps({"inputs": [20001], "targets": [[20002], [999999]]}) + "\n")
    config = GenerationTaskConfig(name="t", type=TaskType.GENERATION, path=str(tmp_path))
    with pytest.raises(UserError, match=rf"^{path}:1: field 'targets' holds token id 999999, outside the vocab"):
        GenerationTaskDataset(str(path), config, VocabTokenizer())


def test_a_data_line_past_the_limit_is_refused_before_it_is_parsed(tmp_path):
    path = tmp_path / "big.jsonl"
    ok = json.dumps({"inputs_pretokenized": "a", "choices_pretokenized": ["b"], "label": 0})
    with open(path, "w") as f:
        f.write(ok + "\n" + '{"inputs_pretokenized": "' + "x" * utils.MAX_LINE_CHARS + '"}\n' + ok + "\n")
    with pytest.raises(UserError) as e:
        MultiChoiceTaskDataset(str(path), mul_config(tmp_path), WordTokenizer())
    assert str(e.value).startswith(f"{path}:2: the line is longer than {utils.MAX_LINE_CHARS} characters")
    exact = tmp_path / "exact.jsonl"  # a line of exactly the limit (newline not counted) is read
    body = '{"inputs_pretokenized": "a", "choices_pretokenized": ["b"], "label": 0, "pad": "'
    exact.write_text(body + "y" * (utils.MAX_LINE_CHARS - len(body) - 2) + '"}\n')
    assert len(MultiChoiceTaskDataset(str(exact), mul_config(tmp_path), WordTokenizer())) == 1


def test_a_plain_text_document_past_the_limit_is_refused_before_it_is_read(tmp_path):
    from evaluation.configs import LanguageModelTaskConfig
    path = tmp_path / "doc.txt"
    with open(path, "w") as f:
        f.truncate(utils.MAX_WHOLE_FILE_BYTES + 1)
    config = LanguageModelTaskConfig(name="t", type=TaskType.LANGUAGE_MODEL, path=str(tmp_path))
    with pytest.raises(UserError, match=f"a plain-text document is read whole and this one is "
                                        f"{utils.MAX_WHOLE_FILE_BYTES + 1} bytes"):
        LanguageModelTaskDataset(str(path), config, WordTokenizer())


def test_folder_search_equals_glob_and_follows_symlink_loops_once(tmp_path):
    data = tmp_path / "data"
    for rel in ("a/x.jsonl", "a/deep/y.jsonl", "b/z.json", ".hidden/h.jsonl", "top.jsonl", "a/.dot.jsonl"):
        (data / rel).parent.mkdir(parents=True, exist_ok=True)
        (data / rel).write_text("{}\n")
    for pattern in ("**/*.jsonl", "**/*", "a/*.jsonl", "*/deep/*.jsonl", "**/x.jsonl", "top.jsonl", "b/**"):
        expected = sorted(os.path.relpath(p, data) for p in glob.glob(str(data / pattern), recursive=True)
                          if os.path.isfile(p))
        assert utils.match_files(str(data), pattern) == expected, pattern
    (data / "a" / "loop").symlink_to("..")  # a folder loop: glob finds a/x.jsonl 40 times through it
    assert len(glob.glob(str(data / "**/x.jsonl"), recursive=True)) > 20
    (data / "a" / "deep" / "up").symlink_to("../..")  # a second loop (glob would take 2^40 paths)
    (data / "c").symlink_to("a")  # the same folder under another name
    (data / "link.jsonl").symlink_to("a/x.jsonl")  # the same file under another name
    assert utils.match_files(str(data), "**/*.jsonl") == ["a/deep/y.jsonl", "a/x.jsonl", "top.jsonl"]


def test_a_folder_loop_evaluates_each_file_once(tmp_path, test_tokenizer_path, monkeypatch):
    import shutil
    monkeypatch.chdir(ROOT)
    data = tmp_path / "data"
    shutil.copytree(EVAL_DATA / "bloom" / "glue_cola", data / "bloom" / "glue_cola")
    (data / "bloom" / "glue_cola" / "prompt_a" / "again").symlink_to("..")
    yaml = write_small_tasks(tmp_path / "tasks", ["mul.yaml"])
    out = run_evaluate(["--data-path", str(data), "--output-path", str(tmp_path / "out"),
                        *model_argv(test_tokenizer_path), "--task", *yaml])
    finished = [line for line in report_lines(out) if line.strip().startswith("Finish prompt")]
    assert [line.split(",")[0].strip() for line in finished] == ["Finish prompt_a/validation.jsonl",
                                                               "Finish prompt_b/validation.jsonl"]


UNREADABLE = """
import sys
from evaluation.configs import MultiChoiceTaskConfig, TaskType
from evaluation.tasks import find_data_files
from evaluation.utils import read_json_items
from model.errors import UserError
for name, call in [("folder", lambda: find_data_files(MultiChoiceTaskConfig(name="t", type=TaskType.MULTICHOICE,
                                                                              path=sys.argv[1]))),
                   ("below", lambda: find_data_files(MultiChoiceTaskConfig(name="t", type=TaskType.MULTICHOICE,
                                                                             path=sys.argv[2]))),
                   ("file", lambda: list(read_json_items(sys.argv[3])))]:
    try:
        call()
        print(name, "read")
    except UserError as e:
        print(name, e)
"""


def test_unreadable_paths_say_not_readable(tmp_path):
    locked, tree, file = tmp_path / "locked", tmp_path / "tree", tmp_path / "f.jsonl"
    (locked / "x").mkdir(parents=True)
    (tree / "sub").mkdir(parents=True)
    file.write_text("{}\n")
    for path in (locked, tree / "sub", file):
        path.chmod(0)
    try:
        proc = subprocess.run([sys.executable, "-c", UNREADABLE, str(locked), str(tree), str(file)], cwd=ROOT,
                              capture_output=True, text=True, preexec_fn=file_modes_bind(), timeout=120)
    finally:
        for path in (locked, tree / "sub", file):
            path.chmod(0o755)
    lines = proc.stdout.splitlines()
    assert proc.returncode == 0 and len(lines) == 3, proc.stderr
    assert lines[0] == f"folder task t: data folder {locked} is not readable (permission denied)"
    assert lines[1] == f"below data folder {tree / 'sub'} is not readable (permission denied)"
    assert lines[2] == f"file data file {file} is not readable (permission denied)"


@pytest.fixture
def argv(tmp_path, test_tokenizer_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    return ["--data-path", str(EVAL_DATA), "--output-path", str(tmp_path / "out"), *model_argv(test_tokenizer_path)]


@pytest.mark.parametrize("damage", ["cut at a line boundary", "a record without its prediction", "a torn line",
                                    "records out of order"])
def test_an_incomplete_or_inconsistent_predictions_file_is_recomputed_with_one_warning(argv, tmp_path, capsys,
                                                                                      damage):
    yaml = write_small_tasks(tmp_path / "tasks", ["mul.yaml"])
    fresh = run_evaluate(argv + ["--task", *yaml])
    path = tmp_path / "out/mul/predictions/prompt_a/validation.jsonl.jsonl"
    original, records = read_jsonl(path), read_jsonl(path)
    lines = [json.dumps(r) + "\n" for r in records]
    if damage == "cut at a line boundary":
        lines = lines[:-1]
    elif damage == "a record without its prediction":
        del records[1]["prediction"]
        lines[1] = json.dumps(records[1]) + "\n"
    elif damage == "a torn line":
        lines[-1] = lines[-1][:7]
    else:
        lines[0], lines[1] = lines[1], lines[0]
    path.write_text("".join(lines))
    capsys.readouterr()
    again = run_evaluate(argv + ["--task", *yaml])
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning: ")]
    assert len(warnings) == 1 and str(path) in warnings[0] and "recomputing prompt_a/validation.jsonl" in warnings[0]
    assert report_lines(again) == report_lines(fresh)
    assert read_jsonl(path) == original
