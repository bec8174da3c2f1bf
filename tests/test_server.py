"""server.py through scripts/server.sh on the demo model, driven by the official openai client over loopback:
greedy text equals generate.py's, echo log-probs equal the evaluation's, streaming, 32 concurrent streams."""
import json
import shlex
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

import generate
from tests.test_generation_cli import demo_env, demo_model_args
from tests.workers.server_process import ServerProcess

MASKED = ["Who is the greatest artist? The greatest artist is [MASK].",
          "The capital of France is [MASK], and the capital of Japan is [MASK].", "清华大学位于[MASK]。", "A B [sMASK] C"]
PLAIN = ["Tell me a story about a cat.", "Once upon a time", "GLM-130B is"]
MAX_TOKENS = 24


@pytest.fixture(scope="module")
def server_started(demo_dir, tmp_path_factory):
    """The README's start command, on a free port (ServerProcess appends --port, which wins), started (it loads
    while generate_lines runs in this process)."""
    from tests.test_readme import readme_command
    log = tmp_path_factory.mktemp("server") / "server.log"
    proc = ServerProcess(shlex.split(readme_command("bash scripts/server.sh")), demo_env(demo_dir), log)
    try:
        yield proc
    finally:
        proc.kill()


@pytest.fixture(scope="module")
def server(server_started):
    """The server, ready; stopped cleanly at the end of the module."""
    proc = server_started
    proc.wait_ready()
    yield proc
    assert proc.stop() == 0, proc.output()[-3000:]
    assert "> server rank 0 stopped" in proc.output() and "Traceback" not in proc.output()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="none", timeout=120, max_retries=0)


@pytest.fixture(scope="module")
def generate_lines(demo_dir, tmp_path_factory, server_started):
    """generate.py's output line per prompt: greedy, each blank capped at MAX_TOKENS (while the server loads)."""
    tmp = tmp_path_factory.mktemp("generate")
    source = tmp / "prompts.txt"
    source.write_text("".join(f"p{i}\t{text}\n" for i, text in enumerate(MASKED + PLAIN)), encoding="utf-8")
    generate.main([*demo_model_args(demo_dir), "--input-source", str(source), "--output-path", str(tmp / "out"),
                   "--with-id", "--top_k", "1", "--max-new-tokens", str(MAX_TOKENS), "--batch-size", "4"])
    return [(tmp / "out" / f"p{i}.txt").read_text(encoding="utf-8").rstrip("\n") for i in range(len(MASKED + PLAIN))]


def test_greedy_completions_equal_generate_py(generate_lines, client, test_tokenizer):
    result = client.completions.create(model="glm-130b", prompt=MASKED + PLAIN, max_tokens=MAX_TOKENS, temperature=0)
    assert [c.index for c in result.choices] == list(range(len(MASKED + PLAIN)))
    for choice, text, line in zip(result.choices, MASKED + PLAIN, generate_lines):
        blanks = choice.model_extra["blanks"]
        if "MASK]" in text:  # the prompt with its blanks filled: generate.py's line
            assert choice.text == line and len(blanks) == text.count("MASK]")
        else:  # the continuation only (OpenAI's meaning); generate.py writes the prompt and the continuation
            assert blanks == [choice.text] and line.endswith(choice.text) and choice.text
            assert line.startswith(test_tokenizer.detokenize(test_tokenizer.tokenize(text)))
        assert choice.finish_reason in ("stop", "length")
    assert result.usage.completion_tokens > 0
    assert result.usage.total_tokens == result.usage.prompt_tokens + result.usage.completion_tokens


def test_streaming_gives_the_same_text_in_pieces(client):
    for text in (PLAIN[0], MASKED[1]):
        whole = client.completions.create(model="glm-130b", prompt=text, max_tokens=MAX_TOKENS, temperature=0)
        pieces, reasons = [], []
        for event in client.completions.create(model="glm-130b", prompt=text, max_tokens=MAX_TOKENS, temperature=0,
                                               stream=True, stream_options={"include_usage": True}):
            if event.choices:
                pieces.append(event.choices[0].text)
                reasons.append(event.choices[0].finish_reason)
            else:
                usage = event.usage
        assert "".join(pieces) == whole.choices[0].text and len(pieces) > 2
        assert reasons[-1] == whole.choices[0].finish_reason and all(r is None for r in reasons[:-1])
        assert usage.completion_tokens == whole.usage.completion_tokens


