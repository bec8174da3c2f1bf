"""A TP=2 server (two gloo ranks under torchrun, started by scripts/server.sh) answers what a TP=1 server answers,
also around sequences that fail inside the engine; SIGTERM to scripts/server.sh stops both ranks and exits 0; an
engine-level failure under TP ends every rank with a non-zero status."""
import os
import signal
import sys

import httpx
import pytest

from tests.helpers import fixture_model_args, free_port
from tests.workers.server_process import ServerProcess

PROMPTS = ["The capital of France is [MASK].", "Tell me a story about a cat.", "清华大学位于[MASK]，[MASK]。"]
FAULTS = "raise:POISON-RAISE,nan:POISON-NAN,fatal:POISON-FATAL"


def start(mp, tokenizer_path, tmp_path):
    """TP 1: server.py; TP > 1: scripts/server.sh with a model config for the fixture's TP checkpoint."""
    args = fixture_model_args(mp=mp, extra=("--tokenizer-path", tokenizer_path))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GLM_TEST_FAULTS": FAULTS}
    log = tmp_path / f"tp{mp}.log"
    if mp == 1:
        return ServerProcess([sys.executable, "server.py", *args, "--max-slots", "4"], env, log)
    config = tmp_path / f"model_tp{mp}.sh"
    config.write_text(f'CHECKPOINT_PATH="{args[args.index("--load") + 1]}"\nMP_SIZE={mp}\n'
                      f'MODEL_ARGS="{" ".join(args)}"\n')
    env.update(MODEL_CONFIG=str(config), MASTER_PORT=str(free_port()))
    return ServerProcess(["bash", "scripts/server.sh", "--max-slots", "4"], env, log)


def post(server, body):
    return httpx.post(server.url + "/v1/completions", json={"model": "glm-130b", **body}, timeout=120)


def answers(server):
    """The texts of greedy (batched, several blanks), seeded sampling and beam search around two sequences that fail
    mid-decode (500 each); the echo log-probs."""
    out = [c["text"] for c in post(server, {"prompt": PROMPTS, "max_tokens": 8, "temperature": 0}).json()["choices"]]
    for marker in ("POISON-RAISE", "POISON-NAN"):
        failed = post(server, {"prompt": [f"{marker} {PROMPTS[1]}", PROMPTS[0]], "max_tokens": 8, "temperature": 0})
        assert failed.status_code == 500 and failed.json()["error"]["type"] == "server_error", failed.text
    out += [c["text"] for c in post(server, {"prompt": PROMPTS[1], "max_tokens": 8, "temperature": 1.2, "top_p": 0.9,
                                             "seed": 3, "n": 2}).json()["choices"]]
    out.append(post(server, {"prompt": PROMPTS[0], "max_tokens": 6, "num_beams": 2}).json()["choices"][0]["text"])
    echo = post(server, {"prompt": PROMPTS[1], "max_tokens": 0, "echo": True, "logprobs": 0}).json()
    return out, echo["choices"][0]["logprobs"]["token_logprobs"]


@pytest.mark.parametrize("mp", [2])
def test_tp2_server_answers_as_tp1_and_stops_cleanly(mp, test_tokenizer_path, tmp_path):
    results = {}
    servers = {size: start(size, test_tokenizer_path, tmp_path) for size in (1, mp)}  # both load at the same time
    try:
        for size, server in servers.items():
            try:
                server.wait_ready()
                results[size] = answers(server)
                if size == 1:
                    assert server.stop() == 0, server.output()[-3000:]
                else:  # SIGTERM to scripts/server.sh itself, as a supervisor sends it
                    os.kill(server.proc.pid, signal.SIGTERM)
                    assert server.proc.wait(120) == 0, server.output()[-3000:]
            finally:
                server.kill()
            output = server.output()
            for rank in range(size):
                assert f"> server rank {rank} stopped" in output, output[-3000:]
            assert "Traceback" not in output and "terminate called" not in output, output[-3000:]
    finally:
        for server in servers.values():
            server.kill()
    (texts, echo), (texts_tp, echo_tp) = results[1], results[mp]
    assert texts_tp == texts and all(texts) and len(texts) == 6
    assert len(echo_tp) == len(echo) and max(abs(a - b) for a, b in zip(echo, echo_tp)) <= 1e-4


def test_an_engine_failure_under_tp_ends_every_rank(test_tokenizer_path, tmp_path):
    server = start(2, test_tokenizer_path, tmp_path)
    try:
        server.wait_ready()
        failed = post(server, {"prompt": "POISON-FATAL x", "max_tokens": 4})
        assert failed.status_code == 503 and "the engine failed" in failed.json()["error"]["message"]
        assert server.proc.wait(120) != 0
    finally:
        server.kill()
    output = server.output()
    assert output.count("exiting with status 3: the engine failed") == 2, output[-3000:]


def children(pid: int):
    """Pids of the processes whose parent is `pid` (from /proc)."""
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                        out.append(int(entry))
            except (OSError, IndexError, ValueError):
                pass
    return out


def test_a_lost_tp_rank_ends_the_server_instead_of_hanging_it(test_tokenizer_path, tmp_path):
    """SIGKILL to rank 1: rank 0's next broadcast (an idle heartbeat at the latest) fails, the server stops
    answering and every process exits, non-zero; nothing waits forever."""
    server = start(2, test_tokenizer_path, tmp_path)
    try:
        server.wait_ready()
        rank0 = server.serving_pid()
        with open(f"/proc/{rank0}/stat") as f:
            launcher = int(f.read().rsplit(")", 1)[1].split()[1])
        (rank1,) = [pid for pid in children(launcher) if pid != rank0]
        os.kill(rank1, signal.SIGKILL)
        assert server.proc.wait(120) != 0
    finally:
        server.kill()
    assert "> server rank 1 stopped" not in server.output()
