"""A TP=2 server (two gloo ranks under torchrun) answers what a TP=1 server answers, and SIGTERM stops both ranks."""
import os
import sys

import httpx
import pytest

from tests.helpers import fixture_model_args, free_port
from tests.workers.server_process import ServerProcess

PROMPTS = ["The capital of France is [MASK].", "Tell me a story about a cat.", "清华大学位于[MASK]，[MASK]。"]


def start(mp, tokenizer_path, log):
    args = fixture_model_args(mp=mp, extra=("--tokenizer-path", tokenizer_path))
    script = ["server.py", *args, "--max-slots", "4"]
    if mp > 1:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(mp), "--master_addr",
                    "127.0.0.1", "--master_port", str(free_port())]
    else:
        launcher = [sys.executable]
    return ServerProcess([*launcher, *script], {**os.environ, "OMP_NUM_THREADS": "1"}, log)


def answers(server):
    """The texts of greedy (batched, several blanks), seeded sampling and beam search; the echo log-probs."""
    post = lambda body: httpx.post(server.url + "/v1/completions", json={"model": "glm-130b", **body},  # noqa: E731
                                   timeout=120).json()
    out = [c["text"] for c in post({"prompt": PROMPTS, "max_tokens": 8, "temperature": 0})["choices"]]
    out += [c["text"] for c in post({"prompt": PROMPTS[1], "max_tokens": 8, "temperature": 1.2, "top_p": 0.9,
                                     "seed": 3, "n": 2})["choices"]]
    out.append(post({"prompt": PROMPTS[0], "max_tokens": 6, "num_beams": 2})["choices"][0]["text"])
    echo = post({"prompt": PROMPTS[1], "max_tokens": 0, "echo": True, "logprobs": 0})["choices"][0]["logprobs"]
    return out, echo["token_logprobs"]


@pytest.mark.parametrize("mp", [2])
def test_tp2_server_answers_as_tp1_and_stops_cleanly(mp, test_tokenizer_path, tmp_path):
    results = {}
    for size in (1, mp):
        server = start(size, test_tokenizer_path, tmp_path / f"tp{size}.log")
        try:
            server.wait_ready()
            results[size] = answers(server)
            assert server.stop() == 0, server.output()[-3000:]
        finally:
            server.kill()
        output = server.output()
        for rank in range(size):
            assert f"> server rank {rank} stopped" in output, output[-3000:]
        assert "Traceback" not in output and "terminate called" not in output, output[-3000:]
    (texts, echo), (texts_tp, echo_tp) = results[1], results[mp]
    assert texts_tp == texts and all(texts) and len(texts) == 6
    assert len(echo_tp) == len(echo) and max(abs(a - b) for a, b in zip(echo, echo_tp)) <= 1e-4
