"""server.py's limits on the demo model: a full queue answers 429 at once, a client that goes away frees its slot,
and bad requests get one-line OpenAI-shaped 4xx JSON errors while the server goes on answering."""
import json
import os
import signal
import threading
import time

import httpx
import pytest

from tests.test_generation_cli import demo_env, demo_model_args
from tests.workers.server_process import ServerProcess

LONG = 480  # tokens: the demo model's sequence length is 512


@pytest.fixture(scope="module")
def server(demo_dir, tmp_path_factory):
    log = tmp_path_factory.mktemp("server") / "server.log"
    cmd = ["python", "server.py", *demo_model_args(demo_dir), "--max-slots", "1", "--max-queue", "1", "--max-n", "4",
           "--shutdown-timeout", "1"]
    proc = ServerProcess(cmd, demo_env(demo_dir), log)
    try:
        proc.wait_ready()
        yield proc
        assert proc.stop() == 0, proc.output()[-3000:]
        assert "Traceback" not in proc.output(), proc.output()[-3000:]
    finally:
        proc.kill()


def metrics(server):
    from server.metrics import parse
    return parse(httpx.get(server.url + "/metrics", timeout=10).text)


def wait_for(condition, timeout=60.0):
    end = time.time() + timeout
    while time.time() < end:
        if condition():
            return
        time.sleep(0.05)
    raise AssertionError("condition not reached")


