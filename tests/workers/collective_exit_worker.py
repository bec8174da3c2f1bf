"""Run by tests under torchrun: initialise through initialize.py, run one collective and return at once.

An entry point shaped like this (the interpreter exits right after a gloo collective) died with "terminate called
without an active exception" (SIGABRT) in about half of the runs on a loaded machine before model.errors.main_entry
destroyed the process group at exit; see model/mpu.py destroy_model_parallel.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch.distributed as dist  # noqa: E402

from initialize import initialize  # noqa: E402
from model import mpu  # noqa: E402
from model.errors import main_entry  # noqa: E402
from tests.helpers import fixture_model_args  # noqa: E402


@main_entry
def main():
    initialize(argv=fixture_model_args(mp=2))
    gathered = [None, None]
    dist.all_gather_object(gathered, [mpu.get_rank()] * 100)
    assert gathered == [[0] * 100, [1] * 100]
    mpu.all_gather_object_data_parallel(mpu.get_model_parallel_rank())  # world 2, mp 2: dp size 1, a no-op


if __name__ == "__main__":
    main()
