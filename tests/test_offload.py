"""Weight offload (--bminf): the plan at GLM-130B's size, and equal outputs with 0, some or all layers resident.

A 6-layer random checkpoint (fp16 as released, plus INT8/INT4 conversions, TP 1 and 2) is streamed through the two
swap slots: on CPU its streamed weights are read from the file every forward, the fused decode step runs in
segments, and every token and logit equals the model that holds all its weights, bit for bit.
"""
import os
import re
import sys
from pathlib import Path

if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pytest  # noqa: E402
import torch  # noqa: E402

from tests.fake_cuda import fake_gpu  # noqa: E402,F401  (fixture)
from tests.helpers import ROOT, torchrun  # noqa: E402

SMALL = dict(num_layers=6, hidden_size=64, num_attention_heads=4, inner_hidden_size=128, vocab_size=150528)
FORMATS = {"16bit": [], "int8": ["--quantization-bit-width", "8", "--from-quantized-checkpoint"],
           "int4": ["--quantization-bit-width", "4", "--from-quantized-checkpoint"]}
STREAMED = {"0": 6, "some": 4, "1": 0}  # --bminf-memory-limit -> streamed layers ("some": 2 resident, 2 swap slots)


def small_args(folder, mp=1, extra=(), dtype="--bf16"):
    return ["--model-parallel-size", str(mp), "--num-layers", str(SMALL["num_layers"]),
            "--hidden-size", str(SMALL["hidden_size"]), "--inner-hidden-size", str(SMALL["inner_hidden_size"]),
            "--vocab-size", str(SMALL["vocab_size"]), "--num-attention-heads", str(SMALL["num_attention_heads"]),
            "--max-sequence-length", "128", "--load", str(folder), dtype, *extra]


def make_checkpoints(root: Path, mp: int) -> dict:
    """{format: folder}: the fp16 checkpoint and its INT8 / INT4 conversions, `mp`-way."""
    from tools import convert_tp
    from tools.create_random_checkpoint import create_random_checkpoint
    folders = {"16bit": root / f"16bit_tp{mp}"}
    create_random_checkpoint(str(folders["16bit"]), **SMALL, model_parallel_size=mp, dtype="fp16", seed=7)
    for name, bits in (("int8", 8), ("int4", 4)):
        folders[name] = root / f"{name}_tp{mp}"
        convert_tp.main(["--input-folder", str(folders["16bit"]), "--output-folder", str(folders[name]),
                         "--target-tp", str(mp), "--quantization-bit-width", str(bits)])
    return folders


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    return make_checkpoints(tmp_path_factory.mktemp("offload"), 1)


def build(folder, extra=(), dtype="--bf16", mp=1):
    import initialize
    args = initialize.parse_args(None, [*small_args(folder, mp, extra, dtype), "--device", "cpu"])
    return initialize.build_model(args)


def every_path(model):
    """Prefill logits (scoring), then 6 greedy steps through the KV cache (the fused decode step for a bf16 CPU
    model): the ids and every step's logits."""
    from model import KVCache
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(20000, 30000, (2, 9), generator=gen)
    positions = torch.arange(9).expand(2, 9)
    causal = torch.ones(9, 9).tril().logical_not()[None, None]
    scored = model.logits(tokens, positions, causal)
    cache = KVCache(model, 2, 32)
    logits = model.forward_with_cache(tokens, positions, causal, cache)[:, -1]
    ids, steps = [], [logits]
    for step in range(6):
        nxt = steps[-1].float().argmax(-1)[:, None]
        ids.append(nxt)
        mask = torch.zeros(1, 1, 1, cache.length + 1, dtype=torch.bool)
        steps.append(model.forward_with_cache(nxt, torch.full((2, 1), 9 + step), mask, cache)[:, -1])
    return scored, torch.cat(ids, 1), torch.stack(steps)


# ---------------------------------------------------------------------------------------------------------------
# The plan

