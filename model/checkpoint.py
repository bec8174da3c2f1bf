"""SAT checkpoint folders: `<dir>/latest`, `<dir>/<iteration>/mp_rank_XX_model_states.pt`, weights under 'module'.

Loading refuses what would make the model silently wrong: shards that are the same file (a symlink or hard link)
or copies of each other (equal CRC-32s of every tensor record in their zip directories), and non-finite weights
(NaN/Inf; named with their counts, an error unless --allow-non-finite-weights). The finiteness check reads each
tensor chunk by chunk in the pass that already converts it (or, when the checkpoint's tensors are used as they are,
memory-mapped, the pass that first pages them in): a min/max reduction per cache-sized chunk.
"""
import os
import re
import warnings
import zipfile
from typing import Callable, Dict, List, Optional, Tuple

import torch

from model.errors import UserError

SHARD_PATTERN = re.compile(r"^mp_rank_(\d{2,})_model_states\.pt$")
CHECK_CHUNK = 1 << 20  # elements per chunk of the finiteness check (a few MB: still in cache after its copy)


def read_latest(load_dir: str) -> str:
    """The iteration folder name recorded in `<load_dir>/latest` (a number or 'release')."""
    if not os.path.isdir(load_dir):
        raise UserError(f"checkpoint folder {load_dir!r} does not exist; pass the folder holding `latest` with --load")
    latest = os.path.join(load_dir, "latest")
    if not os.path.isfile(latest):
        raise UserError(f"{latest} is missing: a SAT checkpoint folder holds a `latest` file naming its iteration "
                        f"(e.g. 49300); check --load")
    with open(latest) as f:
        iteration = f.read().strip()
    if iteration != "release" and not iteration.isdigit():
        raise UserError(f"{latest} holds {iteration!r}; expected an iteration number or 'release'")
    return iteration


def shard_path(load_dir: str, iteration: str, model_parallel_rank: int) -> str:
    return os.path.join(load_dir, iteration, f"mp_rank_{model_parallel_rank:02d}_model_states.pt")


def list_shards(load_dir: str) -> List[str]:
    """All shard files of the checkpoint in rank order; checks that ranks 0..n-1 are all present."""
    iteration = read_latest(load_dir)
    folder = os.path.join(load_dir, iteration)
    if not os.path.isdir(folder):
        raise UserError(f"{folder} is missing (named by {os.path.join(load_dir, 'latest')})")
    ranks = sorted(int(m.group(1)) for f in os.listdir(folder) if (m := SHARD_PATTERN.match(f)))
    if not ranks:
        raise UserError(f"no mp_rank_XX_model_states.pt files in {folder}")
    if ranks != list(range(len(ranks))):
        missing = sorted(set(range(max(ranks) + 1)) - set(ranks))
        raise UserError(f"{folder} is incomplete: shard(s) {', '.join(f'mp_rank_{r:02d}' for r in missing)} missing")
    paths = [shard_path(load_dir, iteration, r) for r in ranks]
    check_distinct_shards(paths)
    return paths


def check_distinct_shards(paths: List[str]) -> None:
    """Every shard is a file of its own with its own tensors: not a symlink or hard link to another shard, not a
    copy of one (the CRC-32 and size of every tensor record in the zip directory, read without the data)."""
    files, copies = {}, {}
    for path in paths:
        try:
            st = os.stat(path)
        except OSError as e:
            raise UserError(f"checkpoint shard {path} cannot be read ({e.strerror})") from None
        same = files.setdefault((st.st_dev, st.st_ino), path)
        if same != path:
            raise UserError(f"{path} and {same} are the same file (a symlink or hard link): every tensor-parallel "
                            f"rank needs its own shard; re-create the checkpoint folder from the original shards")
        fingerprint = _records_fingerprint(path)
        copy = copies.setdefault(fingerprint, path) if fingerprint else path
        if copy != path:
            raise UserError(f"{path} holds the same tensors as {copy} (a copy, not its own shard): every "
                            f"tensor-parallel rank needs its own shard; re-create the checkpoint folder from the "
                            f"original shards")


