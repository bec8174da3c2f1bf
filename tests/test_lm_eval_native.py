"""The in-process lm-eval model (`glm130b`, evaluation/harness.py) scores as evaluate.py does: the README's
scripts/lm_eval.sh command run on the demo model over the local tasks of tests/data/lm_eval, its per-request numbers
against evaluate.py's on the same data; long documents over several windows; generate_until against generate.py's
fill_blanks; tensor and data parallelism (2 ranks under torchrun) against one process."""
import json
import os
import shlex
import subprocess
import sys

import pytest
import yaml

import evaluate
from tests.helpers import ROOT, background_process, finished, fixture_config, fixture_model_args, free_port
from tests.test_generation_cli import demo_env, demo_model_args

DATA = ROOT / "tests" / "data" / "lm_eval"
TASKS = "glm_choices,glm_documents,glm_generation"


def offline_env(env, tmp_path):
    return {**env, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}


def read_samples(output_path, task):
    """lm-eval's --log_samples records of one task: {doc_id: sample}."""
    files = list(output_path.rglob(f"samples_{task}_*.jsonl"))
    assert len(files) == 1, files
    return {s["doc_id"]: s for s in map(json.loads, files[0].read_text(encoding="utf-8").splitlines())}


def evaluate_py(model_args, tmp_path, yaml_path, name):
    """evaluate.py's predictions records of one of tests/data/lm_eval/glm's tasks (list in data order)."""
    out = tmp_path / "evaluate"
    evaluate.main([*model_args, "--data-path", str(DATA / "data"), "--task", str(yaml_path), "--output-path",
                   str(out)])
    config = yaml.safe_load(yaml_path.read_text())
    pattern = config["file-pattern"]["test"]
    lines = (out / config["name"] / "predictions" / f"{pattern}.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


@pytest.fixture(scope="module", autouse=True)
def readme_run_in_background(request, demo_dir, tmp_path_factory):
    """The README's scripts/lm_eval.sh command, with --log_samples and an output folder added. One process (~15 s,
    most of it lm-eval indexing its built-in task YAMLs): it starts with this module and runs on the machine's
    other core while the in-process tests below run; the tests that read it come after them and wait for it
    (`readme_run`). Not started when none of them is selected."""
    if not any(getattr(item, "module", None) is request.module and "readme_run" in item.fixturenames
               for item in request.session.items):
        yield None
        return
    from tests.test_readme import readme_command
    tmp = tmp_path_factory.mktemp("lm_eval_sh")
    command = readme_command("bash scripts/lm_eval.sh")
    output = shlex.quote(str(tmp / "out"))
    with background_process(["bash", "-c", f"{command} --log_samples --output_path {output}"], tmp,
                            env=offline_env(demo_env(demo_dir), tmp)) as proc:
        yield tmp, proc


@pytest.fixture(scope="module")
def readme_run(readme_run_in_background):
    """Waits for the README command (call it): (its CompletedProcess, its output folder)."""
    tmp, proc = readme_run_in_background

    def wait():
        done = finished(proc, tmp, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        return done, tmp / "out"
    return wait


@pytest.fixture(scope="module")
def harness(demo_dir):
    from evaluation.harness import GLM130BHarness
    from initialize import initialize, initialize_model_and_tokenizer
    args = initialize(None, demo_model_args(demo_dir))
    model, tokenizer = initialize_model_and_tokenizer(args)
    return model, tokenizer, lambda **kw: GLM130BHarness(model, tokenizer, args.max_sequence_length, **kw)


class Request:  # what the model reads of lm-eval's Instance
    def __init__(self, *args):
        self.args = args


def documents():
    return [json.loads(line)["text"] for line in (DATA / "data" / "documents.jsonl").read_text().splitlines()]


def test_documents_over_several_windows_equal_evaluate_py(harness, demo_dir, tmp_path):
    """A short window (max_seq_length 48, 16 new tokens per window) splits the documents into several windows,
    each later one with a bidirectional prompt: the per-document sums are evaluate.py's."""
    _, tokenizer, make = harness
    config = yaml.safe_load((DATA / "glm" / "documents.yaml").read_text())
    config.update({"max_seq_length": 48, "generation-length": 16})
    path = tmp_path / "documents.yaml"
    path.write_text(yaml.safe_dump(config))
    records = evaluate_py(demo_model_args(demo_dir), tmp_path, path, "documents")
    mine = make(max_seq_length=48, generation_length=16, batch_size=3).loglikelihood_rolling(
        [Request(text) for text in documents()], disable_tqdm=True)
    windows = [max(1, -(-max(0, len(tokenizer.tokenize(t)) - 47) // 16) + 1) for t in documents()]
    assert len(records) == sum(windows) > len(windows)
    ends = [sum(windows[:i + 1]) for i in range(len(windows))]
    expected = [-sum(r["loss"] for r in records[end - n:end]) for n, end in zip(windows, ends)]
    assert mine == pytest.approx(expected, rel=1e-6, abs=1e-4)


def test_generate_until_equals_generate_py_greedy_gmask_generation(harness):
    from generation import BaseStrategy, fill_blanks, generation_invalid_slices
    model, tokenizer, make = harness
    prompts = [json.loads(line)["inputs_pretokenized"]
               for line in (DATA / "data" / "generation.jsonl").read_text().splitlines()]
    kwargs = {"until": ["\n", "ing"], "max_gen_toks": 10, "do_sample": False}
    mine = make(batch_size=3).generate_until([Request(p, dict(kwargs)) for p in prompts], disable_tqdm=True)
    end = [tokenizer.get_command("eop"), tokenizer.get_command("eos")]
    strategy = BaseStrategy(top_k=1, end_tokens=end, invalid_slices=generation_invalid_slices(tokenizer, end))
    for prompt, text in zip(prompts, mine):
        blank = fill_blanks(prompt, model, tokenizer, strategy, out_seq_length=1 << 30, max_new_tokens=10).blanks[0][0]
        assert text == blank.split("ing")[0].split("\n")[0]


def test_continuations_of_one_context_are_one_sample_and_empty_ones_score_eop(harness):
    _, tokenizer, make = harness
    lm = make(batch_size=2)
    pairs = [("The capital of France is", " Paris"), ("Water boils at", " 100"), ("The capital of France is", ""),
             ("The capital of France is", " Berlin")]
    together = lm.loglikelihood([Request(*p) for p in pairs], disable_tqdm=True)
    alone = [lm.loglikelihood([Request(*p)], disable_tqdm=True)[0] for p in pairs]
    assert [x[0] for x in together] == pytest.approx([x[0] for x in alone], abs=1e-4)
    assert all(isinstance(g, bool) for _, g in together)


# The tests that read the README command's run: after the in-process tests above, which run while it does.
def test_multiple_choice_log_probs_and_predictions_equal_evaluate_py(readme_run, demo_dir, tmp_path):
    records = evaluate_py(demo_model_args(demo_dir), tmp_path, DATA / "glm" / "choices.yaml", "choices")
    samples = read_samples(readme_run()[1], "glm_choices")
    assert sorted(samples) == list(range(len(records)))
    for doc_id, record in enumerate(records):
        mine = [float(resp[0][0]) for resp in samples[doc_id]["resps"]]  # lm-eval logs numbers as strings
        assert mine == pytest.approx(record["choice_logprobs"], abs=1e-4)
        assert mine.index(max(mine)) == record["prediction"]
        assert samples[doc_id]["acc"] == float(record["prediction"] == int(samples[doc_id]["target"]))


def test_rolling_log_likelihood_equals_evaluate_py_language_model_scoring(readme_run, demo_dir, tmp_path):
    records = evaluate_py(demo_model_args(demo_dir), tmp_path, DATA / "glm" / "documents.yaml", "documents")
    samples = read_samples(readme_run()[1], "glm_documents")
    assert len(samples) == len(records) == 4  # short documents: one window each
    for doc_id, record in enumerate(records):
        # a sum over a document's tokens: fp32 rounding of the batch (padded here, alone there) grows with it
        assert float(samples[doc_id]["resps"][0][0]) == pytest.approx(-record["loss"], rel=1e-6, abs=1e-4)


def test_readme_command_prints_lm_eval_table_and_files_results_under_the_model_name(readme_run):
    proc, out = readme_run()
    for task in TASKS.split(","):
        assert f"|{task}" in proc.stdout
    assert list((out / "glm130b").glob("results_*.json"))


@pytest.mark.parametrize("mp", [2, 1], ids=["tensor-parallel", "data-parallel"])
def test_two_ranks_under_torchrun_equal_one_process(mp, test_tokenizer_path, tmp_path):
    """lm_eval_harness.py under torchrun with 2 ranks (gloo), tensor parallel (TP=2) or data parallel (lm-eval
    shares the documents out, the results are gathered): every request's number equals the one-process model's on
    the same requests; rank 0 alone writes the results."""
    from evaluation.harness import GLM130BHarness
    from tests.helpers import load_fixture_model
    from model.tokenizer import IceTokenizer
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), "lm_eval_harness.py",
           *fixture_model_args(mp=mp, extra=("--tokenizer-path", test_tokenizer_path)),
           "--include_path", "tests/data/lm_eval/tasks", "--tasks", TASKS, "--batch_size", "3", "--log_samples",
           "--output_path", str(out)]
    env = offline_env({**os.environ, "OMP_NUM_THREADS": "1"}, tmp_path)
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("|glm_choices") == 1  # one table: rank 0's
    lm = GLM130BHarness(load_fixture_model(), IceTokenizer(test_tokenizer_path), fixture_config().max_sequence_length,
                        batch_size=3)
    for task in TASKS.split(","):
        samples = read_samples(out, task)
        assert sorted(samples) == list(range(len(samples))) and samples
        for sample in samples.values():
            order = sorted(sample["arguments"], key=lambda key: int(key.split("_")[-1]))  # gen_args_0, _1, ...
            for key, resp in zip(order, sample["resps"]):
                args = sample["arguments"][key]
                request = Request(*[args[f"arg_{i}"] for i in range(len(args))])
                if task == "glm_choices":
                    assert float(resp[0][0]) == pytest.approx(lm.loglikelihood([request], True)[0][0], abs=1e-4)
                elif task == "glm_documents":
                    assert float(resp[0]) == pytest.approx(lm.loglikelihood_rolling([request], True)[0], rel=1e-6,
                                                           abs=1e-4)
                else:
                    assert resp[0] == lm.generate_until([request], True)[0]
