"""Helpers shared by the evaluation package: rank-0 printing, data-file reading, batching and gathering."""
import json
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

from model import mpu
from model.errors import UserError


def print_rank_0(*args, **kwargs) -> None:
    mpu.print_rank_0(*args, **kwargs)


def is_rank_0() -> bool:
    return mpu.get_rank() == 0


# ---- Data files ---------------------------------------------------------------------------------------------------

def read_json_items(path: str, limit: Optional[int] = None) -> Iterator[Tuple[int, dict]]:
    """(line number, item) for each record of a data file.

    JSON lines, whatever the extension (MMLU's .json files are JSON lines); a file whose first character is `[` is
    read as one JSON array (line numbers are then item numbers). Blank lines are skipped. `limit` stops after that
    many items. A line that is not a JSON object stops with a one-line error naming the file and line.
    """
    try:
        f = open(path, encoding="utf-8")
    except OSError as e:
        raise UserError(f"cannot read data file {path}: {e.strerror}") from None
    count = 0
    with f:
        first = _first_char(f)
        if first == "[":
            numbered = enumerate(_load_array(f, path), 1)
        else:
            numbered = ((n, _parse_line(line, path, n)) for n, line in enumerate(f, 1) if line.strip())
        try:
            for n, item in numbered:
                if limit is not None and count >= limit:
                    return
                if not isinstance(item, dict):
                    raise UserError(f"{path}:{n}: expected a JSON object, got {type(item).__name__}")
                count += 1
                yield n, item
        except UnicodeDecodeError as e:
            raise UserError(f"{path}: not UTF-8 text ({e.reason} after line {count})") from None


def _first_char(f) -> str:
    try:
        while True:
            ch = f.read(1)
            if not ch or not ch.isspace():
                f.seek(0)
                return ch
    except UnicodeDecodeError as e:
        raise UserError(f"{f.name}: not UTF-8 text ({e.reason} at byte {e.start})") from None


def _load_array(f, path: str) -> list:
    try:
        data = json.load(f)
    except json.JSONDecodeError as e:
        raise UserError(f"{path}:{e.lineno}: invalid JSON: {e.msg}") from None
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text ({e.reason})") from None
    if not isinstance(data, list):
        raise UserError(f"{path}: expected JSON lines or one JSON array")
    return data


def _parse_line(line: str, path: str, n: int) -> Any:
    try:
        return json.loads(line)
    except json.JSONDecodeError as e:
        raise UserError(f"{path}:{n}: invalid JSON: {e.msg} (column {e.colno})") from None


def get_tokenized_input(item: dict, key: str, tokenizer, where: str = "") -> Any:
    """item[key] if present (already token ids), else item[key + '_pretokenized'] tokenized (str or list of str)."""
    if key in item:
        value = item[key]
        if _is_id_list(value) or (isinstance(value, list) and all(_is_id_list(v) for v in value)):
            return value
        raise UserError(f"{where}field '{key}' must hold token ids (a list of integers, or a list of such lists)")
    raw_key = key + "_pretokenized"
    if raw_key not in item:
        raise UserError(f"{where}missing field '{raw_key}' (or pre-tokenized '{key}')")
    raw = item[raw_key]
    if isinstance(raw, str):
        return tokenizer.tokenize(raw)
    if isinstance(raw, list) and all(isinstance(r, str) for r in raw):
        return [tokenizer.tokenize(r) for r in raw]
    raise UserError(f"{where}field '{raw_key}' must be a string or a list of strings")


def _is_id_list(value) -> bool:
    return isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in value)


# ---- Batching and data parallelism --------------------------------------------------------------------------------

def pack_by_length(lengths: Sequence[int], micro_batch_size: int, same_length: bool = False) -> List[List[int]]:
    """Micro-batches of sample indices with similar lengths: longest first (so running out of memory happens at
    once, not hours in), ties in data order. Every batch is padded only to its own longest sample.
    same_length: a batch never mixes lengths (no padding at all)."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    if not same_length:
        return [order[i:i + micro_batch_size] for i in range(0, len(order), micro_batch_size)]
    batches: List[List[int]] = []
    for i in order:
        if batches and len(batches[-1]) < micro_batch_size and lengths[batches[-1][0]] == lengths[i]:
            batches[-1].append(i)
        else:
            batches.append([i])
    return batches


def shard_batches(batches: List[List[int]], rank: int, world: int) -> List[List[int]]:
    """This data-parallel rank's batches: every `world`-th one, as DistributedSampler deals samples round-robin.
    The batches themselves do not depend on the number of ranks, so results do not either."""
    return batches[rank::world]


def gather_records(local: Dict[int, Any], total: int) -> List[Any]:
    """All data-parallel ranks' {index: record} merged into one list in data order (on every rank)."""
    merged: Dict[int, Any] = {}
    for part in mpu.all_gather_object_data_parallel(local):
        merged.update(part)
    missing = [i for i in range(total) if i not in merged]
    if missing:
        raise RuntimeError(f"{len(missing)} record(s) missing after gathering (first: {missing[0]})")
    return [merged[i] for i in range(total)]
