"""Task YAML schema: the 37 original task files, key spellings, defaults, and one-line errors for bad files."""
import warnings

import pytest

from evaluation.configs import (GenerationTaskConfig, LanguageModelTaskConfig, MultiChoiceTaskConfig, TaskType,
                                load_config)
from model.errors import UserError
from tests.eval_helpers import write_yaml
from tests.helpers import ROOT

# (yaml, class, name, type, path, file pattern, micro batch size) for a sample of the original's tasks
EXPECTED = [
    ("tasks/bloom/glue_cola.yaml", "MultiChoiceTask", "glue_cola", "mul", "bloom/glue_cola",
     {"validation": "**/validation.jsonl"}, 30),
    ("tasks/bloom/glue_mnli.yaml", "MultiChoiceTask", "glue_mnli", "mul", "bloom/glue_mnli",
     {"validation-matched": "**/validation_matched.jsonl",
      "validation-mismatched": "**/validation_mismatched.jsonl"}, 8),
    ("tasks/bloom/mc_taco.yaml", "GenerationTask", "mc_taco", "gen", "bloom/mc_taco",
     {"validation": "**/validation_pp.jsonl", "test": "**/test_pp.jsonl"}, 1),
    ("tasks/chinese/clue/cmrc2018.yaml", "GenerationTask", "CMRC2018", "gen", "CLUE/cmrc2018", "**/*.json*", 1),
    ("tasks/chinese/fewclue/chidf.yaml", "MultiChoiceTask", "CHIDF", "mul", "CLUE/chid-fc",
     {"dev": "**/dev_few_all.jsonl", "test": "**/test_public.jsonl"}, 16),
    ("tasks/ethnic/crows-pair/crows-pair.yaml", "CrowsPairTask", "CROWS", "mul", "data",
     {"test": "**/crows-pair-dataset.jsonl"}, 1),
    ("tasks/ethnic/stereoset/stereoset.yaml", "StereoSetTask", "StereoSet", "mul", "data",
     {"test": "**/stereoset-dataset.jsonl"}, 64),
    ("tasks/ethnic/ethos/ethos-zeroshot.yaml", "MultiChoiceTask", "ETHOS_zeroshot", "mul", "data",
     {"test": "**/ethos-zero-shot.jsonl"}, 128),
    ("tasks/lambada/lambada-unidirectional.yaml", "LAMBADA", "LAMBADA-unidirectional", "gen", "lambada/lambada",
     {"test": "**/test.jsonl", "validation": "**/validation.jsonl"}, 1),
    ("tasks/language-modeling/pile.yaml", "Pile", "Pile", "lm", "pile", {"test": "**/test_tokenized.jsonl"}, 1),
    ("tasks/language-modeling/ptb.yaml", "LanguageModelTask", "Penn Treebank", "lm", "ptbdataset",
     {"test": "**/ptb.test.txt"}, 1),
    ("tasks/mmlu/mmlu.yaml", "MMLU", "MMLU", "mul", "MMLU",
     {"stem": "stem/*.json", "social_sciences": "social_sciences/*.json", "humanities": "humanities/*.json",
      "other": "other/*.json"}, 1),
]


def test_all_37_task_files_load_without_warnings(monkeypatch):
    monkeypatch.chdir(ROOT)
    from evaluate import find_all_tasks, load_task
    paths = find_all_tasks(["tasks"])
    assert len(paths) == 37
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loaded = {p: load_task(p) for p in paths}
    names = [c.name for _, c in loaded.values()]
    assert len(set(names)) == 37
    for path, cls_name, name, type_, data, pattern, mbs in EXPECTED:
        cls, c = loaded[path]
        assert (cls.__name__, c.name, c.type.value, c.path, c.file_pattern, c.micro_batch_size) == \
               (cls_name, name, type_, data, pattern, mbs), path
    lam = loaded["tasks/lambada/lambada.yaml"][1]
    assert (lam.sampling_strategy, lam.num_beams, lam.max_gen_length, lam.use_task_mask, lam.unidirectional) == \
           ("BeamSearchStrategy", 16, 5, True, False)
    pile = loaded["tasks/language-modeling/pile.yaml"][1]
    assert (pile.generation_length, pile.use_task_mask, pile.metrics) == (1024, True, ["PPL"])


