"""Re-shard a SAT checkpoint to another tensor-parallel size, optionally quantizing it (the original's convert_tp.py).

    python tools/convert_tp.py --input-folder CKPT --output-folder OUT --target-tp 4 \
        [--quantization-bit-width 4|8] [--num-attention-heads 96] [--force] [--verify]

Any source size to any target size when one divides the other; the per-key rules are model/sharding.py's.
Quantization (INT8 / packed INT4, fp16 `<weight>_scale`) applies to the four big linears of each *target* shard.
Memory stays near a few tensors, not the model: every source tensor is memory-mapped on its own and unmapped after
use, and each output shard is first laid out by torch.save (skip_data) and then filled tensor by tensor. The result
is built in `<output>.convert_tp-partial` and renamed at the end, so an interrupted run leaves no half checkpoint.

Every tensor is checked for NaN/Inf as it is converted (a min/max pass over data just read): by default the first
one found stops the run naming the key and the count; --allow-non-finite-weights keeps them (a quantized row that
holds one gets a NaN scale), and --verify then says "not verified" and exits 1. --verify re-reads the sources and the
result with torch.load (not this tool's own reader) and compares. Shards that are one file or copies are refused.
"""
import argparse
import json
import os
import shutil
import struct
import sys
import zipfile
import zlib

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

from model.checkpoint import (count_non_finite, list_shards, load_shard_state_dict, read_latest,  # noqa: E402
                              report_non_finite, save_shard)
from model.errors import UserError, main_entry  # noqa: E402
from model.sharding import (is_quantized_weight, local_shard_from_sources, merge_shards, partition,  # noqa: E402
                            shard_tensor, source_ranks_for)
from quantization.functional import detect_quantization, quantize_weight  # noqa: E402


class ShardReader:
    """One shard's tensors, each memory-mapped on its own when asked for (and unmapped once dropped)."""

    def __init__(self, path: str):
        self.path = path
        if not zipfile.is_zipfile(path):
            raise UserError(f"{path} is not a zip-format torch checkpoint (legacy torch.save format?); re-save it "
                            f"with a current PyTorch's torch.save first")
        try:  # the meta load reads only the pickle; each storage records its offset in the file
            obj = torch.load(path, map_location="meta", weights_only=True)
        except Exception as e:
            raise UserError(f"cannot read {path} ({str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}); "
                            f"it must be a SAT checkpoint shard") from None
        if not isinstance(obj, dict) or not isinstance(obj.get("module"), dict):
            raise UserError(f"{path} is not a SAT checkpoint shard: expected a dict with the weights under 'module'")
        self.meta = obj["module"]

    def __iter__(self):
        return iter(self.meta)

    def __getitem__(self, key: str) -> torch.Tensor:
        m = self.meta[key]
        storage = m.untyped_storage()
        if storage.nbytes() == 0:
            return torch.empty(m.shape, dtype=m.dtype)
        raw = np.memmap(self.path, dtype=np.uint8, mode="c", offset=storage._checkpoint_offset, shape=(storage.nbytes(),))
        return torch.from_numpy(raw).view(m.dtype).as_strided(m.shape, m.stride(), m.storage_offset())


def quantized(key: str, bits) -> bool:
    return bool(bits) and is_quantized_weight(key)


