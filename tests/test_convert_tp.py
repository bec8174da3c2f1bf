"""tools/convert_tp.py: exact re-sharding in every direction, quantized conversion, clear errors, bounded memory."""
import hashlib
import os
import pathlib
import shutil
import subprocess
import sys

import pytest
import torch

from model.sharding import is_quantized_weight, shard_tensor
from quantization.functional import quantize_weight
from tools import convert_tp
from tools.create_random_checkpoint import create_random_checkpoint

ROOT = pathlib.Path(__file__).resolve().parent.parent
FIXTURE = pathlib.Path(__file__).parent / "data" / "sat-parity-tiny"
if not FIXTURE.is_dir():
    FIXTURE = pathlib.Path("/work/shared/fixtures/sat-parity-tiny")
SCRIPT = ROOT / "tools" / "convert_tp.py"


def shards(folder):
    folder = pathlib.Path(folder)
    it = (folder / "latest").read_text().strip()
    files = sorted((folder / it).glob("mp_rank_*_model_states.pt"))
    return [torch.load(f, weights_only=True)["module"] for f in files]


def identical(a, b):
    """Same keys in the same order, same dtypes, shapes and bytes."""
    return list(a) == list(b) and all(
        a[k].dtype == b[k].dtype and a[k].shape == b[k].shape
        and torch.equal(a[k].view(-1).view(torch.uint8), b[k].view(-1).view(torch.uint8)) for k in a)


def digest(folder):
    h = hashlib.sha256()
    for p in sorted(pathlib.Path(folder).rglob("*")):
        h.update(str(p.relative_to(folder)).encode())
        if p.is_file():
            h.update(p.read_bytes())
    return h.hexdigest()


def convert(src, dst, tp, *extra):
    convert_tp.main(["--input-folder", str(src), "--output-folder", str(dst), "--target-tp", str(tp), *map(str, extra)])


def fails(capsys, *args):
    with pytest.raises(SystemExit) as e:
        convert(*args)
    assert e.value.code == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert len(err) == 1
    return err[0]


def test_fixture_round_trip_is_bit_exact(tmp_path):
    before = digest(FIXTURE / "ckpt")
    convert(FIXTURE / "ckpt", tmp_path / "tp2", 2, "--verify")
    convert(tmp_path / "tp2", tmp_path / "tp1", 1, "--verify")
    assert digest(FIXTURE / "ckpt") == before  # the input is never touched
    assert all(identical(a, b) for a, b in zip(shards(tmp_path / "tp2"), shards(FIXTURE / "ckpt_tp2")))
    assert len(shards(tmp_path / "tp2")) == 2
    assert identical(shards(tmp_path / "tp1")[0], shards(FIXTURE / "ckpt")[0])
    assert (tmp_path / "tp1" / "latest").read_bytes() == (FIXTURE / "ckpt" / "latest").read_bytes()
    assert not list(tmp_path.glob("*convert_tp*"))  # no temporary folders left


def test_latest_string_is_copied_exactly(tmp_path):
    src = tmp_path / "src"
    shutil.copytree(FIXTURE / "ckpt", src)
    (src / "latest").write_text("1\n")
    convert(src, tmp_path / "out", 2)
    assert (tmp_path / "out" / "latest").read_text() == "1\n"


@pytest.fixture(scope="module")
def random_checkpoints(tmp_path_factory):
    """The same random weights saved at TP 1, 2, 4 and 8."""
    root = tmp_path_factory.mktemp("random")
    for tp in (1, 2, 4, 8):
        create_random_checkpoint(str(root / f"tp{tp}"), num_layers=2, hidden_size=64, num_attention_heads=8,
                                 inner_hidden_size=96, vocab_size=256, model_parallel_size=tp, seed=7)
    return root


@pytest.mark.parametrize("source,target", [(8, 4), (8, 1), (1, 8), (2, 4), (4, 2), (2, 8), (4, 4)])
def test_every_direction(random_checkpoints, tmp_path, source, target):
    convert(random_checkpoints / f"tp{source}", tmp_path / "out", target)
    got, want = shards(tmp_path / "out"), shards(random_checkpoints / f"tp{target}")
    assert len(got) == target and all(identical(a, b) for a, b in zip(got, want))