def test_defaults_and_repr_match_the_original(tmp_path):
    c = load_config(str(write_yaml(tmp_path / "t.yaml", "name: x\ntype: gen\npath: p\n")))
    assert isinstance(c, GenerationTaskConfig)
    assert repr(c) == ("GenerationTaskConfig(name='x', type=<TaskType.GENERATION: 'gen'>, path='p', module=None, "
                       "metrics=['EM', 'F1'], use_task_mask=False, use_multitask_encoding=False, unidirectional=False, "
                       "max_seq_length=2048, file_pattern='**/*.json*', micro_batch_size=1, "
                       "sampling_strategy='BaseStrategy', num_beams=4, length_penalty=1.0, no_repeat_ngram_size=3, "
                       "min_gen_length=0, max_gen_length=128)")
    m = load_config(str(write_yaml(tmp_path / "m.yaml", "name: x\ntype: mul\npath: p\n")))
    assert isinstance(m, MultiChoiceTaskConfig) and m.metrics == ["Accuracy"]
    lm = load_config(str(write_yaml(tmp_path / "l.yaml", "name: x\ntype: lm\npath: p\n")))
    assert isinstance(lm, LanguageModelTaskConfig) and (lm.metrics, lm.generation_length) == (["PPL"], 256)


def test_kebab_and_snake_case_keys(tmp_path):
    text = ("name: x\ntype: lm\npath: p\nfile-pattern: '*.txt'\nmicro-batch-size: 3\ngeneration-length: 64\n"
            "use-task-mask: true\nmax_seq_length: 128\nlength_penalty: 2\n")
    with pytest.warns(UserWarning) as record:
        c = load_config(str(write_yaml(tmp_path / "t.yaml", text)))
    assert (c.file_pattern, c.micro_batch_size, c.generation_length, c.use_task_mask, c.max_seq_length) == \
           ("*.txt", 3, 64, True, 128)
    assert len(record) == 1 and "length_penalty" in str(record[0].message)  # not an lm field: one warning
    assert c.type is TaskType.LANGUAGE_MODEL


def test_unknown_keys_give_one_warning(tmp_path):
    path = write_yaml(tmp_path / "t.yaml", "name: x\ntype: mul\npath: p\nsave-prediction: true\nfoo: 1\n")
    with pytest.warns(UserWarning) as record:
        load_config(str(path))
    assert len(record) == 1
    assert "save_prediction" in str(record[0].message) and "foo" in str(record[0].message)


@pytest.mark.parametrize("text, field", [
    ("type: mul\npath: p\n", "'name'"),
    ("name: x\npath: p\n", "'type'"),
    ("name: x\ntype: mul\n", "'path'"),
    ("name: x\ntype: classification\npath: p\n", "'type'"),
    ("name: x\ntype: mul\npath: p\nmicro_batch_size: many\n", "'micro_batch_size'"),
    ("name: x\ntype: mul\npath: p\nmicro_batch_size: 0\n", "'micro_batch_size'"),
    ("name: x\ntype: mul\npath: p\nuse_task_mask: 'yes'\n", "'use_task_mask'"),
    ("name: x\ntype: gen\npath: p\nunidirectional: true\n", "'unidirectional'"),
    ("name: x\ntype: gen\npath: p\nsampling_strategy: Nucleus\n", "'sampling_strategy'"),
    ("name: x\ntype: mul\npath: p\nfile_pattern: {a: 1}\n", "'file_pattern'"),
    ("name: x\ntype: mul\npath: p\nfile_pattern: a\nfile-pattern: b\n", "'file_pattern'"),
    ("name: x\ntype: mul\npath: [p\n", "malformed YAML"),
    ("- name: x\n", "mapping"),
])
def test_bad_files_stop_with_one_line_naming_file_and_field(tmp_path, text, field):
    path = write_yaml(tmp_path / "bad.yaml", text)
    with pytest.raises(UserError) as e:
        load_config(str(path))
    message = str(e.value)
    assert str(path) in message and field in message and "\n" not in message


def test_unknown_metric_and_module_name_the_file(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    from evaluate import load_task
    bad_metric = write_yaml(tmp_path / "m.yaml", "name: x\ntype: mul\npath: p\nmetrics: [Accuracy, BLEU]\n")
    with pytest.raises(UserError, match=r"m\.yaml: field 'metrics' has unknown metric 'BLEU'"):
        load_task(str(bad_metric))
    bad_module = write_yaml(tmp_path / "c.yaml", "name: x\ntype: mul\npath: p\nmodule: tasks.nothing.Here\n")
    with pytest.raises(UserError, match=r"c\.yaml: field 'module'"):
        load_task(str(bad_module))
    other = write_yaml(tmp_path / "o.yaml", "name: x\ntype: other\npath: p\n")
    with pytest.raises(UserError, match=r"o\.yaml: field 'type'"):
        load_task(str(other))


def test_task_discovery_is_recursive_and_rejects_missing_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    from evaluate import find_all_tasks
    assert find_all_tasks(["tasks/ethnic"]) == sorted(find_all_tasks(["tasks/ethnic"]))
    assert len(find_all_tasks(["tasks/ethnic"])) == 6
    assert find_all_tasks(["tasks/mmlu/mmlu.yaml", "tasks/lambada"])[0] == "tasks/mmlu/mmlu.yaml"
    with pytest.raises(UserError, match="no-such-task.yaml: no such file"):
        find_all_tasks(["no-such-task.yaml"])