def meta_glm130b(monkeypatch, config_file: str):
    """GLM-130B as built from one of the original's configs, on the meta device (nothing allocated), TP rank 0."""
    import subprocess

    import initialize
    from model import GLM130B, GLMConfig, mpu
    from quantization import quantize
    out = subprocess.run(["bash", "-c", f"source {config_file} >/dev/null && echo $MODEL_ARGS"], cwd=ROOT,
                         capture_output=True, text=True, check=True, env={**os.environ, "CHECKPOINT_PATH": "/x"})
    monkeypatch.setenv("WORLD_SIZE", "8")
    args = initialize.parse_args(None, out.stdout.split() + ["--device", "cpu"])
    monkeypatch.setattr(mpu, "get_model_parallel_world_size", lambda: args.model_parallel_size)
    monkeypatch.setattr(mpu, "get_model_parallel_rank", lambda: 0)
    model = GLM130B(GLMConfig.from_args(args), dtype=args.params_dtype, device="meta")
    if args.quantization_bit_width:
        quantize(model, args.quantization_bit_width)
    return model, args


def test_plan_at_full_size_matches_bminf_on_the_original_configs(monkeypatch):
    from model.offload import GIB, plan_offload
    v100, args = meta_glm130b(monkeypatch, "configs/model_glm_130b_v100.sh")
    assert args.bminf and args.bminf_memory_limit == 25 and args.model_parallel_size == 8 and args.fp16
    plan = plan_offload(v100, int(args.bminf_memory_limit * GIB))
    # FP16, TP 8: 453 MB of weights per layer per GPU; BMInf streams ~13 of 70 layers at 25 GB
    assert plan.layer_bytes == 2 * 1_811_939_328 // 8
    assert len(plan.streamed) == 14 and plan.resident_bytes <= 25 * GIB
    assert plan.streamed == list(range(2, 70, 5))  # spread evenly
    assert plan.fixed_bytes + (56 + 1 + 2) * plan.layer_bytes > 25 * GIB  # one more resident would not fit
    # (BMInf: ~13; the limit here also counts the two swap buffers, 0.84 GB)

    t2080, args = meta_glm130b(monkeypatch, "configs/model_glm_130b_2080ti.sh")
    assert args.bminf and args.bminf_memory_limit == 6 and args.quantization_bit_width == 4
    plan = plan_offload(t2080, int(args.bminf_memory_limit * GIB))
    assert plan.layer_bytes == 1_811_939_328 // 2 // 8
    assert len(plan.streamed) == 20 and plan.resident_bytes <= 6 * GIB
    assert "50 of 70 layers resident, 20 streamed per forward" in plan.describe()


def test_plan_edges():
    from model import GLM130B, GLMConfig
    from model.offload import plan_offload
    model = GLM130B(GLMConfig(**SMALL, max_sequence_length=64), dtype=torch.bfloat16, device="meta")
    everything = sum(p.numel() * 2 for p in model.parameters())
    assert plan_offload(model, everything).streamed == []
    assert plan_offload(model, 0).streamed == list(range(6))
    plan = plan_offload(model, everything - 1)  # a byte short: 3 layers streamed make room for their 2 swap slots
    assert plan.streamed == [1, 3, 5] and plan.resident_bytes <= everything - 1


# ---------------------------------------------------------------------------------------------------------------
# Equal outputs

def limit_for(model, resident_layers: int) -> str:
    """--bminf-memory-limit (GB) that holds the always-resident part, `resident_layers` layers and two slots."""
    from model.offload import GIB, plan_offload
    plan = plan_offload(model, 0)
    return repr((plan.fixed_bytes + (resident_layers + 2) * plan.layer_bytes) / GIB)


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_streamed_model_equals_resident_model_bitwise(checkpoints, fmt, capsys):
    from model.offload import LayerStreamer
    resident = build(checkpoints[fmt], FORMATS[fmt])
    reference = every_path(resident)
    for limit, want in STREAMED.items():
        limit = limit_for(resident, 2) if limit == "some" else limit
        model = build(checkpoints[fmt], FORMATS[fmt] + ["--bminf", "--bminf-memory-limit", limit])
        printed = capsys.readouterr().out
        assert f"> BMInf activated, memory limit: {limit} GB" in printed
        assert f"{6 - want} of 6 layers resident, {want} streamed per forward" in printed, printed
        streamed = want
        got = every_path(model)
        for name, a, b in zip(("scoring logits", "greedy ids", "step logits"), reference, got):
            assert torch.equal(a, b), (fmt, limit, name)
        if streamed:
            assert isinstance(model.offload, LayerStreamer)
            # 1 scoring + 1 prefill + 6 decode forwards, each reading every streamed weight once from the file, and
            # the first two streamed layers requested for a next forward
            assert model.offload.bytes_requested == (8 * streamed + 2) * model.offload.plan.layer_bytes
            slots = {p.untyped_storage().data_ptr() for i in model.offload.plan.streamed
                     for p in model.transformer.layers[i].parameters() if p.dim() == 2}
            assert len(slots) == 4 * min(2, streamed)  # the streamed layers share two swap slots
        else:
            assert model.offload.segments(6) == [(0, 6)]


