"""The README's setup commands are the ones CI runs."""
from tests.helpers import ROOT


def readme_setup_commands():
    text = (ROOT / "README.md").read_text()
    block = text.split("```bash\n", 1)[1].split("```", 1)[0]
    return [line for line in block.splitlines() if line.strip()]


def test_readme_opens_with_two_setup_commands_run_by_ci():
    commands = readme_setup_commands()
    assert len(commands) == 2
    assert commands[0].startswith("pip install -r requirements.txt")
    ci_lines = [l.strip() for l in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert commands[0] in ci_lines and commands[1] in ci_lines
    assert ci_lines.index(commands[0]) < ci_lines.index(commands[1])


def test_sequential_initialization_two_processes(test_tokenizer_path):
    from tests.helpers import fixture_model_args, torchrun
    args = fixture_model_args(mp=2, extra=("--sequential-initialization", "--tokenizer-path", test_tokenizer_path))
    proc = torchrun(ROOT / "tests" / "workers" / "init_worker.py", args, nprocs=2)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.count("> Model initialized in") == 1  # rank 0 only
    sums = [line.split("checksum=")[1] for line in proc.stdout.splitlines() if "checksum=" in line]
    assert len(sums) == 2 and sums[0] != sums[1]  # each rank holds its own shard


def readme_command(prefix):
    """The README line that starts with `prefix` (the README's commands are run here exactly as written)."""
    text = (ROOT / "README.md").read_text()
    return next(line for line in text.splitlines() if line.startswith(prefix))


def test_readme_evaluation_example_runs_on_the_demo(demo_dir):
    import os
    import subprocess
    command = readme_command("DATA_PATH=tests/data/eval bash scripts/evaluate.sh")
    env = {k: v for k, v in os.environ.items() if k != "CHECKPOINT_PATH"}
    proc = subprocess.run(["bash", "-c", command], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Evaluation results of task glue_cola:" in proc.stdout
    assert "Group Overall Accuracy: max = " in proc.stdout
    assert "Finish 2 task(s) in" in proc.stdout
    assert (ROOT / "outputs" / "MMLU" / "results.json").is_file()