def greedy(prompt, max_tokens, stream=False):
    return {"model": "glm-130b", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": stream}


def test_full_queue_answers_429_and_a_disconnect_frees_the_slot(server):
    prompt = "Tell me a story about a cat."
    expected = httpx.post(server.url + "/v1/completions", json=greedy(prompt, 8), timeout=60).json()["choices"][0]
    with httpx.Client(timeout=60) as first:
        with first.stream("POST", server.url + "/v1/completions", json=greedy(prompt, LONG, True)) as running:
            lines = running.iter_lines()  # kept: a dropped iterator closes the response
            next(lines)  # it holds the only slot now
            queued = {}
            waiter = threading.Thread(target=lambda: queued.update(
                httpx.post(server.url + "/v1/completions", json=greedy(prompt, 8), timeout=120).json()))
            waiter.start()
            wait_for(lambda: metrics(server)["glm_queue_depth"] == 1)
            start = time.time()
            refused = httpx.post(server.url + "/v1/completions", json=greedy(prompt, 8), timeout=60)
            assert refused.status_code == 429 and time.time() - start < 10
            assert "queue is full" in refused.json()["error"]["message"]
            assert refused.json()["error"]["type"] == "rate_limit_error"
            assert metrics(server)["glm_running_sequences"] == 1
        # the stream is closed mid-way: its sequence is cancelled and the queued request gets the slot
        waiter.join(60)
    assert queued["choices"][0]["text"] == expected["text"]
    wait_for(lambda: metrics(server)["glm_running_sequences"] == 0)
    assert metrics(server)['glm_requests_total{outcome="cancelled"}'] >= 1


BAD = [  # (name, method, path, raw body or JSON, status)
    ("not utf-8", "POST", "/v1/completions", b'{"prompt": "\xff\xfe"}', 400),
    ("not json", "POST", "/v1/completions", b"prompt=hello", 400),
    ("not an object", "POST", "/v1/completions", b"[1, 2]", 400),
    ("unknown field", "POST", "/v1/completions", {"prompt": "x", "colour": 1}, 400),
    ("no prompt", "POST", "/v1/completions", {"max_tokens": 4}, 400),
    ("prompt a number", "POST", "/v1/completions", {"prompt": 5}, 400),
    ("prompt token ids", "POST", "/v1/completions", {"prompt": [1, 2, 3]}, 400),
    ("prompt empty list", "POST", "/v1/completions", {"prompt": []}, 400),
    ("prompt blank", "POST", "/v1/completions", {"prompt": "   "}, 400),
    ("max_tokens a string", "POST", "/v1/completions", {"prompt": "x", "max_tokens": "ten"}, 400),
    ("max_tokens a bool", "POST", "/v1/completions", {"prompt": "x", "max_tokens": True}, 400),
    ("max_tokens 0", "POST", "/v1/completions", {"prompt": "x", "max_tokens": 0}, 400),
    ("max_tokens negative", "POST", "/v1/completions", {"prompt": "x", "max_tokens": -3}, 400),
    ("max_tokens past the sequence", "POST", "/v1/completions", {"prompt": "x", "max_tokens": 100000}, 400),
    ("prompt + max_tokens past the sequence", "POST", "/v1/completions",
     {"prompt": "cat " * 200, "max_tokens": 400}, 400),
    ("prompt too long", "POST", "/v1/completions", {"prompt": "cat " * 700}, 400),
    ("temperature negative", "POST", "/v1/completions", {"prompt": "x", "temperature": -1}, 400),
    ("temperature a string", "POST", "/v1/completions", {"prompt": "x", "temperature": "hot"}, 400),
    ("top_p above 1", "POST", "/v1/completions", {"prompt": "x", "top_p": 1.5}, 400),
    ("top_k negative", "POST", "/v1/completions", {"prompt": "x", "top_k": -1}, 400),
    ("n 0", "POST", "/v1/completions", {"prompt": "x", "n": 0}, 400),
    ("n too large", "POST", "/v1/completions", {"prompt": "x", "n": 100}, 400),
    ("more sequences than the queue", "POST", "/v1/completions", {"prompt": ["x", "y"], "n": 2}, 400),
    ("stop a number", "POST", "/v1/completions", {"prompt": "x", "stop": 5}, 400),
    ("too many stops", "POST", "/v1/completions", {"prompt": "x", "stop": list("abcde")}, 400),
    ("seed a string", "POST", "/v1/completions", {"prompt": "x", "seed": "x"}, 400),
    ("stream a string", "POST", "/v1/completions", {"prompt": "x", "stream": "yes"}, 400),
    ("logprobs too many", "POST", "/v1/completions", {"prompt": "x", "logprobs": 50}, 400),
    ("two mask kinds", "POST", "/v1/completions", {"prompt": "A [MASK] B [gMASK] C"}, 400),
    ("echo with a mask", "POST", "/v1/completions", {"prompt": "A [MASK] B", "echo": True}, 400),
    ("num_beams 0", "POST", "/v1/completions", {"prompt": "x", "num_beams": 0}, 400),
    ("beam search streamed", "POST", "/v1/completions", {"prompt": "x", "num_beams": 3, "stream": True}, 400),
    ("presence_penalty", "POST", "/v1/completions", {"prompt": "x", "presence_penalty": 0.5}, 400),
    ("best_of", "POST", "/v1/completions", {"prompt": "x", "best_of": 3}, 400),
    ("suffix", "POST", "/v1/completions", {"prompt": "x", "suffix": "y"}, 400),
    ("bad stream_options", "POST", "/v1/completions", {"prompt": "x", "stream_options": {"x": 1}}, 400),
    ("unknown model", "POST", "/v1/completions", {"model": "gpt-4", "prompt": "x"}, 404),
    ("chat completions", "POST", "/v1/chat/completions", {"model": "glm-130b", "messages": []}, 400),
    ("GET completions", "GET", "/v1/completions", None, 405),
    ("unknown path", "GET", "/v2/nothing", None, 404),
]


@pytest.mark.parametrize("name,method,path,body,status", BAD, ids=[b[0] for b in BAD])
def test_bad_request_gets_a_4xx_json_error(server, name, method, path, body, status):
    content = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    response = httpx.request(method, server.url + path, content=content, timeout=30,
                             headers={"Content-Type": "application/json"})
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["message"] and "\n" not in error["message"] and "Traceback" not in error["message"]
    assert error["type"].endswith("_error")
    assert httpx.get(server.url + "/health", timeout=10).status_code == 200


def test_answers_after_the_bad_requests(server):
    ok = httpx.post(server.url + "/v1/completions", json=greedy("A [MASK] B", 4), timeout=60)
    assert ok.status_code == 200 and ok.json()["choices"][0]["text"].startswith("A")
    assert "chat" in httpx.post(server.url + "/v1/chat/completions", json={}).json()["error"]["message"]
    assert metrics(server)['glm_requests_total{outcome="bad_request"}'] >= 20


def test_sigterm_with_a_stream_in_flight_stops_cleanly(server):
    """SIGTERM while a stream decodes: the stream gets --shutdown-timeout to finish, then ends with finish_reason
    "cancelled" and [DONE]; the server exits 0 without a traceback. (The module's server: this test stops it, so it
    stays the last one of the module.)"""
    proc = server
    with httpx.stream("POST", proc.url + "/v1/completions", timeout=60,
                      json=greedy("Tell me a story about a cat.", LONG, True)) as running:
        lines = running.iter_lines()
        next(lines)
        os.kill(proc.serving_pid(), signal.SIGTERM)
        received = [line for line in lines if line.startswith("data: ")]
    assert received[-1] == "data: [DONE]" and len(received) < LONG  # cut short, not run to the end
    assert json.loads(received[-2][6:])["choices"][0]["finish_reason"] == "cancelled"
    assert proc.stop() == 0, proc.output()[-3000:]
    assert "> server rank 0 stopped" in proc.output() and "Traceback" not in proc.output()