def test_fp32_model_and_reads_on_demand_equal(checkpoints, monkeypatch):
    """The unfused path (fp32: every layer in PyTorch) and GLM_OFFLOAD_PREFETCH=0 (no reader thread)."""
    from model import offload
    reference = every_path(build(checkpoints["int8"], FORMATS["int8"], dtype="--fp32"))
    monkeypatch.setattr(offload, "PREFETCH", False)
    got = every_path(build(checkpoints["int8"], FORMATS["int8"] + ["--bminf", "--bminf-memory-limit", "0"],
                           dtype="--fp32"))
    assert all(torch.equal(a, b) for a, b in zip(reference, got))


@pytest.mark.parametrize("fmt", ["16bit", "int4"])
def test_small_read_chunks_equal(checkpoints, fmt, monkeypatch):
    """Tensors straddling read chunks (64000 bytes: no tensor size is a multiple of it): the fp16 file converted into
    bf16 slots across chunk boundaries through at most two staging buffers; INT4 bytes read straight into the slots,
    the bytes between the weights into scratch memory, never staged."""
    from model import offload
    reference = every_path(build(checkpoints[fmt], FORMATS[fmt]))
    monkeypatch.setattr(offload, "READ_CHUNK", 64000)
    monkeypatch.setattr(offload, "STAGING_CHUNKS", 2)
    model = build(checkpoints[fmt], FORMATS[fmt] + ["--bminf", "--bminf-memory-limit", "0"])
    assert all(torch.equal(a, b) for a, b in zip(reference, every_path(model)))
    pipeline = model.offload.engine.pipeline
    if fmt == "16bit":
        assert [len(b) for b in pipeline.staging] == [64000, 64000]
    else:
        assert pipeline.staging == [] and 0 < len(pipeline.scratch) < 64000


def test_quantized_while_loading_streams_from_ram_with_a_warning(checkpoints):
    reference = every_path(build(checkpoints["16bit"], ["--quantization-bit-width", "8"]))
    with pytest.warns(UserWarning, match="stay in RAM; to stream them from the file, convert it"):
        model = build(checkpoints["16bit"], ["--quantization-bit-width", "8", "--bminf", "--bminf-memory-limit", "0"])
    assert all(torch.equal(a, b) for a, b in zip(reference, every_path(model)))


def test_slots_are_filled_one_streamed_layer_ahead(checkpoints):
    """The order of events in a forward: slot k % 2 is refilled with streamed layer k + 2 only after layer k has
    used it, and each layer waits for its own fill; the last two layers' slots are refilled with the next forward's
    first two layers, which that forward then does not request again."""
    model = build(checkpoints["16bit"], ["--bminf", "--bminf-memory-limit", "0"])
    engine, log = model.offload.engine, []
    for name in ("fill", "acquire", "release"):
        real = getattr(engine, name)
        setattr(engine, name, lambda k, *a, _n=name, _r=real: (log.append((_n, k)), _r(k, *a))[1])
    every_path(model)
    first = log[:21]  # the first forward (2 + 6 × 3 events), then the second one's first
    assert first[:3] == [("fill", 0), ("fill", 1), ("acquire", 0)]
    for k in range(2, 6):  # fill k only after release k-2, and before acquire k-1 ends... one layer ahead
        assert first.index(("fill", k)) == first.index(("release", k - 2)) + 1
        assert first.index(("fill", k)) < first.index(("acquire", k - 1)) < first.index(("acquire", k))
    assert first[-6:] == [("release", 4), ("fill", 0), ("acquire", 5), ("release", 5), ("fill", 1), ("acquire", 0)]
    assert ("fill", 6) not in log
    assert log.count(("fill", 0)) == log.count(("acquire", 0)) + 1  # the last one, for a forward that never came


