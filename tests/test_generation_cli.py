"""generate.py and scripts/generate.sh on the embedded demo model: interactive (through a pseudo-terminal) and files."""
import functools
import os
import pty
import re
import select
import shlex
import subprocess
import sys
import time

import pytest

import generate
from initialize import parse_args
from model.errors import UserError
from tests.helpers import ROOT

PROMPT = "Please Input Query (stop to exit) >>> "
MASK_STYLE, GMASK_STYLE = "\x1b[0;32m\x1b[4m", "\x1b[4m"


def demo_env(demo_dir):
    env = {k: v for k, v in os.environ.items() if k not in ("CHECKPOINT_PATH", "MODEL_CONFIG")}
    env.update(GLM_DEMO_DIR=demo_dir, CHECKPOINT_PATH=os.path.join(demo_dir, "no-such-checkpoint"),
               OMP_NUM_THREADS="1")
    return env


def demo_model_args(demo_dir):
    """The demo config's MODEL_ARGS, read from configs/model_glm_demo.sh itself (once per demo folder: sourcing the
    config runs tools/create_demo.py, ~2 s, and many tests ask)."""
    return list(_demo_model_args(demo_dir))


@functools.lru_cache(maxsize=None)
def _demo_model_args(demo_dir):
    out = subprocess.run(["bash", "-c", "source configs/model_glm_demo.sh >/dev/null && echo $MODEL_ARGS"], cwd=ROOT,
                         env=demo_env(demo_dir), capture_output=True, text=True, check=True)
    return tuple(shlex.split(out.stdout))


class Terminal:
    """A child process on a pseudo-terminal: write lines, read until a text shows up."""

    def __init__(self, cmd, env):
        self.master, slave = pty.openpty()
        self.proc = subprocess.Popen(cmd, stdin=slave, stdout=slave, stderr=slave, cwd=ROOT, env=env,
                                     close_fds=True)
        os.close(slave)
        self.buffer = ""

    def read_until(self, text, timeout=180.0):
        end = time.time() + timeout
        while text not in self.buffer:
            left = end - time.time()
            assert left > 0 and self.proc.poll() is None or text in self.buffer, \
                f"{text!r} not seen; output so far:\n{self.buffer[-3000:]}"
            ready, _, _ = select.select([self.master], [], [], min(left, 1.0))
            if ready:
                try:
                    self.buffer += os.read(self.master, 65536).decode("utf-8", "replace")
                    self.buffer = self.buffer.replace("\r\n", "\n")  # the terminal's newline translation
                except OSError:  # the child closed the terminal
                    break
        assert text in self.buffer, f"{text!r} not seen; output so far:\n{self.buffer[-3000:]}"
        head, _, self.buffer = self.buffer.partition(text)
        return head

    def send(self, line):
        os.write(self.master, (line + "\n").encode())


def test_interactive_session_through_generate_sh(tmp_path, demo_dir, test_tokenizer):
    out_dir = tmp_path / "samples"
    term = Terminal(["bash", "scripts/generate.sh", "--output-path", str(out_dir), "--out-seq-length", "40"],
                    demo_env(demo_dir))
    try:
        term.read_until(PROMPT)
        term.send("Who is the greatest artist? The greatest artist is [MASK].")
        text = term.read_until(PROMPT)
        assert "\nInput: Who is the greatest artist? The greatest artist is [MASK].\n" in text
        assert "Output: Who is the greatest artist? The greatest artist is " + MASK_STYLE in text
        assert re.search(r"\nTaken time \d+\.\d\d\n", text)

        term.send("Tell me a story about a cat.")
        text = term.read_until(PROMPT)
        assert "Input: Tell me a story about a cat. [gMASK]\n" in text
        assert "Output: Tell me a story about a cat. " + GMASK_STYLE in text

        term.send("")
        assert "Query should not be empty!" in term.read_until(PROMPT)

        long_text = "cat " * 700
        assert len(test_tokenizer.tokenize(long_text)) > 512  # the demo model's --max-sequence-length
        term.send(long_text.strip())
        text = term.read_until(PROMPT)
        assert "error: text too long" in text and "Traceback" not in text and "Output:" not in text

        term.send("stop")
        assert term.proc.wait(timeout=60) == 0
    finally:
        if term.proc.poll() is None:
            term.proc.kill()
        os.close(term.master)
    files = sorted(os.listdir(out_dir))
    assert len(files) == 2, files
    stamp = r"-\d\d-\d\d-\d\d-\d\d-\d\d\.txt$"
    assert re.match(r"Tell me a story abou" + stamp, files[0]) and re.match(r"Who is the greatest " + stamp, files[1])
    lines = (out_dir / files[1]).read_text(encoding="utf-8").splitlines()
    assert len(lines) == 1 and lines[0].startswith("Who is the greatest artist? The greatest artist is")
    assert "\x1b" not in lines[0] and "[MASK]" not in lines[0]


