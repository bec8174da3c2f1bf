"""Serving throughput: single-stream vs N concurrent greedy streams against server.py, in one run.

    python tools/bench_serve.py                      # starts scripts/server.sh on the benchmark model (bench_cache/)
    python tools/bench_serve.py --url http://127.0.0.1:8000 --streams 8 --max-tokens 128 --json serve.json

Decode tokens/s of a stream: its tokens after the first / the time from its first to its last token; the single
stream runs before and after the concurrent ones (the machine's bandwidth drifts) and the mean of the two is the
single figure. Aggregate with N streams: all tokens after each stream's first / the time from the first stream's
first token to the last stream's last token (the prefills of the others fall inside it); "all_decoding": the
tokens/s between the last stream's first token and the first stream's last token, when all N decode together.
Time to first token: from sending a request to its first streamed token, for every stream of the concurrent run.
The server's own mean time to first token (/metrics) is added.
"""
import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

PROMPT_WORDS = ("the quick brown fox jumps over the lazy dog while a small cat watches from the old stone wall "
                "and thinks about the long winter that is coming to the quiet village by the sea").split()


def prompt(i: int, words: int) -> str:
    """A different plain-text prompt per stream (rotated words), about `words` words long."""
    return " ".join(PROMPT_WORDS[(i + k) % len(PROMPT_WORDS)] for k in range(words))


def stream(url: str, text: str, max_tokens: int) -> dict:
    """One greedy streaming completion: the send time and each token's arrival time."""
    body = {"model": "glm-130b", "prompt": text, "max_tokens": max_tokens, "temperature": 0, "stream": True}
    sent, times = time.perf_counter(), []
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=600) as response:
        if response.status_code != 200:
            raise RuntimeError(f"HTTP {response.status_code}: {response.read()[:300]!r}")
        for line in response.iter_lines():
            if line.startswith("data: {"):
                choice = json.loads(line[6:])["choices"][0]
                if choice["finish_reason"] is None:  # one chunk per generated token; the last one closes
                    times.append(time.perf_counter())
    return {"sent": sent, "times": times}


def decode_rate(runs) -> float:
    tokens = sum(len(r["times"]) - 1 for r in runs)
    span = max(r["times"][-1] for r in runs) - min(r["times"][0] for r in runs)
    return tokens / span if span > 0 else 0.0


def steady_rate(runs) -> float:
    """Tokens/s while every stream decodes: from the last stream's first token to the first stream's last one."""
    start, end = max(r["times"][0] for r in runs), min(r["times"][-1] for r in runs)
    tokens = sum(1 for r in runs for t in r["times"] if start < t <= end)
    return tokens / (end - start) if end > start else 0.0


def concurrent(url: str, n: int, words: int, max_tokens: int):
    runs = [None] * n

    def one(i):
        runs[i] = stream(url, prompt(i, words), max_tokens)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return runs


def measure(url: str, streams: int, words: int, max_tokens: int) -> dict:
    stream(url, prompt(0, words), 8)  # warm-up: first-call costs (kernel plans, allocations)
    single = stream(url, prompt(0, words), max_tokens)
    many = concurrent(url, streams, words, max_tokens)
    single_after = stream(url, prompt(0, words), max_tokens)  # the machine's state drifts: single on both sides
    ttft = [r["times"][0] - r["sent"] for r in many]
    single_rate, aggregate = (decode_rate([single]) + decode_rate([single_after])) / 2, decode_rate(many)
    server = dict(line.rsplit(" ", 1) for line in httpx.get(url + "/metrics", timeout=30).text.splitlines()
                  if line and not line.startswith("#"))
    server = {name: float(value) for name, value in server.items()}
    return {"streams": streams, "max_tokens": max_tokens, "prompt_words": words,
            "single.tokens": len(single["times"]), "single.decode_tokens_per_s": single_rate,
            "single.before_after_tokens_per_s": [decode_rate([single]), decode_rate([single_after])],
            "single.ttft_s": single["times"][0] - single["sent"],
            "concurrent.tokens": sum(len(r["times"]) for r in many), "concurrent.decode_tokens_per_s": aggregate,
            "concurrent.speedup": aggregate / single_rate if single_rate else 0.0,
            "concurrent.all_decoding.tokens_per_s": steady_rate(many),
            "concurrent.all_decoding.speedup": steady_rate(many) / single_rate if single_rate else 0.0,
            "concurrent.ttft_s.median": statistics.median(ttft), "concurrent.ttft_s.max": max(ttft),
            "concurrent.ttft_s.min": min(ttft),
            "server.ttft_s.mean": server["glm_time_to_first_token_seconds_sum"]
            / max(1.0, server["glm_time_to_first_token_seconds_count"])}


def start_server(port: int, slots: int, config: str) -> subprocess.Popen:
    from tools.create_demo import ensure_demo
    tokenizer = os.path.join(ensure_demo(os.environ.get("GLM_DEMO_DIR") or str(ROOT / "demo_cache")), "ice_text.model")
    env = {**os.environ, "MODEL_CONFIG": str(ROOT / config)}
    cmd = ["bash", "scripts/server.sh", "--port", str(port), "--max-slots", str(slots), "--tokenizer-path", tokenizer]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env)
    url, end = f"http://127.0.0.1:{port}", time.time() + 900
    while time.time() < end:
        if proc.poll() is not None:
            raise SystemExit(f"error: the server exited with status {proc.returncode}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return proc
        except httpx.TransportError:
            pass
        time.sleep(1)
    proc.kill()
    raise SystemExit("error: the server did not come up in 900 s")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default=None, help="a running server (default: start scripts/server.sh)")
    parser.add_argument("--config", default="configs/model_glm_bench.sh", help="MODEL_CONFIG of the started server")
    parser.add_argument("--port", type=int, default=8011)
    parser.add_argument("--streams", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--prompt-words", type=int, default=32)
    parser.add_argument("--json", default=None, help="write the figures here")
    args = parser.parse_args(argv)
    proc = None if args.url else start_server(args.port, args.streams, args.config)
    url = args.url or f"http://127.0.0.1:{args.port}"
    try:
        result = measure(url, args.streams, args.prompt_words, args.max_tokens)
    finally:
        if proc is not None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(120)
    for key, value in result.items():
        print(f"{key}: {value:.3f}" if isinstance(value, float) else f"{key}: {value}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
