"""kernels/cpu.py's ops against fp32 references on random data (tails, odd sizes, masks, every scale dtype), on
every kernel tier this CPU runs, and how the tier is chosen.

Only one tier loads per process: the op tests run here on the tier this process got (the best one, or the one
GLM_CPU_KERNELS names), and `test_other_tier` reruns this file in a subprocess under GLM_CPU_KERNELS=<tier> for each
other tier the CPU supports (built once, cached). Op tests are skipped where no tier can be built.
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from kernels import build, cpu

ROOT = Path(__file__).resolve().parent.parent
needs_kernels = pytest.mark.skipif(not cpu.available(), reason="fast CPU kernels unavailable on this machine")

GEN = torch.Generator().manual_seed(0)


def randn(*shape, dtype=torch.float32):
    return torch.randn(*shape, generator=GEN).to(dtype)


def assert_close_bf16(out, ref, what, rtol=1e-2):
    """out (bf16 kernel output) within bf16 rounding of the fp32 reference, relative to the output's scale."""
    out, ref = out.float(), ref.float()
    scale = ref.abs().amax(dim=-1, keepdim=True).clamp_min(1e-6)
    err = ((out - ref).abs() / scale).max().item()
    assert err <= rtol, f"{what}: max error {err:.3g} of the row scale > {rtol}"


# ---------------------------------------------------------------------------------------------------------------
# Matrix x vector

@needs_kernels
@pytest.mark.parametrize("m", [1, 2, 3, 8, 11, 16])
@pytest.mark.parametrize("k", [64, 100, 1536])
def test_gemv_bf16(m, k):
    n = 67
    x, w, b = randn(m, k, dtype=torch.bfloat16), randn(n, k, dtype=torch.bfloat16), randn(n, dtype=torch.bfloat16)
    ref = x.float() @ w.float().t() + b.float()
    out = cpu.gemv_bf16(x, w, b)
    assert out.dtype == torch.bfloat16 and out.shape == (m, n)
    assert_close_bf16(out, ref, f"gemv_bf16 m={m} k={k}")
    assert_close_bf16(cpu.gemv_bf16(x.view(m, 1, k), w).view(m, n), ref - b.float(), "no bias, 3-D x")