PROMPTS = ["q1\tWho is the greatest artist? The greatest artist is [MASK].",
           "q2\tThe capital of France is [MASK], and the capital of Japan is [MASK].",
           "",
           "q3\tTell me a story about a cat.",
           "q4\t清华大学位于[MASK]。",
           "q5\tA B [sMASK] C [gMASK] D"]


def test_file_input_batched_equals_one_by_one(tmp_path, demo_dir, capsys):
    source = tmp_path / "prompts.txt"
    source.write_text("\n".join(PROMPTS) + "\n", encoding="utf-8")
    outputs = {}
    for batch in (4, 1):
        out = tmp_path / f"out{batch}"
        generate.main([*demo_model_args(demo_dir), "--input-source", str(source), "--output-path", str(out),
                       "--with-id", "--top_k", "1", "--out-seq-length", "48", "--batch-size", str(batch)])
        outputs[batch] = {f: (out / f).read_text(encoding="utf-8") for f in sorted(os.listdir(out))}
        printed = capsys.readouterr().out
        assert printed.count("\nInput: ") == 5 and printed.count("Output: ") == 5
        assert "Working on No. 5 on model group 0... " in printed
    assert list(outputs[4]) == ["q1.txt", "q2.txt", "q3.txt", "q4.txt", "q5.txt"]
    assert outputs[4] == outputs[1]
    q5 = outputs[4]["q5.txt"]  # [sMASK] is filled; [gMASK] stays a literal token
    assert q5.startswith("A B") and "[[gMASK]]" in q5 and "sMASK" not in q5


def test_file_input_reports_bad_lines_and_goes_on(tmp_path, demo_dir, capsys):
    source = tmp_path / "prompts.txt"
    source.write_text("no tab here\nok\tA [MASK] B\n", encoding="utf-8")
    with pytest.raises(SystemExit) as exit_info:
        generate.main([*demo_model_args(demo_dir), "--input-source", str(source), "--output-path",
                       str(tmp_path / "out"), "--with-id", "--top_k", "1", "--max-new-tokens", "4"])
    assert exit_info.value.code == 2
    captured = capsys.readouterr()
    assert "error: line 1: --with-id expects '<id><TAB><text>'" in captured.err
    assert "1 input line(s) were skipped" in captured.err and "Traceback" not in captured.err
    assert os.listdir(tmp_path / "out") == ["ok.txt"]


def test_flags_aliases_and_defaults():
    base = ["--vocab-size", "150528"]
    args = parse_args(generate.add_generation_args, base)
    assert (args.top_k, args.top_p, args.temperature, args.num_beams, args.length_penalty, args.out_seq_length,
            args.input_source, args.output_path, args.sampling_strategy) == \
        (0, 0.0, 1.0, 1, 0.0, 256, "interactive", "./samples", "BaseStrategy")
    readme = parse_args(generate.add_generation_args, base + ["--top-k", "5", "--top-p", "0.5", "--print-all-beam"])
    original = parse_args(generate.add_generation_args, base + ["--top_k", "5", "--top_p", "0.5", "--print-all-beams"])
    for a in (readme, original):
        assert (a.top_k, a.top_p, a.print_all_beams) == (5, 0.5, True)
    last_wins = parse_args(generate.add_generation_args, base + ["--top_p", "0.7", "--top-p", "0.2"])
    assert last_wins.top_p == 0.2  # generate.sh's defaults come first, user flags last
    for bad, message in [(["--top_p", "2"], "--top_p"), (["--num-beams", "0"], "--num-beams"),
                         (["--input-source", "/no/such/file"], "--input-source")]:
        with pytest.raises(UserError, match=message):
            generate.validate_generation_args(parse_args(generate.add_generation_args, base + bad))


def test_output_file_names(tmp_path):
    assert generate.output_file(str(tmp_path), "abc", "text") == str(tmp_path / "abc.txt")
    first = generate.output_file(str(tmp_path), None, "a/b/c " * 10)
    assert re.match(r"abc abc abc abc abc -\d\d-\d\d-\d\d-\d\d-\d\d\.txt$", os.path.basename(first))
    open(first, "w").close()
    second = generate.output_file(str(tmp_path), None, "a/b/c " * 10)
    assert second != first  # a name taken in the same second gets -1 instead of being overwritten


@pytest.mark.parametrize("content", ["", "\n  \n\t\n"], ids=["empty", "blank-lines"])
def test_input_source_without_prompts_is_an_error(tmp_path, demo_dir, content):
    """A file with no prompts stops with one line and exit status 2 (not 0): a batch script running generate.py on
    a file it produced should notice that nothing was generated. It stops before the model loads."""
    source = tmp_path / "prompts.txt"
    source.write_text(content, encoding="utf-8")
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "generate.py", *demo_model_args(demo_dir), "--input-source", str(source),
                           "--output-path", str(out)], cwd=ROOT, env=demo_env(demo_dir), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip() == (f"error: --input-source {source} has no prompts (it is empty or holds only blank "
                                   f"lines): nothing to generate")
    assert "Traceback" not in proc.stdout + proc.stderr
    assert "Model initialized" not in proc.stdout and not out.exists()  # the model was never loaded