EXIT_WITH_READS_IN_FLIGHT = """
import atexit, sys, threading
sys.path.insert(0, {root!r})
atexit.register(lambda: print("reader threads at exit:",  # registered first: runs after model.offload's own hook
                              [t.name for t in threading.enumerate() if t.name.startswith("glm-offload")]))
from tests.test_offload import build, every_path
model = build({folder!r}, ["--bminf", "--bminf-memory-limit", "0"])
every_path(model)
print("requested for a next forward:", sorted(model.offload.ahead))
if {free}:
    del model  # its threads are told to stop and are still ending (dropping their tensors) as the process ends
"""


@pytest.mark.parametrize("free", [False, True])
def test_exit_waits_for_the_reader_threads(checkpoints, free):
    """A process that ends right after a forward has the next forward's first layers still being read, or, when the
    model was freed just before, its reader threads still ending: they finish before the interpreter does (a thread
    that needs the interpreter while it finalizes aborts the process: generate.py under a memory cap did, 1 run in
    3)."""
    import subprocess
    code = EXIT_WITH_READS_IN_FLIGHT.format(root=str(ROOT), folder=str(checkpoints["16bit"]), free=free)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "requested for a next forward: [0, 1]" in proc.stdout
    assert "reader threads at exit: []" in proc.stdout, proc.stdout


def test_a_checkpoint_cut_short_while_streaming_is_one_line_error(checkpoints, tmp_path):
    import shutil

    from model.errors import UserError
    folder = tmp_path / "copy"
    shutil.copytree(checkpoints["int8"], folder)
    model = build(folder, FORMATS["int8"] + ["--bminf", "--bminf-memory-limit", "0"])
    every_path(model)
    shard = next(folder.glob("*/mp_rank_00_model_states.pt"))
    os.truncate(shard, model.offload.sources[(3, 0)].offset + 100)  # layer 3's weights are gone
    with pytest.raises(UserError, match=r"mp_rank_00_model_states.pt: reading a streamed layer \(--bminf\) failed "
                                        r"\(the file ends at byte \d+.*must stay in place, unchanged"):
        every_path(model)


def test_bad_limit_and_random_init_are_one_line_errors(checkpoints):
    import initialize
    from model.errors import UserError
    with pytest.raises(UserError, match="--bminf-memory-limit must be a number of GB >= 0"):
        initialize.parse_args(None, small_args(checkpoints["16bit"], extra=["--bminf", "--bminf-memory-limit", "-1"]))
    args = initialize.parse_args(None, small_args(checkpoints["16bit"], extra=["--bminf", "--random-init"]))
    with pytest.raises(UserError, match="cannot be combined with --random-init"):
        initialize.build_model(args)


# ---------------------------------------------------------------------------------------------------------------
# The entry scripts with --bminf: generate.py, evaluate.py (TP 1 and 2), the server

def test_generate_py_with_offload_writes_the_same_answers(checkpoints, tmp_path, test_tokenizer_path):
    import generate
    source = tmp_path / "prompts.txt"
    source.write_text("a\tThe capital of France is [MASK].\nb\tOnce upon a time [gMASK]\nc\tA B [sMASK] C\n")
    outputs = {}
    for name, flags in (("resident", []), ("streamed", ["--bminf", "--bminf-memory-limit", "0"])):
        out = tmp_path / name
        generate.main([*small_args(checkpoints["int8"], extra=FORMATS["int8"] + flags), "--device", "cpu",
                       "--tokenizer-path", test_tokenizer_path, "--input-source", str(source), "--with-id",
                       "--output-path", str(out), "--top_k", "1", "--max-new-tokens", "8", "--batch-size", "2"])
        outputs[name] = {p.name: p.read_text() for p in sorted(out.iterdir())}
    assert len(outputs["resident"]) == 3 and outputs["streamed"] == outputs["resident"]