@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_conversion(tmp_path, bits):
    convert(FIXTURE / "ckpt", tmp_path / "q", 2, "--quantization-bit-width", bits, "--verify")
    full = shards(FIXTURE / "ckpt")[0]
    out = shards(tmp_path / "q")
    for rank, sd in enumerate(out):
        for key, value in full.items():
            local = shard_tensor(key, value, rank, 2)
            if is_quantized_weight(key):  # scales per *target* shard (row-parallel: local columns)
                q, scale = quantize_weight(local, bits)
                assert sd[key].dtype == torch.int8 and torch.equal(sd[key], q)
                assert sd[key + "_scale"].dtype == torch.float16 and torch.equal(sd[key + "_scale"], scale)
                assert sd[key].shape[1] == local.shape[1] // (2 if bits == 4 else 1)
            else:
                assert torch.equal(sd[key], local) and sd[key].dtype == torch.float16
    dense = "transformer.layers.0.attention.dense.weight"
    assert not torch.equal(out[0][dense + "_scale"], quantize_weight(full[dense], bits)[1])


def test_errors(tmp_path, capsys):
    assert "one must divide the other" in fails(capsys, FIXTURE / "ckpt_tp2", tmp_path / "o", 3)
    assert "attention heads" in fails(capsys, FIXTURE / "ckpt", tmp_path / "o", 8)  # 4 heads
    assert "does not exist" in fails(capsys, tmp_path / "nope", tmp_path / "o", 2)
    partial = tmp_path / "partial"
    shutil.copytree(FIXTURE / "ckpt_tp2", partial)
    (partial / "1" / "mp_rank_01_model_states.pt").unlink()
    (partial / "1" / "mp_rank_02_model_states.pt").write_bytes(b"")
    assert "mp_rank_01 missing" in fails(capsys, partial, tmp_path / "o", 1)
    assert "overlaps" in fails(capsys, FIXTURE / "ckpt", FIXTURE / "ckpt" / "sub", 2)
    convert(FIXTURE / "ckpt", tmp_path / "q8", 1, "--quantization-bit-width", 8)
    assert "already quantized (INT8); convert the 16-bit checkpoint" in fails(capsys, tmp_path / "q8", tmp_path / "o", 2)
    assert not (tmp_path / "o").exists()