def _records_fingerprint(path: str) -> Optional[Tuple]:
    """(record, CRC-32, size) of the tensor records of a zip-format torch file; None for another format."""
    try:
        with zipfile.ZipFile(path) as z:
            return tuple(sorted((i.filename.split("/", 1)[-1], i.CRC, i.file_size) for i in z.infolist()
                                if "/data/" in i.filename))
    except (OSError, zipfile.BadZipFile):
        return None


def load_shard_state_dict(path: str) -> Dict[str, torch.Tensor]:
    """The 'module' state dict of one shard, memory-mapped and without running any pickled code."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except FileNotFoundError:
        raise UserError(f"checkpoint shard {path} is missing") from None
    except Exception as e:  # weights_only refuses pickled callables; torn files fail to unpickle
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"cannot load {path} safely ({first_line}); it must be a plain SAT checkpoint "
                        f"(tensors under 'module')") from None
    if not isinstance(obj, dict) or "module" not in obj or not isinstance(obj["module"], dict):
        raise UserError(f"{path} is not a SAT checkpoint shard: expected a dict with the weights under 'module'")
    return obj["module"]


def save_shard(path: str, state_dict: Dict[str, torch.Tensor]) -> None:
    """Write one shard as the original convert_tp.py does: exactly {'module': state_dict}."""
    torch.save({"module": state_dict}, path)


def warn_once(message: str) -> None:
    warnings.warn(message, stacklevel=2)


def _chunk_non_finite(chunk: torch.Tensor) -> int:
    """Non-finite values in a 1-D chunk: one min/max pass; the exact count only when that finds one."""
    low, high = torch.aminmax(chunk)
    if bool(torch.isfinite(low) & torch.isfinite(high)):
        return 0
    return int((~torch.isfinite(chunk)).sum())


def count_non_finite(t: torch.Tensor) -> int:
    """NaN and Inf values in a tensor (0 for integer tensors), read a cache-sized chunk at a time."""
    if not t.is_floating_point() or t.numel() == 0:
        return 0
    if t.device.type != "cpu":
        return _chunk_non_finite(t.reshape(-1))
    flat = t.reshape(-1)
    return sum(_chunk_non_finite(flat[s:s + CHECK_CHUNK]) for s in range(0, flat.numel(), CHECK_CHUNK))


def convert_and_count(t: torch.Tensor, dtype: torch.dtype) -> Tuple[torch.Tensor, int]:
    """`t` as `dtype` on the CPU (itself when it already is: no copy) and its count of non-finite values, checked
    chunk by chunk right after each chunk is written (one pass over memory)."""
    if t.dtype == dtype or not t.is_floating_point():
        return (t if t.dtype == dtype else t.to(dtype)), count_non_finite(t)
    out = torch.empty(t.shape, dtype=dtype)
    src, dst, bad = t.reshape(-1), out.view(-1), 0
    for s in range(0, src.numel(), CHECK_CHUNK):
        part = dst[s:s + CHECK_CHUNK]
        part.copy_(src[s:s + CHECK_CHUNK])
        bad += _chunk_non_finite(part)
    return out, bad


def report_non_finite(counts: Dict[str, int], where: str, allow: bool, warn: Callable[[str], None] = warn_once,
                      flag: str = "--allow-non-finite-weights") -> None:
    """One line naming the keys that hold NaN/Inf values and how many: an error, or with `allow` a warning."""
    bad = {k: n for k, n in counts.items() if n}
    if not bad:
        return
    shown = ", ".join(f"{k} ({n}{' rows' if k.endswith('_scale') else ''})" for k, n in list(bad.items())[:4]) + (
        f" and {len(bad) - 4} more key(s)" if len(bad) > 4 else "")  # a quantized row with NaN/Inf has a NaN scale
    message = f"{where}: non-finite weights (NaN/Inf) in {shown}"
    if not allow:
        raise UserError(f"{message}; the checkpoint is damaged: restore or re-convert it ({flag} loads it anyway)")
    warn(f"{message}; kept because of {flag}: what meets them computes NaN (the server fails those requests)")


def _describe_shape(t) -> str:
    return "[" + ", ".join(str(d) for d in t.shape) + "]"


def check_state_dict(expected: Dict[str, torch.Tensor], found: Dict[str, torch.Tensor], path: str,
                     flags_hint: str = "the model flags") -> None:
    """Missing keys and shape mismatches are errors naming the key; unexpected keys get one warning."""
    missing = [k for k in expected if k not in found]
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise UserError(f"{path} lacks {len(missing)} key(s) the model needs: {shown}")
    for key, want in expected.items():
        got = found[key]
        if tuple(got.shape) != tuple(want.shape):
            raise UserError(f"{path}: {key} has shape {_describe_shape(got)} but {flags_hint} expect "
                            f"{_describe_shape(want)}; check --num-layers/--hidden-size/--num-attention-heads/"
                            f"--inner-hidden-size/--vocab-size/--model-parallel-size")
    unexpected = [k for k in found if k not in expected]
    if unexpected:
        warn_once(f"ignoring {len(unexpected)} unexpected key(s) in {path} (e.g. {unexpected[0]})")


def load_checkpoint(model: torch.nn.Module, load_dir: str, model_parallel_rank: int, model_parallel_size: int,
                    device="cpu", prepare_shard: Optional[Callable[[Dict[str, torch.Tensor], str], Dict]] = None,
                    allow_non_finite: bool = False, offload=None) -> str:
    """Load this rank's shard into `model` (which may live on the meta device). Returns the shard path.

    Tensors are memory-mapped and assigned without a copy when dtype and device already match, so peak host RAM
    stays near one shard. prepare_shard(state_dict, path) sees the shard's raw tensors first and returns what is
    loaded: quantization.checkpoint_preparer checks a quantized shard against the flags and quantizes a 16-bit one
    from the checkpoint's own fp16 values before any dtype cast (the model must then be quantized already).
    Non-finite values in what is loaded (a quantized row with NaN/Inf has a NaN scale) are a UserError naming the
    keys, unless allow_non_finite.
    offload (a model.offload.LayerStreamer, --bminf): its keys are handed to it as they are (it streams them in
    every forward; the model holds its swap slots instead), and every other tensor is copied out of the file
    mapping, so that what stays resident is counted memory, not pages the kernel may drop.
    """
    shards = list_shards(load_dir)
    if len(shards) != model_parallel_size:
        raise UserError(f"{load_dir} holds a {len(shards)}-way tensor-parallel checkpoint but "
                        f"--model-parallel-size is {model_parallel_size}; pass --model-parallel-size {len(shards)} or convert it "
                        f"with: python tools/convert_tp.py --input-folder {load_dir} --output-folder <new folder> "
                        f"--target-tp {model_parallel_size}")
    path = shards[model_parallel_rank]
    found = load_shard_state_dict(path)
    if prepare_shard is not None:
        found = prepare_shard(found, path)
    expected = model.state_dict()
    check_state_dict(expected, found, path)
    loaded, non_finite = {}, {}
    streamed = offload.keys if offload is not None else {}
    for key, want in expected.items():
        t = found[key]
        if t.dtype != want.dtype and want.dtype.is_floating_point != t.dtype.is_floating_point:
            raise UserError(f"{path}: {key} is {t.dtype} but the model expects {want.dtype} "
                            f"(a quantized checkpoint needs --quantization-bit-width and --from-quantized-checkpoint)")
        if key in streamed:
            non_finite[key] = count_non_finite(t)
            loaded[key] = offload.take(key, t, path)
        elif torch.device(device).type == "cpu":
            loaded[key], non_finite[key] = convert_and_count(t, want.dtype)
            if offload is not None and loaded[key] is t:
                loaded[key] = t.clone()
        else:  # converted as before, checked where it now lives
            loaded[key] = t.to(want.dtype).to(device)
            non_finite[key] = count_non_finite(loaded[key])
    report_non_finite(non_finite, path, allow_non_finite)
    model.load_state_dict(loaded, strict=True, assign=True)
    for module in model.modules():
        if hasattr(module, "after_load"):
            module.after_load()
    if offload is not None:
        offload.finish()
    return path