def test_evaluate_py_with_offload_at_tp1_and_tp2(tmp_path, test_tokenizer_path):
    from tests.eval_helpers import EVAL_DATA, model_argv, read_jsonl, report_lines, run_evaluate, write_small_tasks
    tasks = write_small_tasks(tmp_path / "tasks", ["mul.yaml", "gen.yaml", "lm.yaml"])
    records = {}
    for name, mp, flags in (("resident", 1, []), ("streamed", 1, ["--bminf", "--bminf-memory-limit", "0"]),
                            ("streamed_tp2", 2, ["--bminf", "--bminf-memory-limit", "0"])):
        argv = ["--data-path", str(EVAL_DATA), "--output-path", str(tmp_path / name), "--task", *tasks,
                *model_argv(test_tokenizer_path, mp), *flags]
        if mp == 1:
            stdout = run_evaluate(argv)
        else:
            proc = torchrun(ROOT / "evaluate.py", argv, nprocs=2, timeout=300)
            assert proc.returncode == 0, proc.stderr[-3000:]
            stdout = proc.stdout
        assert ("0 of 2 layers resident, 2 streamed" in stdout) == bool(flags)
        records[name] = {p.relative_to(tmp_path / name): read_jsonl(p)
                         for p in sorted((tmp_path / name).rglob("*.jsonl"))}
        lines = [line.split("\r")[-1] for line in report_lines(stdout)]
        records[name + " report"] = [line for line in lines if line.startswith(("Evaluation results", "Group", "Finish"))]
    assert len(records["resident"]) == 4 and records["streamed"] == records["resident"]
    assert records["streamed report"] == records["resident report"] == records["streamed_tp2 report"]
    for key, rows in records["resident"].items():  # TP 2 sums its shards' partial products in another order
        assert [r.get("prediction", r.get("text")) for r in records["streamed_tp2"][key]] == \
            [r.get("prediction", r.get("text")) for r in rows], key


def test_server_with_offload_answers_as_generate_py(demo_dir, tmp_path):
    """scripts/server.sh on the demo model with every layer streamed: greedy completions equal to generate.py's
    answers without offload (as test_server.py checks them)."""
    import shlex

    import openai

    import generate
    from tests.test_generation_cli import demo_env, demo_model_args
    from tests.test_readme import readme_command
    from tests.test_server import MASKED, MAX_TOKENS, PLAIN
    from tests.workers.server_process import ServerProcess
    cmd = shlex.split(readme_command("bash scripts/server.sh")) + ["--bminf", "--bminf-memory-limit", "0"]
    proc = ServerProcess(cmd, demo_env(demo_dir), tmp_path / "server.log")
    try:
        (tmp_path / "prompts.txt").write_text("".join(f"p{i}\t{t}\n" for i, t in enumerate(MASKED + PLAIN)))
        generate.main([*demo_model_args(demo_dir), "--input-source", str(tmp_path / "prompts.txt"), "--with-id",
                       "--output-path", str(tmp_path / "out"), "--top_k", "1", "--max-new-tokens", str(MAX_TOKENS)])
        generate_lines = [(tmp_path / "out" / f"p{i}.txt").read_text().rstrip("\n") for i in range(len(MASKED + PLAIN))]
        proc.wait_ready()
        client = openai.OpenAI(base_url=proc.url + "/v1", api_key="none", timeout=120, max_retries=0)
        result = client.completions.create(model="glm-130b", prompt=MASKED + PLAIN, max_tokens=MAX_TOKENS,
                                           temperature=0)
        for choice, text, line in zip(result.choices, MASKED + PLAIN, generate_lines):
            assert choice.text == line if "MASK]" in text else line.endswith(choice.text) and choice.text
        assert proc.stop() == 0, proc.output()[-3000:]
        assert "> BMInf activated, memory limit: 0 GB" in proc.output()
        assert "0 of 4 layers resident, 4 streamed per forward" in proc.output()
    finally:
        proc.kill()


# ---------------------------------------------------------------------------------------------------------------
# Bigger than memory, for real: the README's commands under a 1200 MB cgroup cap