@needs_kernels
@pytest.mark.parametrize("m", [1, 2, 3, 8, 16])  # 1-2 rows use the nibble decoder, more the conversion one
@pytest.mark.parametrize("k", [64, 100, 4096])
@pytest.mark.parametrize("scale_dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_gemv_int8(m, k, scale_dtype):
    n = 45
    x = randn(m, k, dtype=torch.bfloat16)
    q = torch.randint(-128, 128, (n, k), generator=GEN, dtype=torch.int8)
    q[0, :] = -128  # extremes
    q[1, :] = 127
    scale = (torch.rand(n, generator=GEN) * 0.02 + 1e-3).to(scale_dtype)
    b = randn(n, dtype=torch.bfloat16)
    ref = x.float() @ (q.float() * scale.float()[:, None]).t() + b.float()
    assert_close_bf16(cpu.gemv_int8(x, q, scale, b), ref, f"gemv_int8 m={m} k={k}")


@needs_kernels
@pytest.mark.parametrize("m", [1, 2, 5, 16])
@pytest.mark.parametrize("k", [64, 100, 4096])
def test_gemv_int4(m, k):
    from quantization.functional import pack_int4, unpack_int4
    n = 37
    x = randn(m, k, dtype=torch.bfloat16)
    q = torch.randint(-8, 8, (n, k), generator=GEN, dtype=torch.int8)
    q[0, :] = -8
    q[1, :] = 7
    packed = pack_int4(q)
    assert torch.equal(unpack_int4(packed), q)
    scale = (torch.rand(n, generator=GEN) * 0.1 + 1e-3).half()
    ref = x.float() @ (q.float() * scale.float()[:, None]).t()
    assert_close_bf16(cpu.gemv_int4(x, packed, scale), ref, f"gemv_int4 m={m} k={k}")


@needs_kernels
@pytest.mark.parametrize("bits", [8, 4])
def test_gemv_integer_weights_activation_outliers_and_non_finite(bits):
    """The avx2 / avx512 tiers round x to 15-bit integers per span of columns for INT8 and INT4: a span holding an
    outlier (GLM's activations have them) keeps its small values to 2^-14 of the outlier, other spans keep full
    precision; a non-finite x gives a non-finite output, as in the fp32 path."""
    from quantization.functional import pack_int4
    k, n = 1000, 29
    x = randn(3, k) * 1e-2
    x[0, 5] = 300.0  # one outlier in the first block of row 0
    x[1, 700:] *= 1e-4  # tiny values in the last blocks of row 1
    x = x.bfloat16()
    q = torch.randint(-2 ** (bits - 1), 2 ** (bits - 1), (n, k), generator=GEN, dtype=torch.int8)
    scale = (torch.rand(n, generator=GEN) * 0.1 + 1e-3).half()
    w = q.float() * scale.float()[:, None]
    gemv = (lambda x_: cpu.gemv_int8(x_, q, scale)) if bits == 8 else (lambda x_: cpu.gemv_int4(x_, pack_int4(q), scale))
    ref = x.float() @ w.t()
    assert_close_bf16(gemv(x).float(), ref, f"gemv_int{bits} with outliers")
    tail = x.float()[1:2, 700:] @ w[:, 700:].t()  # the tiny blocks alone, through the kernel too
    x_tail = torch.zeros_like(x[1:2])
    x_tail[:, 700:] = x[1:2, 700:]
    assert_close_bf16(gemv(x_tail), tail, f"gemv_int{bits} tiny blocks")
    x[2, 999] = float("nan")
    assert not gemv(x)[2].float().isfinite().any()


@needs_kernels
@pytest.mark.parametrize("bits", [8, 4])
def test_gemv_integer_weights_error_bound(bits):
    """Every tier's INT8 / INT4 output is within the documented error of the exact product: one bf16 rounding of the
    output plus, on the FMA tiers, x rounded to 2^-14 of the largest |x| in its span of at most 512 columns
    (docs/performance.md); and x of subnormal size gives a finite output near 0, not garbage."""
    from quantization.functional import pack_int4
    k, n, span = 1536, 64, 512
    x = randn(4, k)
    x[0, 3], x[1, 700] = 1000.0, -250.0  # outliers, GLM-style, in different spans
    x[2] *= 1e-3
    x = x.bfloat16()
    q = torch.randint(-2 ** (bits - 1), 2 ** (bits - 1), (n, k), generator=GEN, dtype=torch.int8)
    scale = (torch.rand(n, generator=GEN) * 0.1 + 1e-3).half()
    w = q.double() * scale.double()[:, None]
    out = (cpu.gemv_int8(x, q, scale) if bits == 8 else cpu.gemv_int4(x, pack_int4(q), scale)).double()
    ref = x.double() @ w.t()
    span_max = x.double().abs().reshape(4, k // span, span).amax(-1).repeat_interleave(span, dim=1)
    bound = 2.0 ** -8 * ref.abs() + 2.0 ** -14 * (span_max @ w.abs().t()) + 1e-30
    assert ((out - ref).abs() <= bound).all(), f"max error / bound {((out - ref).abs() / bound).max():.3g}"
    tiny = torch.full((1, k), 1e-37).bfloat16()  # 2^(14 - e) overflows fp32 for such spans unless capped
    out = cpu.gemv_int8(tiny, q, scale) if bits == 8 else cpu.gemv_int4(tiny, pack_int4(q), scale)
    assert out.float().isfinite().all() and out.float().abs().max() < 1e-30


@needs_kernels
def test_linear_fallback_and_weight_only_routing(monkeypatch):
    """linear() leaves inputs the kernels do not take (fp32, more than MAX_GEMV_ROWS rows) to F.linear;
    quantization.weight_only_linear sends decode-sized bf16 inputs in the stored layout to the GEMV kernels."""
    from quantization import weight_only_linear
    x32, w = randn(3, 64), randn(10, 64)
    assert torch.equal(cpu.linear(x32, w), F.linear(x32, w))
    xb = randn(cpu.MAX_GEMV_ROWS + 1, 64, dtype=torch.bfloat16)
    wb = w.bfloat16()
    assert torch.equal(cpu.linear(xb, wb), F.linear(xb, wb))
    q = torch.randint(-8, 8, (10, 64), generator=GEN, dtype=torch.int8)
    scale = torch.rand(10, generator=GEN).half()
    calls = []
    monkeypatch.setattr(cpu, "gemv_int8", lambda *a: calls.append(8) or torch.zeros(1))
    monkeypatch.setattr(cpu, "gemv_int4", lambda *a: calls.append(4) or torch.zeros(1))
    weight_only_linear(randn(2, 64, dtype=torch.bfloat16), q, scale, 8)
    weight_only_linear(randn(2, 64, dtype=torch.bfloat16), q[:, ::2].contiguous(), scale, 4)
    weight_only_linear(x32, q, scale, 8)  # fp32: dequantize + matmul
    weight_only_linear(xb, q, scale, 8)  # too many rows for a GEMV
    assert calls == [8, 4]


@needs_kernels
def test_read_bandwidth_probe_sums():
    x = torch.rand(1_000_003)
    assert cpu.read_bandwidth_probe(x) == pytest.approx(float(x.double().sum()), rel=1e-5)


POOL_CHECK = """
import torch
from kernels import cpu
assert cpu.tier() == {tier!r}, cpu.tier()
torch.set_num_threads(4)
print(torch.ops.glm_cpu.pool_check(20000, 9))
# across the pool's 32-bit call counter wrap-around (billions of calls in a long-running server)
print(torch.ops.glm_cpu.pool_check(200, 9, 2 ** 32 - 101))
# helpers sent to sleep between calls (weight offload, before waiting for a read) still take every chunk once
print(sum(torch.ops.glm_cpu.pool_rest() or torch.ops.glm_cpu.pool_check(3, 9) for _ in range(2000)))
# idle helpers sleep: CPU time over a second with no call (they used to wake and spin every 50 ms: 28 % of a core)
import resource, time
time.sleep(0.3)
used = -sum(resource.getrusage(resource.RUSAGE_SELF)[:2])
time.sleep(1.0)
print("idle", round(used + sum(resource.getrusage(resource.RUSAGE_SELF)[:2]), 3))
"""


@needs_kernels
def test_thread_pool_runs_every_chunk_once_before_returning():
    """Calls of varying chunk counts back to back (a call often has more chunks than the one before: the case where a
    helper still leaving the previous call could claim an index of the new one) on more threads than cores.
    In a subprocess on this process's tier: it starts more helper threads than this process has, and they outlive
    the calls."""
    proc = _run(["-c", POOL_CHECK.format(tier=cpu.tier())], cpu.tier(), timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = proc.stdout.split()
    assert out[:3] == ["0", "0", "0"], proc.stdout + proc.stderr[-2000:]
    assert out[3] == "idle" and float(out[4]) < 0.1, proc.stdout  # CPU seconds in one idle second, 3 helpers


@needs_kernels
def test_fp16_to_bf16_equals_pytorchs_conversion_for_every_value():
    """Every fp16 bit pattern (normals, subnormals, ±0, ±inf) converts as `bf16.copy_(fp16)` does (NaN stays NaN),
    at lengths with and without a vector tail; other dtypes fall back to copy_."""
    src = torch.arange(-2 ** 15, 2 ** 15, dtype=torch.int32).to(torch.int16).view(torch.float16)
    for n in (65536, 65536 - 37, 5):
        dst = torch.empty(n, dtype=torch.bfloat16)
        cpu.fp16_to_bf16_(dst, src[-n:])
        ref, nan = src[-n:].to(torch.bfloat16), src[-n:].isnan()
        assert torch.equal(dst.view(torch.int16)[~nan], ref.view(torch.int16)[~nan]), n
        assert dst[nan].isnan().all()
    out = torch.empty(7)
    cpu.fp16_to_bf16_(out, src[:7])
    assert torch.equal(out, src[:7].float())


def test_first_use_from_several_threads_loads_the_kernels_once():
    """Weight offload's converter thread may ask for the kernels while the main thread does: one load, one line."""
    code = ("import threading; from kernels import cpu; got = []\n"
            "ts = [threading.Thread(target=lambda: got.append(cpu.tier())) for _ in range(4)]\n"
            "[t.start() for t in ts]; [t.join() for t in ts]; print(sorted(set(got)))")
    proc = _run(["-c", code], cpu.tier(), timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == repr([cpu.tier()])
    assert proc.stderr.count("> CPU kernels:") == 1, proc.stderr[-2000:]


# ---------------------------------------------------------------------------------------------------------------
# Fused decode helpers

def rope_reference(x, cos, sin):
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


@needs_kernels
@pytest.mark.parametrize("d", [16, 128])
def test_decode_attention(d):
    b, heads, t, pos = 3, 4, 40, 29
    qkv = randn(b, 1, heads * 3 * d, dtype=torch.bfloat16)
    angles = randn(b, 1, 1, d // 2) * 3
    cos = torch.cat([angles.cos(), angles.cos()], -1).bfloat16()
    sin = torch.cat([angles.sin(), angles.sin()], -1).bfloat16()
    k_cache, v_cache = randn(b, heads, t, d, dtype=torch.bfloat16), randn(b, heads, t, d, dtype=torch.bfloat16)
    k_before, v_before = k_cache.clone(), v_cache.clone()
    mask = torch.zeros(b, 1, 1, pos + 1, dtype=torch.bool)
    mask[1, ..., 3:9] = True  # some cached positions hidden
    mask[2] = True  # everything hidden: attends uniformly, as SAT's finite mask value does
    out = torch.ops.glm_cpu.decode_attention(qkv, cos, sin, k_cache, v_cache, pos, mask.view(b, -1))

    q, k, v = qkv.float().view(b, 1, heads, 3 * d).transpose(1, 2).chunk(3, dim=-1)
    q, k = rope_reference(q, cos.float(), sin.float()), rope_reference(k, cos.float(), sin.float())
    keys = torch.cat([k_before.float()[:, :, :pos], k], dim=2)
    values = torch.cat([v_before.float()[:, :, :pos], v], dim=2)
    scores = (q @ keys.transpose(-1, -2)) / d ** 0.5
    scores = scores.masked_fill(mask, -1e30)
    scores[2] = 0.0
    ref = (torch.softmax(scores, -1) @ values).transpose(1, 2).reshape(b, 1, heads * d)
    assert_close_bf16(out, ref, "decode_attention", rtol=2e-2)
    assert_close_bf16(k_cache[:, :, pos], k[:, :, 0], "cached key")
    assert torch.equal(v_cache[:, :, pos], v[:, :, 0].bfloat16())
    assert torch.equal(k_cache[:, :, :pos], k_before[:, :, :pos]) and torch.equal(k_cache[:, :, pos + 1:], k_before[:, :, pos + 1:])


@needs_kernels
def test_geglu_and_add_layernorm():
    u = randn(3, 1, 2 * 300, dtype=torch.bfloat16) * 3
    a, g = u.float().chunk(2, dim=-1)
    assert_close_bf16(torch.ops.glm_cpu.geglu(u), a * F.gelu(g), "geglu")
    x, r = randn(2, 1, 200, dtype=torch.bfloat16), randn(2, 1, 200, dtype=torch.bfloat16)
    w, b = randn(200, dtype=torch.bfloat16), randn(200, dtype=torch.bfloat16)
    h = (x.float() * 2.5 + r.float()).bfloat16().float()
    ref = F.layer_norm(h, (200,), w.float(), b.float(), 1e-5)
    assert_close_bf16(torch.ops.glm_cpu.add_layernorm(x, r, 2.5, w, b, 1e-5), ref, "add_layernorm")




def _layer_reference(x, bits, w, scales, biases, norms, alpha, eps, k_cache, v_cache, pos, cos, sin, mask, heads):
    """decode_layers in fp32 torch ops from the same (dequantized) weights and caches."""
    from quantization.functional import unpack_int4
    b, d = x.shape[0], cos.shape[-1]

    def linear(j, inp):
        q = w[j] if bits == 16 else (unpack_int4(w[j]) if bits == 4 else w[j])
        weight = q.float() * (1.0 if bits == 16 else scales[j].float()[:, None])
        return inp @ weight.t() + biases[j].float()

    x = x.float()
    new_k, new_v = [], []
    for i in range(len(k_cache)):
        qkv = linear(4 * i, x).view(b, 1, heads, 3 * d).transpose(1, 2)
        q, k, v = qkv.chunk(3, dim=-1)
        q, k = rope_reference(q, cos, sin), rope_reference(k, cos, sin)
        keys = torch.cat([k_cache[i].float()[:, :, :pos], k], dim=2)
        values = torch.cat([v_cache[i].float()[:, :, :pos], v], dim=2)
        scores = (q @ keys.transpose(-1, -2)) / d ** 0.5
        scores = scores.masked_fill(mask.view(-1, 1, 1, pos + 1), -1e30)
        ctx = (torch.softmax(scores, -1) @ values).transpose(1, 2).reshape(b, 1, heads * d)
        new_k.append(k[:, :, 0])
        new_v.append(v[:, :, 0])
        y = F.layer_norm(x * alpha + linear(4 * i + 1, ctx), x.shape[-1:], norms[4 * i].float(), norms[4 * i + 1].float(), eps)
        a, g = linear(4 * i + 2, y).chunk(2, dim=-1)
        x = F.layer_norm(y * alpha + linear(4 * i + 3, a * F.gelu(g)), x.shape[-1:], norms[4 * i + 2].float(),
                         norms[4 * i + 3].float(), eps)
    return x, new_k, new_v


@needs_kernels
@pytest.mark.parametrize("bits", [16, 8, 4])
@pytest.mark.parametrize("b", [1, 3])
def test_decode_layers(bits, b):
    """The fused all-layers decode step against fp32 torch ops: output and the keys / values it appends."""
    from quantization.functional import pack_int4
    layers, heads, d, hidden, inner, t, pos, alpha, eps = 2, 2, 32, 64, 96, 12, 7, 1.7, 1e-5
    shapes = [(3 * hidden, hidden), (hidden, hidden), (2 * inner, hidden), (hidden, inner)]
    weights, scales, biases, norms = [], [], [], []
    for _ in range(layers):
        for n, k in shapes:
            if bits == 16:
                weights.append((randn(n, k) * k ** -0.5).bfloat16())
                scales.append(torch.ones(n))
            else:
                top = 127 if bits == 8 else 7
                q = torch.randint(-top - 1, top + 1, (n, k), generator=GEN, dtype=torch.int8)
                weights.append(q if bits == 8 else pack_int4(q))
                scales.append((torch.rand(n, generator=GEN) * 2 / (top * k ** 0.5)).half())
            biases.append((randn(n) * 0.1).bfloat16())
        norms += [(1 + 0.1 * randn(hidden)).bfloat16(), (0.1 * randn(hidden)).bfloat16()] * 2
    x = randn(b, 1, hidden, dtype=torch.bfloat16)
    k_cache = [randn(b, heads, t, d, dtype=torch.bfloat16) for _ in range(layers)]
    v_cache = [randn(b, heads, t, d, dtype=torch.bfloat16) for _ in range(layers)]
    k_before, v_before = [c.clone() for c in k_cache], [c.clone() for c in v_cache]
    angles = randn(b, 1, 1, d // 2) * 3
    cos, sin = torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1)
    mask = torch.zeros(b, pos + 1, dtype=torch.bool)
    mask[-1, 2:4] = b > 1  # the last row hides two cached positions
    out = cpu.decode_layers(x, bits, weights, [] if bits == 16 else scales, biases, norms, alpha, eps, k_cache,
                            v_cache, pos, cos, sin, mask)
    ref, new_k, new_v = _layer_reference(x, bits, weights, scales, biases, norms, alpha, eps, k_before, v_before,
                                         pos, cos, sin, mask, heads)
    assert out.shape == (b, 1, hidden) and out.dtype == torch.bfloat16
    assert_close_bf16(out, ref, f"decode_layers bits={bits}", rtol=4e-2)
    for i in range(layers):
        assert_close_bf16(k_cache[i][:, :, pos], new_k[i], "appended key", rtol=4e-2)
        assert_close_bf16(v_cache[i][:, :, pos], new_v[i], "appended value", rtol=4e-2)
        assert torch.equal(k_cache[i][:, :, :pos], k_before[i][:, :, :pos])


# ---------------------------------------------------------------------------------------------------------------
# Which tier loads

def test_choose_tier():
    bf16_cpu = {"avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_bf16"}
    avx512_cpu = bf16_cpu - {"avx512_bf16"}
    avx2_cpu = {"avx2", "fma", "f16c"}
    choose = build.choose_tier
    assert choose(None, bf16_cpu) == ("avx512bf16", None)
    assert choose("1", avx512_cpu) == ("avx512", None)
    assert choose("auto", avx2_cpu) == ("avx2", None)
    assert choose("0", bf16_cpu) == ("none", None)
    assert choose("avx2", bf16_cpu) == ("avx2", None)
    assert choose("avx512", bf16_cpu) == ("avx512", None)
    tier, warning = choose("avx512bf16", avx512_cpu)  # forced beyond the CPU: the best lower tier, one warning
    assert tier == "avx512" and "avx512_bf16" in warning and "using avx512" in warning
    tier, warning = choose("avx512", avx2_cpu)
    assert tier == "avx2" and "avx512f" in warning
    tier, warning = choose("avx2", {"sse2"})
    assert tier == "none" and "PyTorch" in warning
    tier, warning = choose(None, {"sse2"})
    assert tier == "none" and "avx2" in warning
    tier, warning = choose("avx9000", avx2_cpu)
    assert tier == "avx2" and "not one of" in warning


def test_requested_tier_is_the_loaded_one():
    """Under GLM_CPU_KERNELS=<tier> (the subprocess runs below) the tier asked for is the one loaded."""
    request = os.environ.get("GLM_CPU_KERNELS", "")
    expected = build.choose_tier(request, build.cpu_flags())[0]
    assert cpu.tier() == expected
    assert cpu.available() == (expected != "none")
    if expected != "none":
        assert torch.ops.glm_cpu.tier() == expected


def _env(tier):
    return dict(os.environ, GLM_CPU_KERNELS=tier, GLM_CPU_KERNELS_SUBRUN="1")


def _run(code_or_args, tier, timeout=600):
    return subprocess.run([sys.executable, *code_or_args], cwd=ROOT, env=_env(tier), capture_output=True, text=True,
                          timeout=timeout)


def test_disabled_by_environment():
    proc = _run(["-c", "from kernels import cpu; import torch; print(cpu.available(), cpu.tier(), "
                       "hasattr(torch.ops.glm_cpu, 'gemv_bf16'))"], "0", timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["False", "none", "False"]
    assert "> CPU kernels: none" in proc.stderr and "Compiling" not in proc.stderr


OTHER_TIERS = [t for t in build.TIERS if build.supported(t, build.cpu_flags())]
SUBRUN = os.environ.get("GLM_CPU_KERNELS_SUBRUN") == "1"


@pytest.fixture(scope="module", autouse=True)
def other_tier_runs(request, tmp_path_factory):
    """test_other_tier's reruns of this file, one process per tier, all started when this module starts: each runs
    mostly on one core, so they run beside each other and beside this process's tests; test_other_tier waits for
    its tier's. Only the selected tiers are started (none inside a per-tier run)."""
    tiers = [] if SUBRUN else [
        item.callspec.params["tier"] for item in request.session.items
        if getattr(item, "module", None) is request.module and getattr(item, "originalname", "") == "test_other_tier"]
    runs = {}
    for tier in tiers:
        if tier not in ("none", cpu.tier()):
            out = tmp_path_factory.mktemp(f"tier_{tier}")
            cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", str(Path(__file__).resolve())]
            with open(out / "stdout", "w") as stdout, open(out / "stderr", "w") as stderr:
                runs[tier] = out, subprocess.Popen(cmd, cwd=ROOT, env=_env(tier), stdout=stdout, stderr=stderr)
    try:
        yield runs
    finally:
        for _, proc in runs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()


@pytest.mark.skipif(SUBRUN, reason="already a per-tier run")
@pytest.mark.parametrize("tier", OTHER_TIERS or ["none"])
def test_other_tier(tier, other_tier_runs):
    """This file's op tests on every other tier this CPU runs, each in its own process (one tier per process)."""
    if tier == "none":
        pytest.skip("this CPU runs no kernel tier")
    if tier == cpu.tier():
        pytest.skip(f"{tier} is this process's tier: the tests above ran on it")
    out, run = other_tier_runs[tier]
    run.wait(timeout=600)
    proc = subprocess.CompletedProcess(run.args, run.returncode, (out / "stdout").read_text(),
                                       (out / "stderr").read_text())
    assert proc.returncode == 0, f"tier {tier}:\n{proc.stdout[-4000:]}\n{proc.stderr[-2000:]}"
    assert " passed" in proc.stdout, proc.stdout[-2000:]