def target_layout(source: ShardReader, source_tp: int, target_tp: int, bits) -> dict:
    """key -> (shape, dtype) of every target shard, in checkpoint order (scales right after their weights)."""
    layout = {}
    for key, m in source.meta.items():
        shape, dim = list(m.shape), partition(key).split_dim
        if dim is not None:
            shape[dim] = shape[dim] * source_tp // target_tp
        if not quantized(key, bits):
            layout[key] = (shape, m.dtype)
            continue
        if bits == 4 and shape[1] % 2:
            raise UserError(f"{key}: a target shard has {shape[1]} columns, but INT4 packs two per byte; "
                            f"use --quantization-bit-width 8")
        layout[key] = ([shape[0], shape[1] // (2 if bits == 4 else 1)], torch.int8)
        layout[key + "_scale"] = ([shape[0]], torch.float16)
    return layout


def target_tensors(sources, rank, source_tp, target_tp, bits, non_finite: dict, allow_non_finite: bool):
    """(key, tensor) of target shard `rank` from its source shards, in checkpoint order. The non-finite values of
    each key are counted into `non_finite` (split keys on every rank, replicated ones on rank 0); unless allowed,
    the first one stops the conversion."""
    for key in sources[0]:
        shard = local_shard_from_sources(key, [s[key] for s in sources], rank, source_tp, target_tp)
        if rank == 0 or partition(key).split_dim is not None:
            non_finite[key] = non_finite.get(key, 0) + count_non_finite(shard)
            if not allow_non_finite:
                report_non_finite({key: non_finite[key]}, os.path.dirname(sources[0].path), False)
        if quantized(key, bits):
            q, scale = quantize_weight(shard, bits)
            yield key, q
            yield key + "_scale", scale
            del q, scale
        else:
            yield key, shard
        del shard


def _records(path: str):
    """Per data record, in storage order: (data offset, size, CRC offset in the data descriptor, CRC offset in the
    central directory). torch writes every record with a data descriptor (PK\\x07\\x08, crc, sizes) after the data."""
    with zipfile.ZipFile(path) as z, open(path, "rb") as f:
        f.seek(z.start_dir)
        central = f.read()
        records, pos = {}, 0
        for info in z.infolist():
            n, e, c = struct.unpack_from("<HHH", central, pos + 28)
            f.seek(info.header_offset + 26)
            ln, le = struct.unpack("<HH", f.read(4))
            data = info.header_offset + 30 + ln + le
            records[info.filename.split("/", 1)[1]] = (data, info.file_size, data + info.file_size + 4,
                                                       z.start_dir + pos + 16)
            pos += 46 + n + e + c
    return [records[f"data/{i}"] for i in range(sum(name.startswith("data/") for name in records))]


def write_shard(path: str, layout: dict, tensors, progress) -> None:
    """torch.save({'module': ...}) written one tensor at a time: a skip_data save lays the file out (with
    uninitialised, never-touched placeholders), then each tensor's bytes and CRC-32 go into place."""
    skeleton = {key: torch.empty(shape, dtype=dtype) for key, (shape, dtype) in layout.items()}
    with torch.serialization.skip_data():
        save_shard(path, skeleton)
    del skeleton
    records = _records(path)
    if len(records) != len(layout):
        raise RuntimeError(f"{path}: expected {len(layout)} tensor records, found {len(records)}")
    with open(path, "r+b") as f:
        for (key, t), (offset, size, crc_at, central_crc_at) in zip(tensors, records):
            if key not in layout or list(t.shape) != layout[key][0] or t.dtype != layout[key][1]:
                raise RuntimeError(f"{path}: {key} {list(t.shape)} {t.dtype} does not match the laid-out {layout.get(key)}")
            data = t.contiguous().view(-1).view(torch.uint8).numpy()
            if data.nbytes != size:
                raise RuntimeError(f"{path}: {key} has {data.nbytes} bytes, its record {size}")
            f.seek(offset)
            f.write(data)
            crc = struct.pack("<I", zlib.crc32(data))
            f.seek(crc_at)
            f.write(crc)
            f.seek(central_crc_at)
            f.write(crc)
            del t, data
            progress.update(1)


def check_sources(sources, target_tp, heads, bits) -> None:
    first = sources[0]
    found = detect_quantization(first.meta, first.path)
    if found:
        raise UserError(f"{first.path} is already quantized (INT{found}); convert the 16-bit checkpoint instead "
                        f"(add --quantization-bit-width {found} to quantize while converting)")
    for s in sources[1:]:
        if list(s.meta) != list(first.meta):
            raise UserError(f"{s.path} does not hold the same tensors as {first.path}; is the checkpoint complete?")
    if heads is not None and heads % target_tp:
        raise UserError(f"{heads} attention heads do not split into --target-tp {target_tp} ranks")
    for key, m in first.meta.items():
        part = partition(key)
        if part.split_dim is None:
            continue
        size = m.shape[part.split_dim] * len(sources)
        if size % (target_tp * part.blocks):
            raise UserError(f"{key} ({'columns' if part.split_dim else 'rows'}: {size}) cannot be split into "
                            f"--target-tp {target_tp} equal parts{f' of each of its {part.blocks} blocks' if part.blocks > 1 else ''}")


def convert(sources, folder, target_tp, bits, allow_non_finite=False) -> dict:
    """Write the target shards into `folder`; returns key -> non-finite values found (kept only if allowed)."""
    source_tp = len(sources)
    layout = target_layout(sources[0], source_tp, target_tp, bits)
    non_finite = {}
    with tqdm(total=len(layout) * target_tp, unit="tensor", desc=f"TP {source_tp} -> {target_tp}") as progress:
        for rank in range(target_tp):
            mine = [sources[r] for r in source_ranks_for(rank, source_tp, target_tp)]
            write_shard(os.path.join(folder, f"mp_rank_{rank:02d}_model_states.pt"), layout,
                        target_tensors(mine, rank, source_tp, target_tp, bits, non_finite, allow_non_finite), progress)
    report_non_finite(non_finite, os.path.dirname(sources[0].path), allow_non_finite,
                      warn=lambda message: print(f"warning: {message}", file=sys.stderr, flush=True))
    return non_finite


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (a.dtype == b.dtype and a.shape == b.shape
            and torch.equal(a.contiguous().view(-1).view(torch.uint8), b.contiguous().view(-1).view(torch.uint8)))


def verify(source_paths, output_paths, bits) -> None:
    """Every output shard equals the rules applied to the merged input (re-quantized where quantized), and merging
    the unquantized outputs gives back the merged input bit for bit. Sources and outputs are read by torch.load
    (memory-mapped), not by the ShardReader the conversion used, so a fault of that reader cannot verify itself."""
    sources = [load_shard_state_dict(p) for p in source_paths]
    outputs = [load_shard_state_dict(p) for p in output_paths]
    target_tp = len(outputs)
    layout = target_layout(ShardReader(source_paths[0]), len(sources), target_tp, bits)
    for path, o in zip(output_paths, outputs):
        if list(o) != list(layout):
            raise UserError(f"verification failed: {path} does not hold the expected tensors")
    for key in tqdm(list(sources[0]), unit="tensor", desc="verifying"):
        full = merge_shards(key, [s[key] for s in sources])
        for rank, (path, o) in enumerate(zip(output_paths, outputs)):
            want = shard_tensor(key, full, rank, target_tp)
            pairs = [(key, want)]
            if quantized(key, bits):
                q, scale = quantize_weight(want, bits)
                pairs = [(key, q), (key + "_scale", scale)]
            for k, w in pairs:
                if not same(o[k], w):
                    raise UserError(f"verification failed: {k} of {path} differs from the input")
        if not quantized(key, bits) and not same(merge_shards(key, [o[key] for o in outputs]), full):
            raise UserError(f"verification failed: merging {key} back does not give the input")


def copy_metadata(input_folder: str, folder: str, target_tp: int, bits) -> None:
    shutil.copyfile(os.path.join(input_folder, "latest"), os.path.join(folder, "latest"))  # the exact string
    config = os.path.join(input_folder, "model_config.json")
    if os.path.isfile(config):
        with open(config) as f:
            try:
                data = json.load(f)
            except ValueError:
                data = None
        if isinstance(data, dict):
            data["model_parallel_size"] = target_tp
            if bits:
                data["quantization_bit_width"] = bits
            with open(os.path.join(folder, "model_config.json"), "w") as f:
                json.dump(data, f, indent=2)
        else:
            shutil.copyfile(config, os.path.join(folder, "model_config.json"))


def output_paths(input_folder: str, output_folder: str, force: bool):
    inp, out = os.path.realpath(input_folder), os.path.realpath(output_folder)
    if out == inp or out.startswith(inp + os.sep) or inp.startswith(out + os.sep):
        raise UserError(f"--output-folder {output_folder} overlaps --input-folder {input_folder}; write it elsewhere")
    if os.path.exists(out) and not force:
        raise UserError(f"{output_folder} already exists; pass --force to replace it or choose another --output-folder")
    return out, out + ".convert_tp-partial"


def heads_hint(args):
    if args.num_attention_heads is not None:
        return args.num_attention_heads
    try:
        with open(os.path.join(args.input_folder, "model_config.json")) as f:
            return int(json.load(f)["num_attention_heads"])
    except (OSError, ValueError, KeyError, TypeError):
        print("note: head count unknown (no --num-attention-heads, no model_config.json): only checking that the "
              "QKV rows split into equal q/k/v thirds; pass --num-attention-heads to check whole heads",
              file=sys.stderr)
        return None


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--input-folder", required=True, help="SAT checkpoint folder (holds `latest`)")
    p.add_argument("--output-folder", required=True)
    p.add_argument("--target-tp", type=int, default=4, help="target tensor-parallel size")
    p.add_argument("--quantization-bit-width", type=int, default=None, choices=[4, 8])
    p.add_argument("--num-attention-heads", type=int, default=None,
                   help="check that whole heads land on each rank (default: from model_config.json when present)")
    p.add_argument("--force", action="store_true", help="replace an existing output folder")
    p.add_argument("--verify", action="store_true", help="re-read the result and check it against the input")
    p.add_argument("--allow-non-finite-weights", action="store_true",
                   help="convert a checkpoint holding NaN/Inf weights anyway (by default the run stops, naming the key)")
    return p.parse_args(argv)


@main_entry
def main(argv=None):
    args = parse_args(argv)
    paths = list_shards(args.input_folder)
    iteration, source_tp, target_tp, bits = read_latest(args.input_folder), len(paths), args.target_tp, args.quantization_bit_width
    if target_tp < 1 or max(source_tp, target_tp) % min(source_tp, target_tp):
        raise UserError(f"cannot convert {source_tp} shards to --target-tp {target_tp}: one must divide the other "
                        f"(e.g. {', '.join(str(t) for t in (1, 2, 4, 8) if max(t, source_tp) % min(t, source_tp) == 0)})")
    out, tmp = output_paths(args.input_folder, args.output_folder, args.force)
    sources = [ShardReader(p) for p in paths]
    check_sources(sources, target_tp, heads_hint(args), bits)
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        os.makedirs(os.path.join(tmp, iteration))
        non_finite = convert(sources, os.path.join(tmp, iteration), target_tp, bits, args.allow_non_finite_weights)
        copy_metadata(args.input_folder, tmp, target_tp, bits)
        if args.verify:
            verify(paths, list_shards(tmp), bits)
        if os.path.lexists(out):  # --force: swap the new folder in, then drop the old one
            old = out + ".convert_tp-old"
            shutil.rmtree(old, ignore_errors=True)
            os.rename(out, old)
            os.rename(tmp, out)
            shutil.rmtree(old) if os.path.isdir(old) else os.remove(old)
        else:
            os.rename(tmp, out)
    except OSError as e:  # e.g. an output folder that cannot be written, a full disk
        shutil.rmtree(tmp, ignore_errors=True)
        raise UserError(f"cannot convert: {e.filename or args.output_folder}: {e.strerror or e}; nothing was written "
                        f"to {args.output_folder} (it needs a folder you can write, with room for the checkpoint)"
                        ) from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    bad = sum(non_finite.values())
    verified = "" if not args.verify else " (verified)" if not bad else (
        f" (NOT verified: {bad} non-finite value(s) kept by --allow-non-finite-weights)")
    print(f"wrote {args.output_folder}: {target_tp} shard(s) from {source_tp}{f', INT{bits}' if bits else ''}{verified}")
    if args.verify and bad:
        sys.exit(1)


if __name__ == "__main__":
    main()