def test_existing_output_needs_force(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old-file").write_text("x")
    assert "already exists; pass --force" in fails(capsys, FIXTURE / "ckpt", out, 2)
    convert(FIXTURE / "ckpt", out, 2, "--force")
    assert not (out / "old-file").exists() and len(shards(out)) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_interrupted_run_leaves_no_checkpoint(tmp_path, monkeypatch):
    calls = []

    def interrupted(weight, bits):
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return quantize_weight(weight, bits)

    monkeypatch.setattr(convert_tp, "quantize_weight", interrupted)
    with pytest.raises(SystemExit) as e:
        convert(FIXTURE / "ckpt", tmp_path / "out", 2, "--quantization-bit-width", 8)
    assert e.value.code == 130 and list(tmp_path.iterdir()) == []


def test_cli_error_is_one_line(tmp_path):
    proc = subprocess.run([sys.executable, str(SCRIPT), "--input-folder", str(FIXTURE / "ckpt_tp2"),
                           "--output-folder", str(tmp_path / "o"), "--target-tp", "3"],
                          capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().startswith("error: cannot convert 2 shards to --target-tp 3")


PEAK = ("import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True, stdout=subprocess.DEVNULL, "
        "stderr=subprocess.DEVNULL); print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024)")


def peak_rss(*cmd) -> int:
    """Peak resident set (bytes, file-backed mapped pages included) of a fresh process running cmd."""
    out = subprocess.run([sys.executable, "-c", PEAK, *map(str, cmd)], capture_output=True, text=True, cwd=ROOT,
                         check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    return int(out.stdout.strip())


def test_peak_memory_is_a_small_fraction_of_the_checkpoint(tmp_path):
    """Baseline = the same interpreter importing convert_tp (python + torch + numpy + tqdm); the conversion may add
    less than half the checkpoint's size on top of it, both splitting and merging+quantizing."""
    ckpt = tmp_path / "ckpt"
    create_random_checkpoint(str(ckpt), num_layers=12, hidden_size=1024, num_attention_heads=16,
                             inner_hidden_size=2560, vocab_size=8192)
    size = sum(p.stat().st_size for p in ckpt.rglob("*.pt"))
    baseline = peak_rss(sys.executable, "-c", "import tools.convert_tp")
    split = peak_rss(sys.executable, SCRIPT, "--input-folder", ckpt, "--output-folder", tmp_path / "tp2", "--target-tp", 2)
    merge = peak_rss(sys.executable, SCRIPT, "--input-folder", tmp_path / "tp2", "--output-folder", tmp_path / "q8",
                     "--target-tp", 1, "--quantization-bit-width", 8)
    mb = 2 ** 20
    print(f"checkpoint {size / mb:.0f} MB; peak RSS baseline {baseline / mb:.0f} MB, split 1->2 +{(split - baseline) / mb:.0f}"
          f" MB, merge 2->1 + INT8 +{(merge - baseline) / mb:.0f} MB")
    assert size > 250 * mb
    assert split - baseline < 0.5 * size and merge - baseline < 0.5 * size
    assert len(shards(tmp_path / "q8")) == 1


def poisoned_copy(tmp_path, entries):
    """The fixture checkpoint with NaN/Inf written into it: {key: [(flat index, value), ...]}."""
    src = tmp_path / "src"
    shutil.copytree(FIXTURE / "ckpt", src)
    path = src / "1" / "mp_rank_00_model_states.pt"
    sd = torch.load(path, weights_only=True)["module"]
    for key, values in entries.items():
        for index, value in values:
            sd[key].view(-1)[index] = value
    torch.save({"module": sd}, path)
    return src


DENSE = "transformer.layers.1.attention.dense.weight"


def test_non_finite_weights_stop_the_conversion_unless_allowed_and_are_never_verified(tmp_path, capsys):
    src = poisoned_copy(tmp_path, {DENSE: [(0, float("nan")), (5, float("inf"))]})
    line = fails(capsys, src, tmp_path / "out", 2, "--quantization-bit-width", 8)
    assert f"non-finite weights (NaN/Inf) in {DENSE} (" in line and "--allow-non-finite-weights" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]
    with pytest.raises(SystemExit) as e:
        convert(src, tmp_path / "out", 2, "--quantization-bit-width", 8, "--allow-non-finite-weights", "--verify")
    assert e.value.code == 1
    out, err = capsys.readouterr()
    assert "NOT verified: 2 non-finite value(s)" in out and "(verified)" not in out and "warning: " in err
    rank0 = shards(tmp_path / "out")[0]  # row-parallel dense: both values sit in rank 0's row 0
    assert rank0[DENSE + "_scale"][0].isnan() and not rank0[DENSE][0].any()


def test_verify_reads_the_sources_with_torch_load_not_the_converters_reader(tmp_path, monkeypatch, capsys):
    """A fault of the converter's own reader (here: one tensor read one element off) is caught by --verify."""
    real = convert_tp.ShardReader.__getitem__

    def misread(self, key):
        t = real(self, key)
        return t.roll(1, dims=-1) if key == DENSE else t

    monkeypatch.setattr(convert_tp.ShardReader, "__getitem__", misread)
    assert f"verification failed: {DENSE} of " in fails(capsys, FIXTURE / "ckpt", tmp_path / "out", 2, "--verify")
    assert list(tmp_path.iterdir()) == []


def test_an_output_folder_that_cannot_be_written_is_one_line_and_leaves_nothing(tmp_path):
    from tests.helpers import file_modes_bind
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    proc = subprocess.run([sys.executable, str(SCRIPT), "--input-folder", str(FIXTURE / "ckpt"), "--output-folder",
                           str(locked / "out"), "--target-tp", "2"], capture_output=True, text=True, cwd=ROOT,
                          preexec_fn=file_modes_bind())
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Permission denied" in errors[0] and "nothing was written" in errors[0]
    assert list(locked.iterdir()) == []
