"""Fault containment of server.py on the demo model: poison requests get a 4xx JSON error (or, where the README
documents it, a valid answer) and one console line each, and leave the server healthy with unchanged greedy text;
sequences that fail inside the engine (GLM_TEST_FAULTS: a raise mid-decode, NaN logits) end alone while healthy
streams decode beside them; an engine-level failure answers everything 503 at once and exits non-zero."""
import json
import socket
import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests.test_generation_cli import demo_env, demo_model_args
from tests.test_server_limits import metrics, wait_for
from tests.workers.server_process import ServerProcess

MAX_REQUEST_BYTES = 65536
GREEDY = {"model": "glm-130b", "prompt": "Once upon a time", "max_tokens": 12, "temperature": 0}


def raw(text: str) -> bytes:
    return text.encode()


# (name, body: dict or raw bytes, expected status, field named in the error or None)
POISON = [
    ("seed past 64 bits", {**GREEDY, "temperature": 1, "seed": 2 ** 64}, 400, "seed"),
    ("seed below -2^63", {**GREEDY, "temperature": 1, "seed": -2 ** 63 - 1}, 400, "seed"),
    ("NaN temperature", raw('{"prompt": "x", "temperature": NaN}'), 400, None),
    ("Infinity temperature", raw('{"prompt": "x", "temperature": Infinity}'), 400, None),
    ("overflowing temperature", raw('{"prompt": "x", "temperature": 1e999}'), 400, None),
    ("-Infinity top_p", raw('{"prompt": "x", "top_p": -Infinity}'), 400, None),
    ("NaN presence_penalty", raw('{"prompt": "x", "presence_penalty": NaN}'), 400, None),
    ("an integer temperature beyond the float range", raw('{"prompt": "x", "temperature": 1' + "0" * 400 + "}"),
     400, "temperature"),
    ("huge length_penalty", {**GREEDY, "num_beams": 4, "length_penalty": 1e300}, 400, "length_penalty"),
    ("huge negative length_penalty", {**GREEDY, "num_beams": 4, "length_penalty": -1e300}, 400, "length_penalty"),
    ("huge no_repeat_ngram_size", {**GREEDY, "num_beams": 4, "no_repeat_ngram_size": 10 ** 30}, 400,
     "no_repeat_ngram_size"),
    ("huge top_k", {**GREEDY, "temperature": 1, "top_k": 10 ** 30}, 400, "top_k"),
    ("integer of 5000 digits", raw('{"prompt": "x", "max_tokens": ' + "9" * 5000 + "}"), 400, None),
    ("JSON nested 20000 deep", raw('{"prompt": ' + "[" * 20000 + "]" * 20000 + "}"), 400, None),
    ("lone surrogate in the prompt", raw('{"prompt": "a\\ud800b"}'), 400, "prompt"),
    ("NUL in the prompt", raw('{"prompt": "a\\u0000b"}'), 400, "prompt"),
    ("lone surrogate in a stop string", raw('{"prompt": "ab", "stop": ["\\udfff"]}'), 400, "stop"),
    ("a prompt of 200000 characters", {"prompt": "word " * 40000}, 413, None),  # over --max-request-bytes
    ("a prompt longer than any tokenization fits", {"prompt": "w" * 60000}, 400, "prompt"),
    ("a negative number of choices", {**GREEDY, "n": -1}, 400, "n"),
    ("logprobs of a bool", {**GREEDY, "logprobs": True}, 400, "logprobs"),
    ("a 50 MB body (Content-Length)", "declared", 413, None),
    ("a chunked body past the limit", "chunked", 413, None),
    ("a sequence that raises mid-decode", {**GREEDY, "prompt": "POISON-RAISE story"}, 500, None),
    ("a sequence with NaN logits", {**GREEDY, "prompt": "POISON-NAN story"}, 500, None),
    # documented valid answers (README "Serving": the temperature floor, top_p 0, the seed range, beam limits)
    ("temperature 1e-30 is greedy", {**GREEDY, "temperature": 1e-30, "seed": 3}, 200, "greedy"),
    ("top_p 0 is greedy", {**GREEDY, "temperature": 1.0, "top_p": 0}, 200, "greedy"),
    ("the largest seed with n 2", {**GREEDY, "temperature": 1, "seed": 2 ** 64 - 1, "n": 2}, 200, None),
    ("the smallest seed", {**GREEDY, "temperature": 1, "seed": -2 ** 63}, 200, None),
    ("beam search at its limits", {**GREEDY, "num_beams": 8, "length_penalty": 10, "no_repeat_ngram_size": 512},
     200, None),
]


@pytest.fixture(scope="module")
def server(demo_dir, tmp_path_factory):
    log = tmp_path_factory.mktemp("server") / "server.log"
    env = {**demo_env(demo_dir), "GLM_TEST_FAULTS": "raise:POISON-RAISE,nan:POISON-NAN"}
    cmd = ["python", "server.py", *demo_model_args(demo_dir), "--max-slots", "8",
           "--max-request-bytes", str(MAX_REQUEST_BYTES)]
    proc = ServerProcess(cmd, env, log)
    try:
        proc.wait_ready()
        yield proc
        assert proc.stop() == 0, proc.output()[-3000:]
        assert "Traceback" not in proc.output(), proc.output()[-3000:]
    finally:
        proc.kill()


