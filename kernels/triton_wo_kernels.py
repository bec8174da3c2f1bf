"""Triton kernels of the weight-only matmul y = x · (q · scale)ᵀ (imported only through kernels/triton_matmul.py,
which guards the triton import).

Weights are read in GLM-130B's stored layout, once, and turned into numbers in registers:
- BITS 8: q int8 [N, K], row-major.
- BITS 4: packed int8 [N, K/2]; byte j of a row holds q[2j] in its high nibble and q[2j+1] in its low nibble
  (both two's complement). The high nibble pairs with the even activation columns, the low one with the odd
  columns, so no interleave is needed: x is read as its even and odd columns.
The row scale multiplies the fp32 accumulator once at the end (q is exact in fp16/bf16/fp32).

Offsets: row m of x, row n of the weight and split s of the output start at m · stride_xm, n · stride_wn and
s · M · N elements, which pass 2³¹ on large shapes (a 32768-row prefill against a 65536-wide weight): these row
bases are computed once per program in int64 (`_rows`); offsets within a row stay int32.

Split-K: program (n, s) covers K range [s · K_ITERS · BLOCK_K, (s + 1) · K_ITERS · BLOCK_K); with more than one
split the kernel writes fp32 partials [splits, M, N] (out_split_stride = M · N) that the caller sums. K_ITERS is a
compile-time constant (one compilation per weight shape; the interpreter also needs constant loop bounds).
"""
import triton
import triton.language as tl


@triton.jit
def _unpack_int4(b):
    """int8 bytes -> (high nibble, low nibble), both sign-extended, as int32."""
    w = b.to(tl.int32)
    return w >> 4, ((w & 15) ^ 8) - 8


@triton.jit
def _rows(ptr, offs, stride):
    """Pointers to the starts of rows `offs` (int64: row · stride may pass 2³¹ elements)."""
    return ptr + offs.to(tl.int64) * stride


@triton.jit
def _out_rows(out_ptr, pid_k, out_split_stride, offs_m, stride_om):
    """Pointers to the starts of output rows `offs_m` of split `pid_k` (int64)."""
    return _rows(out_ptr + pid_k.to(tl.int64) * out_split_stride, offs_m, stride_om)


@triton.jit
def _to_activation(q, dtype: tl.constexpr):
    """Small integers to fp16/bf16, exactly, through fp32 (the interpreter's direct int -> bf16 cast is wrong)."""
    return q.to(tl.float32).to(dtype)


@triton.jit
def gemv_kernel(x_ptr, w_ptr, s_ptr, out_ptr, M, N, K,
                stride_xm, stride_wn, stride_om, out_split_stride,
                BITS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                K_ITERS: tl.constexpr):
    """Decode shape (few rows): fp32 multiply-and-reduce on CUDA cores, every row of x against one weight tile."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = offs_m < M
    n_ok = offs_n < N
    x_rows = _rows(x_ptr, offs_m, stride_xm)[:, None]
    w_rows = _rows(w_ptr, offs_n, stride_wn)[:, None]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    k_start = pid_k * (K_ITERS * BLOCK_K)
    for step in range(0, K_ITERS):
        k0 = k_start + step * BLOCK_K
        if BITS == 8:
            offs_k = k0 + tl.arange(0, BLOCK_K)
            k_ok = offs_k < K
            w = tl.load(w_rows + offs_k[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0).to(tl.float32)
            x = tl.load(x_rows + offs_k[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0).to(tl.float32)
            acc += tl.sum(x[:, None, :] * w[None, :, :], axis=2)
        else:
            offs_b = k0 // 2 + tl.arange(0, BLOCK_K // 2)
            b_ok = offs_b < K // 2
            b = tl.load(w_rows + offs_b[None, :], mask=n_ok[:, None] & b_ok[None, :], other=0)
            hi, lo = _unpack_int4(b)
            x_mask = m_ok[:, None] & b_ok[None, :]
            x_even = tl.load(x_rows + 2 * offs_b[None, :], mask=x_mask, other=0)
            x_odd = tl.load(x_rows + 2 * offs_b[None, :] + 1, mask=x_mask, other=0)
            acc += tl.sum(x_even.to(tl.float32)[:, None, :] * hi.to(tl.float32)[None, :, :]
                          + x_odd.to(tl.float32)[:, None, :] * lo.to(tl.float32)[None, :, :], axis=2)
    scale = tl.load(s_ptr + offs_n, mask=n_ok, other=0).to(tl.float32)
    out = acc * scale[None, :]
    out_ptrs = _out_rows(out_ptr, pid_k, out_split_stride, offs_m, stride_om)[:, None] + offs_n[None, :]
    tl.store(out_ptrs, out.to(out_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


@triton.jit
def mm_kernel(x_ptr, w_ptr, s_ptr, out_ptr, M, N, K,
              stride_xm, stride_wn, stride_om, out_split_stride,
              BITS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
              K_ITERS: tl.constexpr, GROUP_M: tl.constexpr):
    """Prefill shape (many rows): tiles of x times weight tiles dequantized to x's dtype in registers, on tensor
    cores (tl.dot, fp32 accumulation). Programs are grouped GROUP_M tile-rows at a time so weight tiles are reused
    from L2."""
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * tiles_n
    first_m = (pid // per_group) * GROUP_M
    group_rows = tl.minimum(tiles_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_rows
    pid_n = (pid % per_group) // group_rows
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = offs_m < M
    n_ok = offs_n < N
    dtype = x_ptr.dtype.element_ty
    x_rows = _rows(x_ptr, offs_m, stride_xm)[:, None]
    w_cols = _rows(w_ptr, offs_n, stride_wn)[None, :]  # weight row n is column n of the transposed tile
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    k_start = pid_k * (K_ITERS * BLOCK_K)
    for step in range(0, K_ITERS):
        k0 = k_start + step * BLOCK_K
        if BITS == 8:
            offs_k = k0 + tl.arange(0, BLOCK_K)
            k_ok = offs_k < K
            x = tl.load(x_rows + offs_k[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0)
            w_t = tl.load(w_cols + offs_k[:, None], mask=n_ok[None, :] & k_ok[:, None], other=0)
            acc = tl.dot(x, _to_activation(w_t, dtype), acc)
        else:
            offs_b = k0 // 2 + tl.arange(0, BLOCK_K // 2)
            b_ok = offs_b < K // 2
            b_t = tl.load(w_cols + offs_b[:, None], mask=n_ok[None, :] & b_ok[:, None], other=0)
            hi_t, lo_t = _unpack_int4(b_t)
            x_mask = m_ok[:, None] & b_ok[None, :]
            x_even = tl.load(x_rows + 2 * offs_b[None, :], mask=x_mask, other=0)
            x_odd = tl.load(x_rows + 2 * offs_b[None, :] + 1, mask=x_mask, other=0)
            acc = tl.dot(x_even, _to_activation(hi_t, dtype), acc)
            acc = tl.dot(x_odd, _to_activation(lo_t, dtype), acc)
    scale = tl.load(s_ptr + offs_n, mask=n_ok, other=0).to(tl.float32)
    out = acc * scale[None, :]
    out_ptrs = _out_rows(out_ptr, pid_k, out_split_stride, offs_m, stride_om)[:, None] + offs_n[None, :]
    tl.store(out_ptrs, out.to(out_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])
