"""lm-evaluation-harness through the server: scripts/server.sh on the demo model driven by the README's
`lm_eval --model local-completions` command (lm-eval's defaults: its remote tokenizer, token-id prompts, 8 concurrent
requests), each request's number against the server's own echo scoring, evaluate.py's language-model scoring and
direct completions; the tokenizer endpoints, token-id prompts and the start token."""
import json
import shlex
import subprocess

import httpx
import pytest

from tests.helpers import ROOT
from tests.test_generation_cli import demo_env, demo_model_args
from tests.test_lm_eval_native import DATA, evaluate_py, offline_env, read_samples
from tests.workers.server_process import ServerProcess


@pytest.fixture(scope="module")
def server(demo_dir, tmp_path_factory):
    from tests.test_readme import readme_command
    log = tmp_path_factory.mktemp("server") / "server.log"
    proc = ServerProcess(shlex.split(readme_command("bash scripts/server.sh")), demo_env(demo_dir), log)
    try:
        proc.wait_ready()
        yield proc
        assert proc.stop() == 0, proc.output()[-3000:]
        assert "Traceback" not in proc.output()
    finally:
        proc.kill()


def post(server, path, body, status=200):
    response = httpx.post(server.url + path, json=body, timeout=120)
    assert response.status_code == status, response.text
    return response.json()


def complete(server, status=200, **body):
    return post(server, "/v1/completions", {"model": "glm-130b", **body}, status)


def test_tokenizer_endpoints_at_the_root_and_under_v1(server, test_tokenizer):
    sop, eos = test_tokenizer.get_command("sop"), test_tokenizer.get_command("eos")
    ids = test_tokenizer.tokenize("The cat sat.")
    for root in ("", "/v1"):
        info = httpx.get(server.url + root + "/tokenizer_info").json()
        assert (info["bos_token"], info["eos_token"], info["model_max_length"]) == ("[sop]", "[</s>]", 512)
        tokens = post(server, root + "/tokenize", {"prompt": "[sop]The cat sat.", "add_special_tokens": False})
        assert tokens["tokens"] == [sop] + ids and tokens["count"] == len(ids) + 1
        assert post(server, root + "/detokenize", {"tokens": [sop] + ids}) == {"prompt": "[sop]The cat sat."}
    assert post(server, "/tokenize", {"prompt": info["eos_token"]})["tokens"] == [eos]  # what lm-eval asks
    for path, body in [("/tokenize", {"prompt": 5}), ("/tokenize", {"prompt": "x", "add_special_tokens": "no"}),
                       ("/tokenize", {"prompt": "x", "messages": []}), ("/detokenize", {"tokens": [5]}),
                       ("/detokenize", {"tokens": "abc"}), ("/detokenize", {"tokens": [True]}),
                       ("/tokenize", {"prompt": "nul \x00"})]:
        assert "error" in post(server, path, body, status=400)
    surrogate = httpx.post(server.url + "/v1/tokenize", content=b'{"prompt": "lone \\ud800 surrogate"}', timeout=60)
    assert surrogate.status_code == 400 and "error" in surrogate.json()
    too_big = httpx.post(server.url + "/tokenize", content=b'{"prompt": "' + b"x" * (5 << 20) + b'"}', timeout=60)
    assert too_big.status_code == 413 and "error" in too_big.json()  # --max-request-bytes, as for completions
    assert "> 400 POST /v1/tokenize (prompt): prompt holds a lone surrogate" in server.output()
    assert "> 413 POST /tokenize" in server.output()


def test_token_id_prompts_answer_as_their_text_and_a_leading_sop_is_the_window_start(server, test_tokenizer):
    sop = test_tokenizer.get_command("sop")
    texts = ["The quick brown fox", "Once upon a time"]
    ids = [test_tokenizer.tokenize(t) for t in texts]
    by_text = complete(server, prompt=texts, max_tokens=6, temperature=0)["choices"]
    by_ids = complete(server, prompt=ids, max_tokens=6, temperature=0)["choices"]
    assert [c["text"] for c in by_ids] == [c["text"] for c in by_text]
    one = complete(server, prompt=ids[0], max_tokens=6, temperature=0)["choices"][0]
    assert one["text"] == by_text[0]["text"]
    echo = complete(server, prompt=texts[0], max_tokens=0, echo=True, logprobs=1)["choices"][0]["logprobs"]
    started = complete(server, prompt=[[sop] + ids[0]], max_tokens=0, echo=True, logprobs=1)["choices"][0]
    assert started["text"] == "[sop]" + texts[0]
    lp = started["logprobs"]
    assert lp["tokens"][0] == "[sop]" and lp["token_logprobs"][0] is None and lp["top_logprobs"][0] == {}
    assert lp["token_logprobs"][1:] == pytest.approx(echo["token_logprobs"], abs=1e-5)
    assert "".join(lp["tokens"]) == started["text"] and lp["text_offset"][1] == len("[sop]")
    text_sop = complete(server, prompt="[sop]" + texts[0], max_tokens=0, echo=True, logprobs=1)["choices"][0]
    assert text_sop["logprobs"]["token_logprobs"] == lp["token_logprobs"]


