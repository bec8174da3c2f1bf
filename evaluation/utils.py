"""Helpers shared by the evaluation package: rank-0 printing, data-file reading, batching and gathering.

Data files are read with bounded memory: a JSON line longer than MAX_LINE_CHARS characters, and a file read whole
(a JSON array, a plain-text document) larger than MAX_WHOLE_FILE_BYTES, stop with one line naming the file (and
line) before they are parsed. Paths that exist but cannot be read say so ("not readable"); folders are searched
with each real folder entered once, so symlink loops are followed once and a file reached twice counts once.
"""
import fnmatch
import glob
import json
import os
import stat
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

from model import mpu
from model.errors import UserError


def print_rank_0(*args, **kwargs) -> None:
    mpu.print_rank_0(*args, **kwargs)


def is_rank_0() -> bool:
    return mpu.get_rank() == 0


# ---- Data files ---------------------------------------------------------------------------------------------------

MAX_LINE_CHARS = 1 << 23  # one JSON line (8 Mi characters); its parse and tokenization stay well under 1 GB
MAX_WHOLE_FILE_BYTES = 1 << 26  # a JSON-array file or a plain-text document (64 MiB): split bigger ones


def open_data_file(path: str):
    """The file opened as UTF-8 text; one line saying whether it does not exist or cannot be read."""
    try:
        return open(path, encoding="utf-8")
    except (FileNotFoundError, NotADirectoryError):
        raise UserError(f"data file {path} does not exist") from None
    except PermissionError:
        raise UserError(f"data file {path} is not readable (permission denied)") from None
    except OSError as e:
        raise UserError(f"cannot read data file {path}: {e.strerror}") from None


def check_whole_file_size(f, path: str, what: str) -> None:
    size = os.fstat(f.fileno()).st_size
    if size > MAX_WHOLE_FILE_BYTES:
        raise UserError(f"{path}: {what} is read whole and this one is {size} bytes, more than the limit of "
                        f"{MAX_WHOLE_FILE_BYTES}; split it into several files (docs/evaluation-data.md)")


def check_readable_folder(path: str, what: str, hint: str = "") -> None:
    """One line when `path` does not exist, is not a folder, or cannot be listed."""
    try:
        if not stat.S_ISDIR(os.stat(path).st_mode):
            raise UserError(f"{what} {path} is not a folder{hint}")
        os.scandir(path).close()
    except (FileNotFoundError, NotADirectoryError):
        raise UserError(f"{what} {path} does not exist{hint}") from None
    except PermissionError:
        raise UserError(f"{what} {path} is not readable (permission denied)") from None


def match_files(root: str, pattern: str) -> List[str]:
    """Files under `root` matching the glob `pattern` (`**`: any number of folders; `*`, `?`, `[...]` within one
    name; names starting with '.' only when the pattern's part does), relative to `root`, sorted, as
    glob(recursive=True) finds them except that every real folder is entered once per pattern part (a symlink loop is
    followed once) and a file reached by several paths counts once (at its first path)."""
    parts = [p for p in pattern.replace(os.sep, "/").split("/") if p not in ("", ".")]
    found: Dict[str, str] = {}  # relative path -> real path
    entered = set()

    def entries(folder: str):
        try:
            with os.scandir(folder) as it:
                return sorted(it, key=lambda e: e.name)
        except PermissionError:
            raise UserError(f"data folder {folder} is not readable (permission denied)") from None
        except OSError:
            return []

    def matches(name: str, part: str) -> bool:
        if not glob.has_magic(part):
            return name == part
        return not (name.startswith(".") and not part.startswith(".")) and fnmatch.fnmatchcase(name, part)

    def visit(folder: str, rel: str, i: int) -> None:
        if (os.path.realpath(folder), i) in entered:
            return
        entered.add((os.path.realpath(folder), i))
        part, last = parts[i], i == len(parts) - 1
        for entry in entries(folder):
            path = os.path.join(rel, entry.name)
            if part == "**":
                if entry.name.startswith("."):
                    continue
                if last and entry.is_file():
                    found[path] = os.path.realpath(entry.path)
                elif entry.is_dir():
                    visit(entry.path, path, i)
            elif matches(entry.name, part):
                if last and entry.is_file():
                    found[path] = os.path.realpath(entry.path)
                elif not last and entry.is_dir():
                    visit(entry.path, path, i + 1)
        if part == "**" and not last:
            visit(folder, rel, i + 1)  # ** matching no folder

    if parts:
        visit(root, "", 0)
    firsts: Dict[str, str] = {}
    for rel in sorted(found):
        firsts.setdefault(found[rel], rel)
    return sorted(firsts.values())


def read_json_items(path: str, limit: Optional[int] = None) -> Iterator[Tuple[int, dict]]:
    """(line number, item) for each record of a data file.

    JSON lines, whatever the extension (MMLU's .json files are JSON lines); a file whose first character is `[` is
    read as one JSON array (line numbers are then item numbers). Blank lines are skipped. `limit` stops after that
    many items. A line that is not a JSON object, or longer than MAX_LINE_CHARS, stops with a one-line error naming
    the file and line.
    """
    f = open_data_file(path)
    count = 0
    with f:
        first = _first_char(f)
        if first == "[":
            check_whole_file_size(f, path, "a JSON-array file")
            numbered = enumerate(_load_array(f, path), 1)
        else:
            numbered = ((n, _parse_line(line, path, n)) for n, line in _bounded_lines(f, path) if line.strip())
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


def _bounded_lines(f, path: str) -> Iterator[Tuple[int, str]]:
    """(line number, line) of a text file, never holding more than MAX_LINE_CHARS + 1 characters of one line."""
    n = 0
    while True:
        line = f.readline(MAX_LINE_CHARS + 1)
        if not line:
            return
        n += 1
        if len(line) > MAX_LINE_CHARS and not line.endswith("\n"):
            raise UserError(f"{path}:{n}: the line is longer than {MAX_LINE_CHARS} characters, the limit for one "
                            f"data line (docs/evaluation-data.md); shorten or split that sample")
        yield n, line


def _parse_line(line: str, path: str, n: int) -> Any:
    try:
        return json.loads(line)
    except json.JSONDecodeError as e:
        raise UserError(f"{path}:{n}: invalid JSON: {e.msg} (column {e.colno})") from None


def get_tokenized_input(item: dict, key: str, tokenizer, where: str = "") -> Any:
    """item[key] if present (already token ids), else item[key + '_pretokenized'] tokenized (str or list of str)."""
    if key in item:
        value = item[key]
        if _is_id_list(value):
            check_token_ids(value, tokenizer, key, where)
            return value
        if isinstance(value, list) and all(_is_id_list(v) for v in value):
            for ids in value:
                check_token_ids(ids, tokenizer, key, where)
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


def check_token_ids(ids: Sequence[int], tokenizer, key: str, where: str) -> None:
    """Pre-tokenized ids must lie in the tokenizer's vocabulary (the model would index past its embedding)."""
    vocab = getattr(tokenizer, "vocab_size", None)
    if vocab is None:
        return
    bad = next((i for i in ids if not 0 <= i < vocab), None)
    if bad is not None:
        raise UserError(f"{where}field '{key}' holds token id {bad}, outside the vocabulary (ids 0..{vocab - 1})")


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