def _can_cap_memory() -> bool:
    return os.geteuid() == 0 and os.access("/sys/fs/cgroup/memory", os.W_OK)


@pytest.mark.slow
@pytest.mark.skipif(not _can_cap_memory(), reason="needs root and cgroup v1's memory controller")
def test_bigger_than_memory_under_a_cap_gives_the_uncapped_answers(test_tokenizer_path, tmp_path):
    """The benchmark model (16-bit 2.3 GB as released, INT8 1.4 GB converted) under a 1200 MB cap with every layer
    streamed: the same answers as uncapped without offload, no OOM kill, peak usage within the cap."""
    import subprocess
    import time
    text = (ROOT / "README.md").read_text()
    capped = [line for line in text.splitlines() if line.startswith("MODEL_CONFIG=configs/model_glm_bench.sh bash scripts/memory_cap.sh 1200M")]
    convert = next(line for line in text.splitlines() if line.startswith("python tools/convert_tp.py --input-folder bench_cache/checkpoint"))
    assert len(capped) == 2
    env = {**{k: v for k, v in os.environ.items() if k not in ("CHECKPOINT_PATH", "MODEL_CONFIG", "GLM_BENCH_DIR")},
           "ICETK_MODELS": str(Path(test_tokenizer_path).parent), "OMP_NUM_THREADS": "2"}

    def run(command: str, out: Path):
        proc = subprocess.run(["bash", "-c", f"{command} --output-path {out}"], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=1200)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return proc, sorted(p.read_text() for p in out.iterdir())

    subprocess.run(["python", "tools/create_bench_checkpoint.py", "--out", "bench_cache"], cwd=ROOT, env=env, check=True)
    if not (ROOT / "bench_cache" / "int8").is_dir():
        subprocess.run(["bash", "-c", convert], cwd=ROOT, env=env, check=True, capture_output=True)
    for k, command in enumerate(capped):
        uncapped = command.replace("bash scripts/memory_cap.sh 1200M ", "").replace(" --bminf --bminf-memory-limit 0", "")
        start = time.perf_counter()
        _, expected = run(uncapped, tmp_path / f"uncapped{k}")
        middle = time.perf_counter()
        proc, answers = run(command, tmp_path / f"capped{k}")
        print(f"{command}: {time.perf_counter() - middle:.1f} s capped, {middle - start:.1f} s uncapped without offload")
        assert answers == expected and len(answers) == 4
        assert "32 streamed per forward" in proc.stdout
        peak = int(re.search(r"memory cap (\d+) bytes: peak (\d+) bytes", proc.stderr).group(2))
        assert peak <= 1200 << 20 and ", 0 OOM kill(s)" in proc.stderr, proc.stderr[-2000:]


# ---------------------------------------------------------------------------------------------------------------
# CUDA (tests/fake_cuda.py): pinned host copies, device swap slots, the copy stream

