"""Every entry point destroys torch.distributed before the interpreter exits (model/errors.py main_entry).

Without it, a gloo worker thread that drops a finished collective's tensors after the interpreter has started to
finalise is ended by Python inside a C++ destructor: "terminate called without an active exception" (SIGABRT), at
random, most often on a loaded machine (tests/test_generation_tp.py failed this way once in a full run).
"""
import datetime

import pytest
import torch.distributed as dist

from model import mpu
from model.errors import UserError, main_entry
from tests.helpers import ROOT, torchrun


@pytest.fixture
def one_rank_group(tmp_path):
    """A real one-process gloo process group in this process, with mpu's groups, removed again whatever happens."""
    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1, timeout=datetime.timedelta(seconds=60))
    mpu.initialize_model_parallel(1)
    yield
    if dist.is_initialized():
        dist.destroy_process_group()
    mpu.initialize_model_parallel(1)


def test_main_entry_destroys_the_process_group_when_main_returns(one_rank_group):
    @main_entry
    def main():
        assert dist.is_initialized() and mpu.get_model_parallel_group() is not None
        return "done"

    assert main() == "done"
    assert not dist.is_initialized()
    assert mpu.get_model_parallel_group() is None and mpu.get_data_parallel_group() is None


@pytest.mark.parametrize("error, code", [(UserError("bad input"), 2), (KeyboardInterrupt(), 130)])
def test_main_entry_destroys_the_process_group_when_main_fails(one_rank_group, capsys, error, code):
    @main_entry
    def main():
        raise error

    with pytest.raises(SystemExit) as exit_info:
        main()
    assert exit_info.value.code == code
    assert not dist.is_initialized() and mpu.get_model_parallel_group() is None


def test_destroy_model_parallel_without_distributed_is_a_no_op():
    assert not dist.is_initialized()
    mpu.destroy_model_parallel()
    mpu.destroy_model_parallel(barrier=False)
    assert mpu.get_model_parallel_world_size() == 1


def test_processes_exiting_right_after_a_collective_end_cleanly():
    """Three torchrun launches of the riskiest shape: two ranks exit immediately after a gloo collective."""
    for _ in range(3):
        proc = torchrun(ROOT / "tests" / "workers" / "collective_exit_worker.py", [], nprocs=2, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert "terminate called" not in proc.stderr