def send_raw(server, head: bytes, body: bytes = b"") -> tuple:
    """One request over a plain socket: (status, JSON body) of the answer."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=60) as s:
        s.sendall(head + body)
        answer = b""
        while b"\r\n\r\n" not in answer or len(answer.split(b"\r\n\r\n", 1)[1]) < _length(answer):
            part = s.recv(65536)
            if not part:
                break
            answer += part
    header, payload = answer.split(b"\r\n\r\n", 1)
    return int(header.split()[1]), json.loads(payload)


def _length(answer: bytes) -> int:
    for line in answer.split(b"\r\n\r\n", 1)[0].split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            return int(line.split(b":")[1])
    return 0


def send(server, body) -> tuple:
    if body == "declared":  # the headers only: the answer must come before any body byte is read
        return send_raw(server, b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                                b"Content-Length: 50000000\r\n\r\n")
    if body == "chunked":
        data = b'{"prompt": "' + b"a" * (MAX_REQUEST_BYTES + 100) + b'"}'
        chunked = b"%x\r\n%s\r\n0\r\n\r\n" % (len(data), data)
        return send_raw(server, b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                                b"Transfer-Encoding: chunked\r\n\r\n", chunked)
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    response = httpx.post(server.url + "/v1/completions", content=content, timeout=120,
                          headers={"Content-Type": "application/json"})
    return response.status_code, response.json()


def greedy_text(server, body=GREEDY) -> str:
    response = httpx.post(server.url + "/v1/completions", json=body, timeout=120)
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["text"]


def test_poison_requests_one_after_another_leave_the_server_healthy_and_unchanged(server):
    before = greedy_text(server)
    assert len(POISON) >= 20
    for name, body, status, field in POISON:
        got, answer = send(server, body)
        assert got == status, (name, answer)
        if status == 200:
            assert all(c["text"] for c in answer["choices"]), name
            if field == "greedy":
                assert answer["choices"][0]["text"] == before, name
        else:
            error = answer["error"]
            assert error["message"] and "\n" not in error["message"] and "Traceback" not in error["message"], name
            assert error["type"] == ("server_error" if status >= 500 else "invalid_request_error"), name
            assert field is None or error["param"] == field, (name, error)
        assert httpx.get(server.url + "/health", timeout=10).status_code == 200, name
        assert greedy_text(server) == before, name
    log = server.output()
    for name, body, status, field in POISON:  # one console line per rejected request: status, field, message
        if status != 200:
            assert f"> {status} POST /v1/completions ({field or '-'}): " in log, name
    assert sum(f"> {status} " in line for line in log.splitlines() for status in (400, 413, 500)) >= 24


def stream_text(server, body) -> tuple:
    """(concatenated text, the error event or None, whether [DONE] came last) of one streamed request."""
    pieces, error, lines = [], None, []
    with httpx.stream("POST", server.url + "/v1/completions", json={**body, "stream": True}, timeout=120) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: "):
                lines.append(line)
    for line in lines[:-1]:
        data = json.loads(line[6:])
        if "error" in data:
            error = data["error"]
        else:
            pieces.append(data["choices"][0]["text"])
    return "".join(pieces), error, lines[-1] == "data: [DONE]"


def test_healthy_streams_complete_while_poison_arrives(server):
    prompts = ["Tell me a story about a cat.", "The capital of France is [MASK].", "Once upon a time",
               "A B [sMASK] C", "GLM-130B is", "清华大学位于[MASK]。", "hello hello", "x [MASK] y [MASK] z"]
    healthy = [{**GREEDY, "prompt": p, "max_tokens": 10 + 5 * i} for i, p in enumerate(prompts)]
    single = [greedy_text(server, body) for body in healthy]
    poison = [{**GREEDY, "prompt": f"POISON-RAISE {p}", "max_tokens": 30} for p in prompts[:3]]
    poison += [{**GREEDY, "prompt": f"POISON-NAN {p}", "max_tokens": 30} for p in prompts[3:6]]
    rejected = [b for _, b, status, _ in POISON if 400 <= status < 500 and isinstance(b, (dict, bytes))][:10]
    with ThreadPoolExecutor(8 + len(poison) + 1) as pool:
        streams = [pool.submit(stream_text, server, body) for body in healthy]
        failing = [pool.submit(stream_text, server, body) for body in poison]
        statuses = pool.submit(lambda: [send(server, body)[0] for body in rejected])
        assert [f.result()[0] for f in streams] == single
        assert all(f.result()[1] is None and f.result()[2] for f in streams)
        for f in failing:
            _, error, done = f.result()
            assert error["type"] == "server_error" and "generation failed" in error["message"] and done
        assert all(400 <= s < 500 for s in statuses.result())
    wait_for(lambda: metrics(server)["glm_running_sequences"] == 0)
    assert metrics(server)['glm_requests_total{outcome="failed"}'] >= len(poison)


def test_an_engine_failure_answers_everything_503_and_exits_non_zero(demo_dir, tmp_path):
    """Two streams hold both slots, an engine-level failure (GLM_TEST_FAULTS fatal, at its admission) is queued
    first and a plain request behind it; when a slot frees, the failure happens: the running stream gets an error
    event and [DONE], the queued requests 503, /health 503, and the process exits with status 3. (A sequence length
    of 4096 makes the streams that hold the slots outlast the test's steps on a loaded machine.)"""
    env = {**demo_env(demo_dir), "GLM_TEST_FAULTS": "fatal:POISON-FATAL"}
    cmd = ["python", "server.py", *demo_model_args(demo_dir), "--max-slots", "2", "--max-sequence-length", "4096"]
    proc = ServerProcess(cmd, env, tmp_path / "server.log")
    try:
        proc.wait_ready()
        long = {**GREEDY, "prompt": "Tell me a story about a cat.", "max_tokens": 4000, "stream": True}
        answers = {}

        def post(name, body):
            answers[name] = httpx.post(proc.url + "/v1/completions", json=body, timeout=120)

        fatal = threading.Thread(target=post, args=("fatal", {**GREEDY, "prompt": "POISON-FATAL x"}))
        queued = threading.Thread(target=post, args=("queued", GREEDY))
        with httpx.stream("POST", proc.url + "/v1/completions", json=long, timeout=120) as first:
            lines = first.iter_lines()
            next(lines)
            with httpx.stream("POST", proc.url + "/v1/completions", json=long, timeout=120) as second:
                held = second.iter_lines()  # kept: a dropped iterator closes the response
                next(held)  # both slots are taken
                fatal.start()
                wait_for(lambda: metrics(proc)["glm_queue_depth"] == 1)
                queued.start()
                wait_for(lambda: metrics(proc)["glm_queue_depth"] == 2)
            # the second stream is closed: its slot frees and the failing sequence is admitted
            rest = [line for line in lines if line.startswith("data: ")]
        fatal.join(120)
        queued.join(120)
        assert rest[-1] == "data: [DONE]" and "the engine failed" in json.loads(rest[-2][6:])["error"]["message"]
        for name in ("fatal", "queued"):
            assert answers[name].status_code == 503, answers[name].text
            assert answers[name].json()["error"]["type"] == "server_error"
        assert proc.proc.wait(60) == 3
        output = proc.output()
        assert "> engine failed: InjectedFault" in output and "exiting with status 3" in output
    finally:
        proc.kill()


def test_a_checkpoint_with_a_nan_weight_fails_each_request_not_the_server(test_tokenizer_path, tmp_path):
    """Loaded anyway (--allow-non-finite-weights), a NaN weight makes every request fail with a 500 naming the
    non-finite logits (greedy ones too: never text decoded from NaN), and the server stays up."""
    import shutil
    import sys

    import torch

    from tests.helpers import FIXTURE_DIR, fixture_model_args
    ckpt = tmp_path / "ckpt"
    shutil.copytree(FIXTURE_DIR / "ckpt", ckpt)
    path = ckpt / "1" / "mp_rank_00_model_states.pt"
    sd = torch.load(path, weights_only=True)["module"]
    sd["transformer.layers.1.mlp.dense_4h_to_h.weight"][0, 0] = float("nan")
    torch.save({"module": sd}, path)
    args = fixture_model_args(extra=("--tokenizer-path", test_tokenizer_path, "--allow-non-finite-weights"))
    args[args.index("--load") + 1] = str(ckpt)
    proc = ServerProcess([sys.executable, "server.py", *args], {"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"},
                         tmp_path / "server.log")
    try:
        proc.wait_ready()
        for body in (GREEDY, {**GREEDY, "temperature": 1.0, "seed": 1}, {**GREEDY, "num_beams": 2}):
            got, answer = send(proc, body)
            assert got == 500 and "non-finite" in answer["error"]["message"], (body, answer)
            assert httpx.get(proc.url + "/health", timeout=10).status_code == 200
        assert proc.stop() == 0
    finally:
        proc.kill()
    assert "kept because of --allow-non-finite-weights" in proc.output()


def test_the_openai_client_sees_a_failed_sequence_as_an_api_error(server):
    import openai
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", timeout=120, max_retries=0)
    with pytest.raises(openai.InternalServerError, match="generation failed"):
        client.completions.create(model="glm-130b", prompt="POISON-NAN once", max_tokens=8, temperature=0)
    with pytest.raises(openai.APIError, match="generation failed") as e:
        for _ in client.completions.create(model="glm-130b", prompt="POISON-RAISE once", max_tokens=8,
                                           temperature=0, stream=True):
            pass
    assert e.value.body["type"] == "server_error"
    assert client.completions.create(model="glm-130b", prompt="once", max_tokens=8, temperature=0).choices[0].text
