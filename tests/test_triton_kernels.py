"""The Triton weight-only matmul kernels (kernels/triton_matmul.py) against the exact reference: dequantize (q ·
scale in float64), then a float64 matmul. Without a GPU they run under Triton's interpreter (TRITON_INTERPRET=1,
set here before triton is imported) on CPU tensors, on tiny shapes covering tails in N and K, odd K (INT8), an odd
number of packed bytes per row (INT4), split-K and both kernels."""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

triton = pytest.importorskip("triton")

from kernels import triton_matmul as tm  # noqa: E402
from quantization import matmul  # noqa: E402
from quantization.functional import dequantize, quantize_weight  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float16, torch.bfloat16]
# (rows, N, K) per bits: N and K are never multiples of the tiles below; INT8 K odd, INT4 K/2 odd
SHAPES = {8: [(1, 40, 75), (3, 33, 131), (9, 50, 97), (20, 70, 139)],
          4: [(1, 40, 74), (3, 33, 130), (9, 50, 98), (20, 70, 138)]}
CONFIGS = {  # small tiles so the interpreter stays fast; split_k > 1 covers split-K (fp32 partials summed)
    "gemv": tm.Config("gemv", 4, 16, 32, split_k=1),
    "gemv_split3": tm.Config("gemv", 4, 16, 32, split_k=3),
    "mm": tm.Config("mm", 16, 32, 64, split_k=1),
    "mm_split2": tm.Config("mm", 16, 16, 32, split_k=2),
}


@pytest.fixture(autouse=True, scope="module")
def interpreter_only_here():
    """Leave no interpreter mode behind for later test modules of the same session."""
    yield
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") == "1":
        del os.environ["TRITON_INTERPRET"]