@pytest.mark.parametrize("body, says", [
    ({"prompt": [5, 20100]}, "not a text token"),
    ({"prompt": [20100, 150004, 20100], "echo": True, "max_tokens": 0}, "[sop]"),
    ({"prompt": [20100, 150000], "echo": True, "max_tokens": 0}, "[[MASK]]"),
    ({"prompt": [150004], "echo": True, "max_tokens": 0}, "only [sop]"),
    ({"prompt": [[20100], "text"], "num_beams": 2}, "token ids"),
    ({"prompt": [20100] * 511, "echo": True, "max_tokens": 1}, "max_length=511"),
    ({"prompt": [[]]}, "prompt must be"),
])
def test_bad_token_id_prompts_get_one_clear_400(server, body, says):
    message = complete(server, status=400, **body)["error"]["message"]
    assert says in message, message


def lm_eval_encoding(server, context, continuation):
    """What lm-eval's loglikelihood sends: context + continuation tokenized whole, split at the context's length."""
    whole = post(server, "/tokenize", {"prompt": context + continuation})["tokens"]
    return whole, len(post(server, "/tokenize", {"prompt": context})["tokens"])


def test_lm_eval_local_completions_with_its_defaults_equals_the_servers_scoring_and_evaluate_py(
        server, demo_dir, tmp_path):
    from tests.test_readme import readme_command
    command = readme_command("HF_DATASETS_OFFLINE=1 lm_eval --model local-completions").replace(
        "127.0.0.1:8000", f"127.0.0.1:{server.port}")
    out = tmp_path / "out"
    proc = subprocess.run(["bash", "-c", f"{command} --log_samples --output_path {shlex.quote(str(out))}"],
                          cwd=ROOT, env=offline_env(demo_env(demo_dir), tmp_path), capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "remote tokenizer" in proc.stderr and "|glm_choices" in proc.stdout

    for sample in read_samples(out, "glm_choices").values():  # the causal score of each answer, as sent
        for k, resp in enumerate(sample["resps"]):
            args = sample["arguments"][f"gen_args_{k}"]
            ids, context = lm_eval_encoding(server, args["arg_0"], args["arg_1"])
            scored = complete(server, prompt=ids, max_tokens=0, echo=True, logprobs=1)["choices"][0]["logprobs"]
            assert float(resp[0][0]) == pytest.approx(sum(scored["token_logprobs"][context:]), abs=1e-4)

    records = evaluate_py(demo_model_args(demo_dir), tmp_path, DATA / "glm" / "documents.yaml", "documents")
    documents = read_samples(out, "glm_documents")
    assert len(documents) == len(records)
    for doc_id, record in enumerate(records):  # [sop] + document: evaluate.py's language-model scoring
        assert float(documents[doc_id]["resps"][0][0]) == pytest.approx(-record["loss"], rel=1e-6, abs=1e-4)

    for sample in read_samples(out, "glm_generation").values():
        args = sample["arguments"]["gen_args_0"]
        ids = post(server, "/tokenize", {"prompt": args["arg_0"]})["tokens"]
        direct = complete(server, prompt=ids, max_tokens=args["arg_1"]["max_gen_toks"], temperature=0,
                          stop=args["arg_1"]["until"] + ["[</s>]"])["choices"][0]["text"]
        assert sample["resps"][0][0] == direct
    json.loads((next(out.rglob("results_*.json"))).read_text())  # the results file is complete JSON
    from server.metrics import parse
    values = parse(httpx.get(server.url + "/metrics").text)
    assert values["glm_scored_prompts_total"] >= 15 + 4 and 1 <= values["glm_scoring_batches_total"]
