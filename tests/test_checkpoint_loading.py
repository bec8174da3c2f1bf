"""SAT checkpoint loading: safety, memory, and one-line errors for every bad input."""
import os
import shutil
import subprocess
import sys
import warnings

import pytest
import torch

from model.checkpoint import load_checkpoint, load_shard_state_dict
from model.errors import UserError
from tests.helpers import FIXTURE_DIR, ROOT, fixture_model_args, load_fixture_model
from tools.create_random_checkpoint import create_random_checkpoint

WORKER = ROOT / "tests" / "workers" / "init_worker.py"


def run_init(args, tokenizer_path, env=None):
    cmd = [sys.executable, str(WORKER), *map(str, args), "--tokenizer-path", tokenizer_path]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT,
                          env={**os.environ, **(env or {})})


def run_inits(arg_lists, tokenizer_path):
    """run_init for each argument list, the processes running at the same time (independent runs: the machine's
    cores are shared out instead of waiting for one process at a time); their CompletedProcesses, in order."""
    procs = [subprocess.Popen([sys.executable, str(WORKER), *map(str, args), "--tokenizer-path", tokenizer_path],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
             for args in arg_lists]
    try:
        done = []
        for p in procs:
            out, err = p.communicate(timeout=300)
            done.append(subprocess.CompletedProcess(p.args, p.returncode, out, err))
        return done
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()


def assert_one_line_error(proc, *fragments):
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    lines = [l for l in proc.stderr.splitlines() if l.startswith("error: ")]
    assert len(lines) == 1, proc.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


class Boom:
    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_weights_only_rejects_pickled_callable(tmp_path):
    marker = tmp_path / "pwned"
    Boom.marker = marker
    path = tmp_path / "mp_rank_00_model_states.pt"
    torch.save({"module": {"w": torch.zeros(2)}, "extra": Boom()}, path)
    with pytest.raises(UserError, match="cannot load .* safely"):
        load_shard_state_dict(str(path))
    assert not marker.exists(), "the checkpoint ran code"


def test_loaded_weights_equal_checkpoint_and_are_memory_mapped():
    model = load_fixture_model(dtype=torch.float16)  # same dtype as the file: no copy
    sd = torch.load(FIXTURE_DIR / "ckpt" / "1" / "mp_rank_00_model_states.pt", weights_only=True)["module"]
    for key, value in model.state_dict().items():
        assert torch.equal(value, sd[key]), key


def test_unexpected_keys_warn_once(tmp_path):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(FIXTURE_DIR / "ckpt", ckpt)
    path = ckpt / "1" / "mp_rank_00_model_states.pt"
    sd = torch.load(path, weights_only=True)["module"]
    sd["transformer.layers.0.attention.rotary_emb.inv_freq"] = torch.ones(8)
    sd["transformer.layers.1.attention.rotary_emb.inv_freq"] = torch.ones(8)
    torch.save({"module": sd}, path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        load_fixture_model_from(ckpt)
    messages = [str(w.message) for w in caught if "unexpected key" in str(w.message)]
    assert len(messages) == 1 and "2 unexpected key(s)" in messages[0]


def load_fixture_model_from(ckpt):
    from model import GLM130B
    from tests.helpers import fixture_config
    model = GLM130B(fixture_config(), device="meta")
    load_checkpoint(model, str(ckpt), 0, 1)
    return model


@pytest.fixture()
def broken_ckpt(tmp_path):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(FIXTURE_DIR / "ckpt", ckpt)
    return ckpt


def _replace_args(args, flag, value):
    args = list(args)
    args[args.index(flag) + 1] = str(value)
    return args


def test_error_missing_latest(broken_ckpt, test_tokenizer_path):
    (broken_ckpt / "latest").unlink()
    proc = run_init(_replace_args(fixture_model_args(), "--load", broken_ckpt), test_tokenizer_path)
    assert_one_line_error(proc, "latest", "is missing")


def test_error_missing_folder(tmp_path, test_tokenizer_path):
    proc = run_init(_replace_args(fixture_model_args(), "--load", tmp_path / "nope"), test_tokenizer_path)
    assert_one_line_error(proc, "does not exist", "--load")


def test_error_missing_shard(tmp_path, test_tokenizer_path):
    ckpt = tmp_path / "tp2"
    shutil.copytree(FIXTURE_DIR / "ckpt_tp2", ckpt)
    (ckpt / "1" / "mp_rank_00_model_states.pt").unlink()
    proc = run_init(_replace_args(fixture_model_args(), "--load", ckpt), test_tokenizer_path)
    assert_one_line_error(proc, "incomplete", "mp_rank_00 missing")


def test_error_shard_count_differs_from_mp_size(test_tokenizer_path):
    args = _replace_args(fixture_model_args(), "--load", FIXTURE_DIR / "ckpt_tp2")
    proc = run_init(args, test_tokenizer_path)
    assert_one_line_error(proc, "2-way", "--model-parallel-size is 1", "tools/convert_tp.py")


def test_error_missing_keys_named(broken_ckpt, test_tokenizer_path):
    path = broken_ckpt / "1" / "mp_rank_00_model_states.pt"
    sd = torch.load(path, weights_only=True)["module"]
    del sd["transformer.layers.1.mlp.dense_4h_to_h.weight"]
    torch.save({"module": sd}, path)
    proc = run_init(_replace_args(fixture_model_args(), "--load", broken_ckpt), test_tokenizer_path)
    assert_one_line_error(proc, "lacks 1 key", "transformer.layers.1.mlp.dense_4h_to_h.weight")


def test_error_shape_mismatch_names_key(test_tokenizer_path):
    args = _replace_args(fixture_model_args(), "--inner-hidden-size", 256)
    proc = run_init(args, test_tokenizer_path)
    assert_one_line_error(proc, "transformer.layers.0.mlp.dense_h_to_4h.weight", "[256, 64]", "[512, 64]")


def test_error_not_a_checkpoint(broken_ckpt, test_tokenizer_path):
    torch.save({"weights": {}}, broken_ckpt / "1" / "mp_rank_00_model_states.pt")
    proc = run_init(_replace_args(fixture_model_args(), "--load", broken_ckpt), test_tokenizer_path)
    assert_one_line_error(proc, "not a SAT checkpoint shard", "'module'")


@pytest.mark.parametrize("flag,value,fragment", [
    ("--num-attention-heads", 3, "--num-attention-heads 3 is not divisible by --model-parallel-size 2"),
    ("--vocab-size", 150527, "--vocab-size 150527 is not divisible"),
    ("--inner-hidden-size", 129, "--inner-hidden-size 129 is not divisible"),
])
def test_error_sizes_not_divisible_by_mp(flag, value, fragment, test_tokenizer_path):
    args = _replace_args(fixture_model_args(mp=2), flag, value)
    proc = run_init(args, test_tokenizer_path, env={"WORLD_SIZE": "2", "RANK": "0"})
    assert_one_line_error(proc, fragment)


def test_error_world_size_not_multiple_of_mp(test_tokenizer_path):
    proc = run_init(fixture_model_args(mp=2), test_tokenizer_path, env={"WORLD_SIZE": "3", "RANK": "0"})
    assert_one_line_error(proc, "3 process(es) were started", "needs a multiple of 2 processes")


def test_error_missing_tokenizer(tmp_path):
    proc = run_init(fixture_model_args(), str(tmp_path / "none" / "ice_text.model"),
                    env={"HOME": str(tmp_path), "ICETK_MODELS": str(tmp_path)})
    assert_one_line_error(proc, "ice_text.model")


def test_peak_rss_while_loading_stays_near_one_copy(tmp_path, test_tokenizer_path):
    """A ~270 MB checkpoint loads with peak RSS < baseline + 1.3 × parameter bytes (no second full copy)."""
    ckpt = tmp_path / "big"
    create_random_checkpoint(str(ckpt), num_layers=8, hidden_size=1024, num_attention_heads=8,
                             inner_hidden_size=2816, vocab_size=32768, dtype="fp16")
    size = sum(f.stat().st_size for f in (ckpt / "1").iterdir())
    assert size > 250e6
    args = ["--num-layers", 8, "--hidden-size", 1024, "--num-attention-heads", 8, "--inner-hidden-size", 2816,
            "--vocab-size", 32768, "--load", ckpt, "--fp16"]
    proc = run_init(args, test_tokenizer_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    stats = dict(kv.split("=") for kv in proc.stdout.split("\n")[-2].split())
    baseline, peak, params = int(stats["baseline_kib"]) * 1024, int(stats["peak_kib"]) * 1024, int(stats["param_bytes"])
    print(f"checkpoint {size / 1e6:.0f} MB, params {params / 1e6:.0f} MB, baseline {baseline / 1e6:.0f} MB, "
          f"peak {peak / 1e6:.0f} MB -> {(peak - baseline) / params:.2f}x params above baseline")
    assert peak < baseline + 1.3 * params


def test_quantized_checkpoint_flags_end_to_end(tmp_path, test_tokenizer_path):
    out = tmp_path / "int8"
    subprocess.run([sys.executable, str(ROOT / "tools" / "convert_tp.py"), "--input-folder", str(FIXTURE_DIR / "ckpt"),
                    "--output-folder", str(out), "--target-tp", "1", "--quantization-bit-width", "8"],
                   check=True, capture_output=True, cwd=ROOT)
    args = _replace_args(fixture_model_args(), "--load", out)
    fp16 = fixture_model_args() + ["--quantization-bit-width", "8", "--from-quantized-checkpoint"]
    no_flags, int4_flags, ok, fp16_flags = run_inits(
        [args, args + ["--quantization-bit-width", "4", "--from-quantized-checkpoint"],
         args + ["--quantization-bit-width", "8", "--from-quantized-checkpoint"], fp16], test_tokenizer_path)
    assert_one_line_error(no_flags, "INT8-quantized checkpoint",
                          "--quantization-bit-width 8 --from-quantized-checkpoint")
    assert_one_line_error(int4_flags, "holds INT8 weights", "pass --quantization-bit-width 8")
    assert ok.returncode == 0 and "> Model initialized" in ok.stdout, ok.stderr[-2000:]
    assert_one_line_error(fp16_flags, "holds 16-bit weights", "drop that flag")


def poison(ckpt, values):
    """Write NaN/Inf into the fixture copy's shard: {key: [(flat index, value), ...]}."""
    path = ckpt / "1" / "mp_rank_00_model_states.pt"
    sd = torch.load(path, weights_only=True)["module"]
    for key, entries in values.items():
        for index, value in entries:
            sd[key].view(-1)[index] = value
    torch.save({"module": sd}, path)


DENSE = "transformer.layers.0.attention.dense.weight"
EMBED = "transformer.word_embeddings.weight"


@pytest.mark.parametrize("extra", [(), ("--bf16",), ("--quantization-bit-width", "8")],
                         ids=["as stored", "converted to bf16", "quantized on load"])
def test_non_finite_weights_are_refused_naming_keys_and_counts(broken_ckpt, test_tokenizer_path, extra):
    poison(broken_ckpt, {DENSE: [(3, float("nan")), (700, float("inf"))], EMBED: [(5, float("-inf"))]})
    args = _replace_args(fixture_model_args(), "--load", broken_ckpt) + list(extra)
    if extra == ("--bf16",):
        args.remove("--fp32")
    dense = f"{DENSE}_scale (2 rows)" if "--quantization-bit-width" in extra else f"{DENSE} (2)"
    refused, ok = run_inits([args, args + ["--allow-non-finite-weights"]], test_tokenizer_path)
    assert_one_line_error(refused, "non-finite weights (NaN/Inf) in", dense, f"{EMBED} (1)",
                          "--allow-non-finite-weights")
    assert ok.returncode == 0 and "> Model initialized" in ok.stdout, ok.stderr[-2000:]
    assert "kept because of --allow-non-finite-weights" in ok.stderr


def test_count_non_finite_reads_chunks_and_counts_exactly(monkeypatch):
    from model import checkpoint
    monkeypatch.setattr(checkpoint, "CHECK_CHUNK", 1000)
    t = torch.randn(2500, dtype=torch.float16)
    assert checkpoint.count_non_finite(t) == 0
    t[[0, 999, 1000, 2499]] = torch.tensor([float("nan"), float("inf"), float("-inf"), float("nan")]).half()
    assert checkpoint.count_non_finite(t) == 4 and checkpoint.count_non_finite(t.to(torch.int8)) == 0
    converted, bad = checkpoint.convert_and_count(t, torch.bfloat16)
    assert bad == 4 and torch.equal(converted.view(torch.int16), t.to(torch.bfloat16).view(torch.int16))


@pytest.mark.parametrize("how", ["symlink", "hard link", "copy"])
def test_shards_that_are_one_file_or_copies_are_refused(tmp_path, how):
    ckpt = tmp_path / "tp2"
    shutil.copytree(FIXTURE_DIR / "ckpt_tp2", ckpt)
    first, second = ckpt / "1" / "mp_rank_00_model_states.pt", ckpt / "1" / "mp_rank_01_model_states.pt"
    second.unlink()
    {"symlink": lambda: second.symlink_to(first.name), "hard link": lambda: os.link(first, second),
     "copy": lambda: shutil.copyfile(first, second)}[how]()
    expected = "holds the same tensors as" if how == "copy" else "are the same file (a symlink or hard link)"
    from model import GLM130B
    from tests.helpers import fixture_config
    with pytest.raises(UserError, match=expected.replace("(", r"\(").replace(")", r"\)")):
        load_checkpoint(GLM130B(fixture_config(), device="meta"), str(ckpt), 1, 2)
    proc = subprocess.run([sys.executable, "tools/convert_tp.py", "--input-folder", str(ckpt), "--output-folder",
                           str(tmp_path / "out"), "--target-tp", "1", "--verify"], capture_output=True, text=True,
                          cwd=ROOT)
    assert_one_line_error(proc, expected)
    assert not (tmp_path / "out").exists()
