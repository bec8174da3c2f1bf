"""lm-eval multiple choice through the server: throughput with num_concurrent=8 against num_concurrent=1, in one run.

Starts scripts/server.sh on a model config (default the benchmark model, configs/model_glm_bench.sh), writes a
local multiple-choice task (DOCS questions x 4 answers, fixed seed), runs `lm_eval --model local-completions` with
lm-eval's defaults once per concurrency, and prints (and with --json writes) each run's wall time (the whole lm_eval
process) and requests per second, their ratio, and the largest difference between the two runs' scores (batches of
other sizes round differently: ~1e-4 per token in fp32, much more in bf16 on the random-weight models). docs/performance.md "Scoring" has the results.

    python tools/lm_eval_throughput.py --json scoring.json
    MODEL_CONFIG=configs/model_glm_demo.sh python tools/lm_eval_throughput.py --docs 4   # a quick check
"""
import argparse
import json
import os
import random
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
WORDS = ("the a river mountain small old bright quiet city garden teacher student window morning evening light "
         "paper stone music market train bridge forest winter summer friend letter story question answer animal "
         "water field road house bird boat cloud").split()
TASK = """task: throughput_choices
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
metric_list:
  - metric: acc
"""


def sentence(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


def write_task(folder: Path, docs: int) -> None:
    rng = random.Random(0)
    data = folder / "choices.jsonl"
    with open(data, "w") as f:
        for _ in range(docs):
            doc = {"context": sentence(rng, 40).capitalize() + ". Question: what comes next? Answer:",
                   "choices": [sentence(rng, rng.randint(3, 12)) + "." for _ in range(4)], "label": 0}
            f.write(json.dumps(doc) + "\n")
    (folder / "throughput_choices.yaml").write_text(TASK.format(data=data))


def start_server(port: int, log: Path, extra) -> subprocess.Popen:
    env = {**os.environ, "MODEL_CONFIG": os.environ.get("MODEL_CONFIG", str(ROOT / "configs/model_glm_bench.sh"))}
    proc = subprocess.Popen(["bash", "scripts/server.sh", "--port", str(port), *extra], cwd=ROOT, env=env,
                            stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.time() + 900
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return proc
        except httpx.TransportError:
            pass
        time.sleep(1)
    raise SystemExit("the server did not start in 900 s")


def counters(port: int) -> dict:
    """The server's /metrics page as {name: value}."""
    lines = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=30).text.splitlines()
    return {name: float(value) for name, value in (line.rsplit(" ", 1) for line in lines if not line.startswith("#"))}


def run_lm_eval(port: int, folder: Path, concurrency: int) -> dict:
    out = folder / f"out{concurrency}"
    args = (f"model=glm-130b,base_url=http://127.0.0.1:{port}/v1/completions,num_concurrent={concurrency}")
    cmd = ["lm_eval", "--model", "local-completions", "--model_args", args, "--include_path", str(folder),
           "--tasks", "throughput_choices", "--log_samples", "--output_path", str(out)]
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "HF_HOME": str(folder / "hf")}
    before = counters(port)
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    after = counters(port)
    batches = after["glm_scoring_batches_total"] - before["glm_scoring_batches_total"]
    prompts = after["glm_scored_prompts_total"] - before["glm_scored_prompts_total"]
    if proc.returncode != 0:
        raise SystemExit(f"lm_eval failed:\n{proc.stderr[-3000:]}")
    samples = [json.loads(line) for f in out.rglob("samples_*.jsonl") for line in f.read_text().splitlines()]
    scores = {(s["doc_id"], k): float(r[0][0]) for s in samples for k, r in enumerate(s["resps"])}
    return {"seconds": seconds, "requests": len(scores), "requests_per_second": len(scores) / seconds,
            "scoring_forwards": batches, "prompts_per_forward": prompts / max(1, batches), "scores": scores}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--docs", type=int, default=10, help="questions (4 answers each: 4 requests per question)")
    parser.add_argument("--json", help="write the figures here")
    parser.add_argument("--server-args", default="", help="extra scripts/server.sh flags (e.g. --tokenizer-path X)")
    args = parser.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        write_task(folder, args.docs)
        server = start_server(port, folder / "server.log", args.server_args.split())
        try:
            runs = {c: run_lm_eval(port, folder, c) for c in (1, 8)}
        finally:
            os.killpg(server.pid, signal.SIGTERM)
            server.wait(120)
    worst = max(abs(runs[1]["scores"][k] - runs[8]["scores"][k]) for k in runs[1]["scores"])
    result = {"config": os.environ.get("MODEL_CONFIG", "configs/model_glm_bench.sh"), "docs": args.docs,
              "threads": os.environ.get("OMP_NUM_THREADS"), "max_score_difference": worst,
              **{f"concurrency_{c}": {k: v for k, v in r.items() if k != "scores"} for c, r in runs.items()},
              "speedup": runs[8]["requests_per_second"] / runs[1]["requests_per_second"]}
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