def _case(rows, n, k, bits, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    w = (torch.randn(n, k, generator=gen) * k ** -0.5).half()
    q, scale = quantize_weight(w, bits)
    x = torch.randn(rows, k, generator=gen).to(dtype)
    ref = x.double() @ dequantize(q, scale, bits, torch.float64).T
    return x.to(DEVICE), q.to(DEVICE), scale.to(DEVICE), ref


def _assert_close(y, ref, dtype):
    # One rounding of the fp32 result to the output dtype (the interpreter truncates to bf16: 2^-7), plus fp32
    # accumulation slack.
    rel = 2 ** -10 if dtype == torch.float16 else 2 ** -7
    err = (y.double().cpu() - ref).abs()
    assert (err <= rel * ref.abs() + 1e-5 * ref.abs().max()).all(), err.max()


CASES = [(bits, shape, config) for bits in (8, 4) for shape in SHAPES[bits] for config in CONFIGS
         if CONFIGS[config].kernel == "mm" or shape[0] <= CONFIGS[config].block_m]  # gemv: at most block_m rows


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bits,shape,config", CASES)
def test_kernel_matches_dequantize_reference(bits, shape, config, dtype):
    rows, n, k = shape
    cfg = CONFIGS[config]
    x, q, scale, ref = _case(rows, n, k, bits, dtype)
    y = tm.weight_only_matmul(x, q, scale, bits, cfg)
    assert y.dtype == dtype and y.shape == (rows, n)
    _assert_close(y, ref, dtype)


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("rows", [1, 3, 9, 20])
def test_default_configs_and_leading_dims(bits, rows):
    """The configs choose_config picks (gemv / 16-row tiles / prefill tiles, split-K as it decides), x [2, rows, K]."""
    n, k = 48, 160
    x, q, scale, ref = _case(2 * rows, n, k, bits, torch.float16, seed=rows)
    y = tm.weight_only_matmul(x.view(2, rows, k), q, scale, bits)
    assert y.shape == (2, rows, n)
    _assert_close(y.reshape(2 * rows, n), ref, torch.float16)


def test_choose_config_covers_decode_and_prefill():
    sms = 132
    one_row = tm.choose_config(1, 12288, 12288, 4, sms)
    assert one_row.kernel == "gemv" and one_row.block_m == 1
    eight = tm.choose_config(8, 12288, 12288, 4, sms)
    assert (eight.kernel, eight.block_m) == ("mm", 16)
    for cfg, n in ((one_row, 12288), (eight, 12288)):  # decode: split-K up to about 8 programs per SM
        programs = -(-n // cfg.block_n) * cfg.split_k
        assert cfg.split_k > 1 and programs >= tm.DECODE_PROGRAMS_PER_SM * sms - -(-n // cfg.block_n)
    assert tm.choose_config(1, 65536, 12288, 4, sms).split_k == 1  # 2048 programs already
    prefill = tm.choose_config(2048, 36864, 12288, 8, sms)
    assert (prefill.block_m, prefill.split_k) == (128, 1)


def test_split_k_never_exceeds_k_blocks():
    assert tm.split_k_for(1, 64, 64, 132) == 1
    assert tm.split_k_for(1, 10 ** 6, 64, 132) == tm.MAX_SPLIT_K
    assert tm.split_k_for(10 ** 4, 10 ** 6, 64, 132) == 1


@pytest.mark.parametrize("bits", [8, 4])
def test_fp16_close_to_the_original_dequantized_gemm(bits):
    """The fused result against the original's arithmetic (fp16 weight round(q·scale), fp16 GEMM)."""
    x, q, scale, _ = _case(5, 64, 96, bits, torch.float16, seed=3)
    y = tm.weight_only_matmul(x, q, scale, bits, CONFIGS["mm"])
    original = (x.cpu().float() @ dequantize(q.cpu(), scale.cpu(), bits, torch.float16).float().T)
    assert torch.allclose(y.cpu().float(), original, rtol=2e-3, atol=2e-3 * original.abs().max().item())


@pytest.mark.parametrize("bits", [8, 4])
def test_weight_only_linear_dispatches_to_triton(bits, monkeypatch):
    """quantization.matmul routes CUDA fp16/bf16 activations on the stored layout to the fused kernels (the device
    check is patched on a machine without a GPU); fp32, CPU and the CPU int4 layout do not go there."""
    x, q, scale, ref = _case(2, 40, 64, bits, torch.bfloat16, seed=5)
    calls = []
    real = tm.weight_only_matmul
    monkeypatch.setattr(tm, "weight_only_matmul", lambda *a, **k: calls.append(1) or real(*a, **k))
    monkeypatch.setattr(matmul, "_triton_device", lambda t: True)
    y = matmul.weight_only_linear(x, q, scale, bits)
    assert calls == [1]
    _assert_close(y, ref, torch.bfloat16)
    assert not matmul.uses_triton(x.float(), q, scale, bits, matmul.ORIGINAL)
    assert not matmul.uses_triton(x, q, scale, bits, matmul.CPU_INT4)
    monkeypatch.setattr(matmul, "TRITON_KERNELS", False)
    assert not matmul.uses_triton(x, q, scale, bits, matmul.ORIGINAL)


def test_cpu_tensors_never_dispatch_to_triton():
    x, q, scale, _ = _case(1, 40, 64, 8, torch.bfloat16)
    assert DEVICE == "cuda" or not matmul.uses_triton(x, q, scale, 8, matmul.ORIGINAL)


def test_supports_checks_shapes():
    x = torch.zeros(1, 64, dtype=torch.float16)
    q8, q4, scale = torch.zeros(8, 64, dtype=torch.int8), torch.zeros(8, 32, dtype=torch.int8), torch.zeros(8).half()
    assert tm.supports(x, q8, scale, 8) and tm.supports(x, q4, scale, 4)
    assert not tm.supports(x, q4, scale, 8) and not tm.supports(x.float(), q8, scale, 8)
    assert not tm.supports(x, q8, scale[:4], 8)


OVERFLOW_SCRIPT = """
import torch
from kernels import triton_matmul as tm
from quantization.functional import dequantize, quantize_weight
ROW = 1 << 30  # fits int32; x's row 2 and the weight's rows 2, 3 start at 2^31 elements and beyond
m, n, k = 3, 4, 64
gen = torch.Generator().manual_seed(0)
x_small = torch.randn(m, k, generator=gen).half()
x = torch.empty((m - 1) * ROW + k, dtype=torch.float16).as_strided((m, k), (ROW, 1))  # address space; 3 rows touched
x.copy_(x_small)
for bits in (8, 4):
    q, scale = quantize_weight((torch.randn(n, k, generator=gen) * k ** -0.5).half(), bits)
    w = torch.empty((n - 1) * ROW + q.shape[1], dtype=torch.int8).as_strided(q.shape, (ROW, 1))
    w.copy_(q)
    ref = x_small.double() @ dequantize(q, scale, bits, torch.float64).T
    for config in (tm.Config("gemv", 4, 16, 64), tm.Config("mm", 16, 16, 64)):
        out = torch.zeros(m, n, dtype=torch.float16)
        tm._launch(config, x, w, scale, out, m, n, k, k, 1, bits)
        assert ((out.double() - ref).abs().max() / ref.abs().max()).item() < 2e-3, (bits, config)
print("ok")
"""


def test_row_offsets_past_two_to_the_31():
    """Row starts past 2^31 elements (rows x N or rows x K >= 2^31 at real sizes) are computed in int64: rows of x
    and of the weight 2^30 elements apart, in a sparse address space of 7 GiB of which a few pages are touched. With
    int32 offsets these rows wrap to negative addresses (a crash). Under the interpreter, in its own process."""
    import subprocess
    import sys
    from tests.helpers import ROOT
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, "-c", OVERFLOW_SCRIPT], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", (proc.returncode, proc.stderr[-2000:])


AOT_SCRIPT = """
import sys
from kernels import triton_matmul as tm
configs = {tm.choose_config(rows, 12288, 32768, 4, 132) for rows in (1, 2, 4, 8, 64, 2048)}
for config in sorted(configs, key=repr):
    for bits in (8, 4):
        for x, out in (("fp16", None), ("bf16", None), ("fp16", "fp32")):
            compiled = tm.compile_for_gpu(config, bits, x, out)
            assert ("wgmma" in compiled.asm["ptx"]) or config.kernel == "gemv" or config.block_m < 64, config
print("compiled", len(configs))
"""


def test_kernels_compile_for_sm90_without_a_gpu():
    """The default configs compile for H100/H200 (sm_90) with this triton, fp16/bf16 in, fp32 split-K partials
    out; prefill tiles use Hopper's wgmma. In a fresh process: the interpreter mode of this module has no compiler."""
    import subprocess
    import sys
    from tests.helpers import ROOT
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", AOT_SCRIPT], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    if proc.returncode != 0 and "ptxas" in proc.stderr and "not found" in proc.stderr:
        pytest.skip("triton's ptxas is not available here")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().startswith("compiled")
