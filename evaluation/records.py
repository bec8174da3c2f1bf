"""Saved predictions, results.json and resume: what an evaluation run keeps on disk under <output-path>/<task>/.

- predictions/<data file>.jsonl: one record per model input, in data order (what the metrics are computed from,
  so a resumed file gives exactly the numbers of a fresh run);
- resume.json: per data file, the key its records were made with (task class, config, checkpoint identity,
  --limit, the data file's size and mtime); a file is redone unless its key matches and its records are complete
  and consistent with the data (BaseTask.records_problem: count, indices, fields; else one warning line);
- results.json: per file, per group and overall metrics.
Every file is written atomically (a temporary file, then a rename): an interrupted run leaves no half-written file.
"""
import dataclasses
import hashlib
import json
import os
import sys
from typing import Any, Dict, List, Optional

import numpy as np

from evaluation.configs import BaseConfig, TaskType

RECORDS_VERSION = 1


def jsonable(value):
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, (np.floating, np.integer, np.bool_)):
        return value.item()
    if isinstance(value, TaskType):
        return value.value
    return value


def config_dict(config: BaseConfig) -> Dict[str, Any]:
    return jsonable(dataclasses.asdict(config))


def write_atomic(path: str, text: str) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


class RecordStore:
    """The output folder of one task (None: nothing is saved and nothing resumed)."""

    def __init__(self, task_dir: Optional[str]):
        self.task_dir = task_dir

    def predictions_path(self, file: str) -> str:
        return os.path.join(self.task_dir, "predictions", file + ".jsonl")

    def resume_key(self, identity: Dict[str, Any], data_path: str) -> Optional[str]:
        """The key of records made for `identity` (task class, config, checkpoint, limit, file) and the data file
        as it is now; None when nothing is saved."""
        if self.task_dir is None:
            return None
        st = os.stat(data_path)
        identity = {"version": RECORDS_VERSION, **identity, "size": st.st_size, "mtime_ns": st.st_mtime_ns}
        return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()

    def _state_path(self) -> str:
        return os.path.join(self.task_dir, "resume.json")

    def _read_state(self) -> Dict[str, str]:
        try:
            with open(self._state_path(), encoding="utf-8") as f:
                state = json.load(f)
            return state if isinstance(state, dict) else {}
        except (OSError, ValueError):
            return {}

    def load(self, file: str, key: Optional[str]) -> Optional[List[dict]]:
        """The saved records of `file` when they were made with the same key, else None (a file that cannot be
        read back gets one warning line). Whether they are complete is the task's check (records_problem)."""
        if key is None or self._read_state().get(file) != key:
            return None
        path = self.predictions_path(file)
        try:
            with open(path, encoding="utf-8") as f:
                return [json.loads(line) for line in f if line.strip()]
        except (OSError, ValueError) as e:
            reason = e.strerror if isinstance(e, OSError) else "not valid JSON lines"
            print(f"warning: {path}: cannot be read back ({reason}); recomputing {file}", file=sys.stderr,
                  flush=True)
            return None

    def save(self, file: str, key: Optional[str], records: List[dict]) -> None:
        if key is None:
            return
        path = self.predictions_path(file)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        write_atomic(path, "".join(json.dumps(jsonable(r), ensure_ascii=False) + "\n" for r in records))
        state = self._read_state()
        state[file] = key
        write_atomic(self._state_path(), json.dumps(state, indent=1, sort_keys=True) + "\n")

    def write_results(self, results: Dict[str, Any]) -> None:
        if self.task_dir is None:
            return
        os.makedirs(self.task_dir, exist_ok=True)
        write_atomic(os.path.join(self.task_dir, "results.json"), json.dumps(results, indent=2) + "\n")
