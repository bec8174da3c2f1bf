"""Run by tests under torchrun: loads ckpt_tp2 with model-parallel size 2 and saves rank 0's gathered logits."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from initialize import initialize  # noqa: E402
from model import mpu  # noqa: E402
from model.errors import main_entry  # noqa: E402
from model.mpu import vocab_parallel_cross_entropy  # noqa: E402
from tests.helpers import CASES, case_inputs, fixture_cases, fixture_model_args, load_fixture_model  # noqa: E402
from tests.test_model_parity import _greedy_steps  # noqa: E402


@main_entry  # destroys the process group before exit, as the entry scripts do
def main(out):
    initialize(argv=fixture_model_args(mp=2))
    model = load_fixture_model(ckpt="ckpt_tp2", mp_rank=mpu.get_model_parallel_rank(), mp_size=2)
    cases = fixture_cases()
    result = {name: model(*case_inputs(cases[name]))[0].numpy() for name in CASES}
    generated, rows = _greedy_steps(model)
    result["gen_step_logits"], result["generated"] = rows.numpy(), np.array(generated)
    tokens, positions, mask = case_inputs(cases["mask_infill"])
    targets = torch.randint(20000, 150000, tokens.shape, generator=torch.Generator().manual_seed(0))
    shard = model(tokens, positions, mask, parallel_output=True)[0]
    assert shard.shape[-1] == 150528 // 2
    result["loss"], result["loss_targets"] = vocab_parallel_cross_entropy(shard, targets).numpy(), targets.numpy()
    if mpu.get_rank() == 0:
        np.savez(out, **result)


if __name__ == "__main__":
    main(sys.argv[1])
