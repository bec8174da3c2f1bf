"""The model reproduces SwissArmyTransformer 0.2.12's logits on the sat-parity-tiny fixture."""
import numpy as np
import pytest
import torch

from tests.helpers import (CASES, ROOT, case_inputs, fixture_cases, load_fixture_model, logits_error,
                           reference, torchrun)

RUNS = [  # (fixture run, dtype, exact RoPE, attention kernel, tolerance)
    ("mp1_fp32", torch.float32, False, "plain", 2e-4),
    ("mp1_fp32_exact_rope", torch.float32, True, "plain", 2e-4),
    ("mp1_fp16", torch.float16, False, "plain", 0.1),
    ("mp1_fp32", torch.float32, False, "sdpa", 2e-4),
]


@pytest.mark.parametrize("run,dtype,exact,attention,tol", RUNS)
def test_forward_matches_sat(run, dtype, exact, attention, tol):
    model = load_fixture_model(dtype, exact, attention)
    ref, cases = reference(run), fixture_cases()
    for name in CASES:
        logits = model(*case_inputs(cases[name]))[0]
        assert tuple(logits.shape) == tuple(cases[name]["logits_shape"])
        err = logits_error(logits, ref, name)
        assert err <= tol, f"{run} {name}: max |diff| {err:.3g} > {tol}"
        assert np.array_equal(logits.float().argmax(-1).numpy(), ref[f"{name}.argmax"]) or dtype != torch.float32


def test_legacy_and_exact_rope_differ():
    """The two RoPE modes are really different (the fixture's runs differ by up to ~0.009)."""
    cases = fixture_cases()
    legacy = load_fixture_model(exact_rope=False)(*case_inputs(cases["multichoice_long"]))[0]
    exact = load_fixture_model(exact_rope=True)(*case_inputs(cases["multichoice_long"]))[0]
    assert (legacy - exact).abs().max().item() > 1e-3


def _greedy_steps(model, steps=8, use_cache=True):
    """The fixture's `gen` case: argmax over text ids [20000, 150000) with SAT's generate.py mask."""
    from model import KVCache
    prompt = fixture_cases()["gen"]["prompt"]
    ctx = len(prompt)
    total = ctx + steps
    allowed = torch.tril(torch.ones(total, total))
    allowed[:, : ctx - 1] = 1
    mask = (allowed < 0.5).view(1, 1, total, total)
    positions = torch.arange(total).view(1, -1)
    tokens = torch.tensor([prompt])
    cache = KVCache(model, 1, total) if use_cache else None
    rows, generated = [], []
    for step in range(steps):
        n = tokens.shape[1]
        if use_cache:
            start = cache.length
            logits = model.forward_with_cache(tokens[:, start:], positions[:, start:n], mask[:, :, start:n, :n], cache)
        else:
            logits = model(tokens, positions[:, :n], mask[:, :, :n, :n])[0]
        row = logits[0, -1].float()
        rows.append(row)
        nxt = int(row[20000:150000].argmax()) + 20000
        generated.append(nxt)
        tokens = torch.cat([tokens, torch.tensor([[nxt]])], dim=1)
    return generated, torch.stack(rows)


@pytest.mark.parametrize("run,dtype,exact,tol", [("mp1_fp32", torch.float32, False, 2e-4),
                                                 ("mp1_fp32_exact_rope", torch.float32, True, 2e-4),
                                                 ("mp1_fp16", torch.float16, False, 0.1)])
def test_kv_cache_decoding_matches_sat(run, dtype, exact, tol):
    model = load_fixture_model(dtype, exact)
    ref = reference(run)
    generated, rows = _greedy_steps(model)
    assert generated == fixture_cases()["gen"]["generated"]
    assert logits_error(rows, ref, "gen_step_logits") <= tol
    _, full_rows = _greedy_steps(model, use_cache=False)
    assert logits_error(full_rows, ref, "gen_full_forward_logits") <= tol


def test_kv_cache_equals_full_recomputation():
    model = load_fixture_model()
    _, cached = _greedy_steps(model)
    _, full = _greedy_steps(model, use_cache=False)
    assert (cached - full).abs().max().item() < 1e-4


def test_sat_mems_api_matches_cache():
    """The original's `mems` concatenation API gives the same step logits as the preallocated cache."""
    from model.glm import update_mems
    model = load_fixture_model()
    case = fixture_cases()["gmask_prompt"]
    tokens, positions, mask = case_inputs(case)
    logits, *per_layer = model(tokens[:, :-1], positions[:, :-1], mask[:, :, :-1, :-1])
    assert per_layer[0]["mem_kv"].shape == (1, 10, 128)
    mems = update_mems(per_layer, None)
    step = model(tokens[:, -1:], positions[:, -1:], mask[:, :, -1:, :], mems=mems)[0]
    full = model(tokens, positions, mask)[0]
    assert (step[0, -1] - full[0, -1]).abs().max().item() < 1e-4


def test_bf16_stays_close():
    """bf16 (the fast CPU dtype) against the fp32 reference: the error is reported, and it must stay small."""
    model = load_fixture_model(torch.bfloat16, attention="auto")
    ref, cases = reference("mp1_fp32"), fixture_cases()
    errs = {name: logits_error(model(*case_inputs(cases[name]))[0], ref, name) for name in CASES}
    print("bf16 max |logits - SAT fp32|:", {k: round(v, 4) for k, v in errs.items()})
    assert max(errs.values()) < 0.6  # |logits| ~ 60, bf16 has 8 mantissa bits


def test_parallel_output_and_vocab_parallel_loss():
    from model.mpu import vocab_parallel_cross_entropy
    model = load_fixture_model()
    tokens, positions, mask = case_inputs(fixture_cases()["mask_infill"])
    shard = model(tokens, positions, mask, parallel_output=True)[0]
    full = model(tokens, positions, mask)[0]
    assert torch.equal(shard, full)  # one rank: its shard is the whole vocabulary
    targets = torch.randint(20000, 150000, tokens.shape)
    expected = torch.nn.functional.cross_entropy(full.flatten(0, 1), targets.flatten(), reduction="none")
    assert torch.allclose(vocab_parallel_cross_entropy(shard, targets).flatten(), expected, atol=1e-5)


def test_tensor_parallel_two_processes_match_sat(tmp_path):
    """ckpt_tp2 run as 2 real gloo processes reproduces mp2_fp32 (and the vocab-parallel loss)."""
    out = tmp_path / "tp2.npz"
    proc = torchrun(ROOT / "tests" / "workers" / "tp_forward_worker.py", [out], nprocs=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = np.load(out)
    ref = reference("mp2_fp32")
    for name in CASES:
        assert logits_error(torch.tensor(got[name]), ref, name) <= 2e-4, name
    assert logits_error(torch.tensor(got["gen_step_logits"]), ref, "gen_step_logits") <= 2e-4
    assert list(got["generated"]) == fixture_cases()["gen"]["generated"]
    single = load_fixture_model()
    tokens, positions, mask = case_inputs(fixture_cases()["mask_infill"])
    full = single(tokens, positions, mask)[0]
    targets = torch.tensor(got["loss_targets"])
    expected = torch.nn.functional.cross_entropy(full.flatten(0, 1), targets.flatten(), reduction="none")
    assert torch.allclose(torch.tensor(got["loss"]).flatten(), expected, atol=1e-4)
