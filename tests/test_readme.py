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
