// The ops every kernel tier's library defines (one tier is loaded per process; all register the same names in
// ops.cpp), and the tensor-argument helper they share.
#pragma once

#include <ATen/ATen.h>

#include <string>

#include "simd.h"

namespace glm_cpu {

// Matrix x vector for at most 16 activation rows (gemv_<tier>.cpp): y = x W^T (+ b), W bf16 [N, K]; or
// y = (x q^T) * scale (+ b), q int8 [N, K] or GLM-130B's packed int4 [N, K/2], one scale per output row.
at::Tensor gemv_bf16(const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& bias);
at::Tensor gemv_int8(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scale,
                     const c10::optional<at::Tensor>& bias);
at::Tensor gemv_int4(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scale,
                     const c10::optional<at::Tensor>& bias);

// Sum of a contiguous fp32 tensor read with several prefetched streams per thread: the read-bandwidth probe
// (read_sum.cpp).
double read_sum(const at::Tensor& x);

// The thread pool's self-check (read_sum.cpp): `jobs` parallel calls of 2..`chunks` one-item chunks, each chunk
// counting its runs; returns how many chunks did not run exactly once before their call returned (0 when sound).
// first_generation >= 0 first moves the pool's call counter there (to cross its 32-bit wrap-around).
int64_t pool_check(int64_t jobs, int64_t chunks, int64_t first_generation);

// The pool's helpers sleep now instead of spinning for the next call (read_sum.cpp; see Pool::rest).
void pool_rest();

// dst = src (fp16 -> bf16, round to nearest even) on the calling thread alone (convert.cpp): weight offload's reader.
void fp16_to_bf16(const at::Tensor& src, const at::Tensor& dst);

// One decoding step (decode_step.cpp).
at::Tensor decode_attention(const at::Tensor& qkv, const at::Tensor& cos, const at::Tensor& sin,
                            const at::Tensor& k_cache, const at::Tensor& v_cache, int64_t pos,
                            const c10::optional<at::Tensor>& mask);
at::Tensor geglu(const at::Tensor& u);
at::Tensor add_layernorm(const at::Tensor& x, const at::Tensor& r, double alpha, const at::Tensor& w,
                         const at::Tensor& b, double eps);
at::Tensor decode_layers(const at::Tensor& x, int64_t bits, at::TensorList weights, at::TensorList scales,
                         at::TensorList biases, at::TensorList norms, double alpha, double eps, at::TensorList k_cache,
                         at::TensorList v_cache, int64_t pos, const at::Tensor& cos, const at::Tensor& sin,
                         const c10::optional<at::Tensor>& mask);

// A 1-D fp32 / fp16 / bf16 tensor read as float (scales, biases, norm parameters in whatever dtype a layer keeps).
struct Vec1d {
  const void* p = nullptr;
  at::ScalarType t = at::kFloat;
  at::Tensor keep;
  Vec1d() = default;
  explicit Vec1d(const at::Tensor& v) {
    keep = (v.scalar_type() == at::kFloat || v.scalar_type() == at::kHalf || v.scalar_type() == at::kBFloat16)
               ? v.contiguous() : v.to(at::kFloat).contiguous();
    p = keep.data_ptr();
    t = keep.scalar_type();
  }
  inline float get(int64_t i, float dflt) const {
    if (!p) return dflt;
    if (t == at::kFloat) return static_cast<const float*>(p)[i];
    if (t == at::kBFloat16) return to_f32(static_cast<const bf16*>(p)[i]);
    return float(static_cast<const at::Half*>(p)[i]);
  }
};

}  // namespace glm_cpu