def test_echo_log_probs_equal_the_evaluation(client, demo_dir):
    import torch

    from evaluation.model import ModelForEvaluation
    from initialize import initialize, initialize_model_and_tokenizer
    from model import mpu
    from model.layout import collate_layouts, language_model_window
    model, tokenizer = initialize_model_and_tokenizer(initialize(None, demo_model_args(demo_dir)))
    text = "The quick brown fox jumps over the lazy dog."
    result = client.completions.create(model="glm-130b", prompt=text, max_tokens=0, echo=True, logprobs=2)
    lp = result.choices[0].logprobs
    ids = tokenizer.tokenize(text)
    assert result.choices[0].text == text and lp.tokens == tokenizer.token_texts(ids)
    layout, _ = language_model_window([], ids, tokenizer.get_command("[gMASK]"), tokenizer.get_command("sop"))
    batch = collate_layouts([layout])
    shard = ModelForEvaluation(model)._logits_shard(batch)[0]
    expected = mpu.vocab_parallel_log_probs(shard, torch.arange(1, len(ids) + 1), torch.tensor(ids))
    assert max(abs(a - b) for a, b in zip(lp.token_logprobs, expected.tolist())) <= 1e-4
    assert all(len(top) == 2 for top in lp.top_logprobs) and lp.text_offset[0] == 0
    assert "".join(lp.tokens) == text and lp.text_offset == [len("".join(lp.tokens[:k])) for k in range(len(ids))]

    # the completion continues the scored reading: max_tokens 1 takes its token from the scoring forward, longer
    # ones decode on from it; the prompt's log-probs are the same either way
    one = client.completions.create(model="glm-130b", prompt=text, max_tokens=1, echo=True, logprobs=1,
                                    temperature=0).choices[0]
    five = client.completions.create(model="glm-130b", prompt=text, max_tokens=5, echo=True, logprobs=1,
                                     temperature=0).choices[0]
    assert five.text.startswith(one.text) and one.text.startswith(text) and len(one.logprobs.tokens) == len(ids) + 1
    assert one.logprobs.token_logprobs[:len(ids)] == pytest.approx(lp.token_logprobs, abs=1e-4)
    assert five.logprobs.token_logprobs[:len(ids) + 1] == pytest.approx(one.logprobs.token_logprobs, abs=1e-4)
    if five.finish_reason == "length":
        assert "".join(five.logprobs.tokens) == five.text and len(five.logprobs.tokens) == len(ids) + 5
        assert five.logprobs.text_offset[len(ids)] == len(text)


def test_sampling_seed_n_and_stop(client):
    a = client.completions.create(model="glm-130b", prompt=PLAIN[1], max_tokens=12, temperature=1.0, top_p=0.9,
                                  seed=5, n=3)
    b = client.completions.create(model="glm-130b", prompt=PLAIN[1], max_tokens=12, temperature=1.0, top_p=0.9,
                                  seed=5, n=3)
    assert [c.text for c in a.choices] == [c.text for c in b.choices] and len(a.choices) == 3
    greedy = client.completions.create(model="glm-130b", prompt=PLAIN[1], max_tokens=12, temperature=0).choices[0]
    stop = greedy.text[4:6]
    cut = client.completions.create(model="glm-130b", prompt=PLAIN[1], max_tokens=12, temperature=0, stop=[stop])
    assert cut.choices[0].text == greedy.text[:greedy.text.index(stop)] and cut.choices[0].finish_reason == "stop"


def test_beam_search_extension_equals_generate_py(client, demo_dir, tmp_path):
    text = MASKED[0]
    result = client.completions.create(model="glm-130b", prompt=text, max_tokens=8,
                                       extra_body={"num_beams": 3, "no_repeat_ngram_size": 2, "length_penalty": 1.0})
    source = tmp_path / "p.txt"
    source.write_text(f"b\t{text}\n", encoding="utf-8")
    generate.main([*demo_model_args(demo_dir), "--input-source", str(source), "--output-path", str(tmp_path),
                   "--with-id", "--sampling-strategy", "BeamSearchStrategy", "--num-beams", "3",
                   "--no-repeat-ngram-size", "2", "--length-penalty", "1.0", "--deterministic-beam-search",
                   "--max-new-tokens", "8"])
    best = (tmp_path / "b.txt").read_text(encoding="utf-8").splitlines()[0]
    assert result.choices[0].text == best


def test_models_health_metrics(server):
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}
    assert [m["id"] for m in httpx.get(server.url + "/v1/models").json()["data"]] == ["glm-130b"]
    from server.metrics import parse
    values = parse(httpx.get(server.url + "/metrics").text)
    assert values['glm_requests_total{outcome="ok"}'] >= 1 and values["glm_slots"] == 8
    assert values["glm_time_to_first_token_seconds_count"] >= 1 and "glm_decode_tokens_per_second" in values


def test_32_concurrent_streams_each_equal_their_single_request(client, server):
    prompts = [(MASKED + PLAIN)[i % 7] for i in range(32)]
    lengths = [4 + (i * 11) % 19 for i in range(32)]  # mixed lengths (4..22): sequences leave and join all the time
    single = {}
    for text, length in sorted(set(zip(prompts, lengths))):
        single[text, length] = client.completions.create(model="glm-130b", prompt=text, max_tokens=length,
                                                         temperature=0).choices[0].text

    def stream(i):
        pieces = [e.choices[0].text for e in client.completions.create(
            model="glm-130b", prompt=prompts[i], max_tokens=lengths[i], temperature=0, stream=True) if e.choices]
        return "".join(pieces)

    with ThreadPoolExecutor(32) as pool:
        texts = list(pool.map(stream, range(32)))
    assert texts == [single[p, n] for p, n in zip(prompts, lengths)]
    from server.metrics import parse
    values = parse(httpx.get(server.url + "/metrics").text)
    assert values["glm_running_sequences"] == 0 and values["glm_queue_depth"] == 0


def test_readme_examples(server):
    """The README's curl and openai client examples, run as written (on this server's port)."""
    from tests.test_readme import readme_command
    from tests.helpers import ROOT
    import subprocess
    curl = readme_command("curl ").replace("8000", str(server.port))
    body = json.loads(subprocess.run(["bash", "-c", curl], capture_output=True, text=True, timeout=60,
                                     check=True).stdout)
    assert body["choices"][0]["text"].startswith("The capital of France is")
    readme = (ROOT / "README.md").read_text()
    code = readme.split("## Serving", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    proc = subprocess.run(["python", "-c", code.replace("8000", str(server.port))], capture_output=True, text=True,
                          timeout=60, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip()
