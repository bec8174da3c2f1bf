// The matrix x vector driver shared by every tier: argument checks, the split of the weight rows into chunks for
// the thread pool and of each chunk into kStreams sequential streams, and the output (row scale, bias, one bf16
// rounding). The arithmetic on a tile of weight rows x activation rows comes from the tier's Kernel
// (gemv_avx512bf16.cpp: bf16 dot products; gemv_fma.cpp: fp32 FMA on AVX-512F or AVX2):
//
//   struct Kernel {
//     static constexpr int kRowsPerPass;            // activation rows one tile call takes (at most 16)
//     template <Format F> struct Activations {      // x prepared once per call (K features, M <= 16 rows)
//       Activations(const bf16* x, int64_t M, int64_t K);
//     };
//     template <Format F>                           // out[r * 16 + m] = <weight row r, x row m0 + m> (unscaled)
//     static void tiles(const Activations<F>&, int m0, int mc, const uint8_t* const* rows, int nrows, int64_t K,
//                       float* out);
//   };
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <vector>

#include "ops.h"
#include "simd.h"
#include "thread_pool.h"

namespace glm_cpu {

enum class Format { BF16, INT8, INT4 };

template <Format F>
constexpr int64_t row_bytes(int64_t K) { return F == Format::BF16 ? 2 * K : (F == Format::INT8 ? K : K / 2); }

// Weight rows in flight per thread. They come from kStreams separate parts of the thread's row range, so the
// memory system sees several independent sequential streams (measurably faster than one stream per core here).
#ifndef GLM_STREAMS
#define GLM_STREAMS 4
#endif
constexpr int kStreams = GLM_STREAMS;

template <Format F, class Kernel>
at::Tensor gemv(const at::Tensor& x_in, const at::Tensor& w, const c10::optional<at::Tensor>& scale_in,
                const c10::optional<at::Tensor>& bias_in) {
  TORCH_CHECK(x_in.scalar_type() == at::kBFloat16, "glm_cpu gemv: x must be bfloat16");
  TORCH_CHECK(w.dim() == 2 && w.is_contiguous(), "glm_cpu gemv: weight must be a contiguous [N, K] tensor");
  const int64_t N = w.size(0);
  const int64_t K = F == Format::INT4 ? 2 * w.size(1) : w.size(1);
  TORCH_CHECK(x_in.size(-1) == K, "glm_cpu gemv: x has ", x_in.size(-1), " features, the weight expects ", K);
  at::Tensor x = x_in.reshape({-1, K}).contiguous();
  const int64_t M = x.size(0);
  TORCH_CHECK(M <= 16, "glm_cpu gemv: at most 16 rows (use a matrix multiply for more)");
  Vec1d scale, bias;
  if (F != Format::BF16) {
    TORCH_CHECK(scale_in.has_value() && scale_in->numel() == N, "glm_cpu gemv: one scale per output row needed");
    scale = Vec1d(*scale_in);
  }
  if (bias_in.has_value()) {
    TORCH_CHECK(bias_in->numel() == N, "glm_cpu gemv: bias must have N elements");
    bias = Vec1d(*bias_in);
  }
  std::vector<int64_t> out_shape(x_in.sizes().begin(), x_in.sizes().end());
  out_shape.back() = N;
  at::Tensor out = at::empty({M, N}, x.options());
  if (M == 0 || N == 0) return out.reshape(out_shape);

  const typename Kernel::template Activations<F> xs(reinterpret_cast<const bf16*>(x.data_ptr<at::BFloat16>()), M, K);
  const uint8_t* wp = static_cast<const uint8_t*>(w.data_ptr());
  const int64_t rb = row_bytes<F>(K);
  bf16* op = reinterpret_cast<bf16*>(out.data_ptr<at::BFloat16>());
  // Chunks of rows: about 8 per thread (dynamic balance), at most ~256 KB of weights each, a multiple of 16 rows.
  const int64_t threads = std::max(1, at::get_num_threads());
#ifndef GLM_CHUNKS_PER_THREAD
#define GLM_CHUNKS_PER_THREAD 8
#endif
#ifndef GLM_CHUNK_KB
#define GLM_CHUNK_KB 256
#endif
  int64_t chunk = std::min<int64_t>(N / (GLM_CHUNKS_PER_THREAD * threads), (int64_t(GLM_CHUNK_KB) << 10) / rb);
  chunk = std::max<int64_t>(16, chunk / 16 * 16);
  constexpr int kPass = Kernel::kRowsPerPass;
  parallel_chunks(N, chunk, [&](int64_t n0, int64_t n1) {
    // rows n0 + s * sub + i for s < kStreams are processed together; the last (n1 - n0) % kStreams rows alone.
    const int64_t sub = (n1 - n0) / kStreams;
    alignas(64) float acc[kStreams * 16];
    int64_t idx[kStreams];
    const uint8_t* rows[kStreams];
    auto emit = [&](int nrows) {
      for (int64_t m0 = 0; m0 < M; m0 += kPass) {
        const int mc = int(std::min<int64_t>(kPass, M - m0));
        Kernel::template tiles<F>(xs, int(m0), mc, rows, nrows, K, acc);
        for (int r = 0; r < nrows; ++r) {
          const int64_t n = idx[r];
          const float s = scale.get(n, 1.0f), b = bias.get(n, 0.0f);
          for (int m = 0; m < mc; ++m) op[(m0 + m) * N + n] = to_bf16(acc[r * 16 + m] * s + b);
        }
      }
    };
    for (int64_t i = 0; i < sub; ++i) {
      for (int s = 0; s < kStreams; ++s) {
        idx[s] = n0 + s * sub + i;
        rows[s] = wp + idx[s] * rb;
      }
      emit(kStreams);
    }
    for (int64_t n = n0 + kStreams * sub; n < n1; ++n) {
      idx[0] = n;
      rows[0] = wp + n * rb;
      emit(1);
    }
  });
  return out.reshape(out_shape);
}

// The three public GEMV ops over a tier's Kernel (each gemv_<kind>.cpp instantiates them once).
template <class Kernel>
struct GemvOps {
  static at::Tensor bf16w(const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& bias) {
    TORCH_CHECK(w.scalar_type() == at::kBFloat16, "glm_cpu gemv_bf16: weight must be bfloat16");
    return gemv<Format::BF16, Kernel>(x, w, c10::nullopt, bias);
  }
  static at::Tensor int8w(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scale,
                          const c10::optional<at::Tensor>& bias) {
    TORCH_CHECK(w.scalar_type() == at::kChar, "glm_cpu gemv_int8: weight must be int8");
    return gemv<Format::INT8, Kernel>(x, w, scale, bias);
  }
  static at::Tensor int4w(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scale,
                          const c10::optional<at::Tensor>& bias) {
    TORCH_CHECK(w.scalar_type() == at::kChar || w.scalar_type() == at::kByte,
                "glm_cpu gemv_int4: packed weight must be int8 or uint8");
    return gemv<Format::INT4, Kernel>(x, w, scale, bias);
  }
};

// Defines ops.h's gemv_bf16 / gemv_int8 / gemv_int4 over `Kernel` (once per tier, in its gemv_<kind>.cpp).
#define GLM_DEFINE_GEMV_OPS(Kernel)                                                                              \
  at::Tensor gemv_bf16(const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& bias) {        \
    return GemvOps<Kernel>::bf16w(x, w, bias);                                                                   \
  }                                                                                                              \
  at::Tensor gemv_int8(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scale,                        \
                       const c10::optional<at::Tensor>& bias) {                                                  \
    return GemvOps<Kernel>::int8w(x, w, scale, bias);                                                            \
  }                                                                                                              \
  at::Tensor gemv_int4(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scale,                        \
                       const c10::optional<at::Tensor>& bias) {                                                  \
    return GemvOps<Kernel>::int4w(x, w, scale, bias);                                                            \
  }

}  // namespace glm_cpu