def test_streaming_to_a_gpu_equals_the_cpu(fake_gpu):  # noqa: F811
    """The fixture model on "cuda" with every layer streamed: the resident weights and the two swap slots on the
    device, the streamed weights pinned on the host, the same greedy answers as the CPU; pageable (one warning)
    when pinning fails."""
    from generation import BaseStrategy, fill_blanks_batch, generation_invalid_slices
    from tests.test_generation_decoding import END, TEXTS, _word_tok
    tok = _word_tok()

    def answers(model):
        greedy = BaseStrategy(top_k=1, end_tokens=END, invalid_slices=generation_invalid_slices(tok))
        return [r.answers for r in fill_blanks_batch(TEXTS, model, tok, greedy, out_seq_length=22,
                                                     max_sequence_length=128)]

    for dtype in ("--fp32", "--fp16"):
        expected = answers(fake_gpu.build_fixture_model(dtype, device="cpu"))
        model = fake_gpu.build_fixture_model(dtype, ["--bminf", "--bminf-memory-limit", "0"])
        streamer = model.offload
        assert streamer.plan.streamed == [0, 1] and all(p.device.type == "cuda" for p in model.parameters())
        assert all(t.device.type == "cuda" for slot in streamer.slots for t in slot)
        sources = list(streamer.sources.values())
        assert all(t.device.type == "cpu" and t.is_pinned() for t in sources)
        assert fake_gpu.pinned_bytes >= 2 * streamer.plan.layer_bytes
        assert answers(model) == expected
        assert streamer.bytes_requested > 0 and streamer.bytes_requested % (2 * streamer.plan.layer_bytes) == 0
    # graph decoding would replay the step without the layers' copies: it runs eagerly on a streaming model
    from generation import generation_layout
    from generation.graph_decode import static_filling_sequence
    from tests.test_generation_decoding import TEXT_ONLY, _prompts
    rows, mask_positions, gmask = _prompts()
    seqs, lengths, layout = generation_layout(rows, mask_positions, gmask, 6, "cuda")
    greedy = BaseStrategy(top_k=1, invalid_slices=TEXT_ONLY)
    captures = fake_gpu.captures
    streamed_ids, _ = static_filling_sequence(model, seqs.cuda(), lengths, greedy, layout, use_graph=True)
    assert fake_gpu.captures == captures
    resident = fake_gpu.build_fixture_model("--fp16")
    resident_ids, _ = static_filling_sequence(resident, seqs.cuda(), lengths, greedy, layout, use_graph=True)
    assert fake_gpu.captures > captures and torch.equal(streamed_ids.cpu(), resident_ids.cpu())
    fake_gpu.pin_fails = True
    with pytest.warns(UserWarning, match="pinning host memory for the streamed weights failed .*pageable"):
        model = fake_gpu.build_fixture_model("--fp16", ["--bminf", "--bminf-memory-limit", "0"])
    assert not any(t.is_pinned() for t in model.offload.sources.values())
    assert answers(model) == expected


# ---------------------------------------------------------------------------------------------------------------
# Tensor parallelism: 2 gloo processes, each streaming its own shard

def tp_worker(root: str, tokenizer_path: str) -> None:
    """Each rank: greedy blank filling and an every_path run, resident vs streamed at 0 and some layers resident,
    for every format; rank 0 writes "ok" lines."""
    import initialize
    from generation import BaseStrategy, fill_blanks_batch, generation_invalid_slices
    from model import mpu
    from model.tokenizer import IceTokenizer
    initialize.initialize(argv=small_args(Path(root) / "16bit_tp2", mp=2))
    tokenizer = IceTokenizer(tokenizer_path)
    greedy = BaseStrategy(top_k=1, end_tokens=[150005, 20002], invalid_slices=generation_invalid_slices(tokenizer))
    texts = ["The capital of France is [MASK].", "Tell me a story about a cat."]
    lines = []
    for fmt, extra in FORMATS.items():
        folder = Path(root) / f"{fmt}_tp2"
        results = []
        resident = build(folder, extra, mp=2)
        for flags in ([], ["--bminf-memory-limit", "0"], ["--bminf-memory-limit", limit_for(resident, 3)]):
            model = build(folder, extra + (flags and ["--bminf"]) + flags, mp=2) if flags else resident
            answers = [r.answers for r in fill_blanks_batch(texts, model, tokenizer, greedy, max_new_tokens=6,
                                                            max_sequence_length=128)]
            results.append((answers, every_path(model)))
        (ref_answers, ref_paths), *streamed = results
        same = all(a == ref_answers and all(torch.equal(x, y) for x, y in zip(ref_paths, p)) for a, p in streamed)
        lines.append(f"{fmt} {'ok' if same else 'DIFFERENT'}")
    if mpu.get_model_parallel_rank() == 0:
        (Path(root) / "tp2.txt").write_text("\n".join(lines) + "\n")


def test_tp2_streaming_equals_resident(tmp_path, test_tokenizer_path):
    make_checkpoints(tmp_path, 2)
    proc = torchrun(Path(__file__), [tmp_path, test_tokenizer_path], nprocs=2, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "tp2.txt").read_text().split("\n") == ["16bit ok", "int8 ok", "int4 ok", ""]


if __name__ == "__main__":
    from model.errors import main_entry
    main_entry(tp_worker)(sys.argv[1], sys.argv[2])
