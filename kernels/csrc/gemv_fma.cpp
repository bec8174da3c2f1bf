// The GEMV tiles of the avx512 and avx2 tiers: fp32 FMA on 16 (AVX-512F) or 8 (AVX2) lanes, for CPUs without
// AVX-512 BF16. The driver (row chunks, streams, output) is gemv.h's.
//
// Weights are read one integer vector (kBlock = 4 * kLanes bytes) at a time and turned into kPhases fp32 vectors
// with one or two integer instructions each, no shuffles: lane i of phase p holds the weight of column
// block * kPhases * kLanes + kPhases * i + col(p), where
//   BF16 (2 phases): the two bf16 of a 32-bit lane: low half << 16 (even column), high half & 0xFFFF0000 (odd);
//   INT8 (4 phases): byte p of a 32-bit lane, masked in place and converted: q * 2^(8p), exact;
//   INT4 (8 phases): nibble p of a 32-bit lane (GLM-130B's layout: the high nibble of a byte is the even column),
//                    masked in place and converted: q * 2^(4p), exact.
// x is laid out to match once per call (fp32, phase by phase, times 2^-(8p) / 2^-(4p), zero beyond K), so one FMA
// per phase and activation row applies a weight vector. Every integer field but the top one is first offset to
// unsigned (XOR 0x80 / 0x8) so masking needs no sign extension; the offset times the sum of those columns of x is
// subtracted from the row sum at the end (in fp32; the rounding it adds is ~1e-6 relative, far below bf16's 4e-3).
#include <ATen/ATen.h>

#include <immintrin.h>

#include <cstring>
#include <type_traits>
#include <utility>
#include <vector>

#include "gemv.h"
#include "simd.h"

#if defined(__AVX512BF16__)
#error "the avx512bf16 tier uses gemv_avx512bf16.cpp"
#endif

namespace glm_cpu {
namespace {
using namespace simd;

constexpr int W = kLanes;
constexpr int64_t kBlock = 4 * W;  // bytes of weights per integer vector

template <Format F> struct Layout;

template <> struct Layout<Format::BF16> {
  static constexpr int kPhases = 2;
  static constexpr float kBias = 0.0f;
  static constexpr int32_t kXor = 0;
  static constexpr int col(int p) { return p; }
  static constexpr float xscale(int) { return 1.0f; }
  template <int p> static inline VF weights(VI v) {
    if constexpr (p == 0) return as_f(slli32<16>(v));
    else return as_f(and_i(v, set1i(int32_t(0xFFFF0000u))));
  }
};

template <> struct Layout<Format::INT8> {
  static constexpr int kPhases = 4;
  static constexpr float kBias = 128.0f;
  static constexpr int32_t kXor = 0x00808080;  // bytes 0-2 -> q + 128; byte 3 stays signed
  static constexpr int col(int p) { return p; }
  static constexpr float xscale(int p) { return 1.0f / float(1u << (8 * p)); }
  template <int p> static inline VF weights(VI v) { return cvt_i32(and_i(v, set1i(int32_t(0xFFu << (8 * p))))); }
};

template <> struct Layout<Format::INT4> {
  static constexpr int kPhases = 8;
  static constexpr float kBias = 8.0f;
  static constexpr int32_t kXor = 0x08888888;  // nibbles 0-6 -> q + 8; nibble 7 stays signed
  static constexpr int col(int p) { return p ^ 1; }  // nibble 2j + 1 (high) is column 2j, nibble 2j column 2j + 1
  static constexpr float xscale(int p) { return 1.0f / float(1u << (4 * p)); }
  template <int p> static inline VF weights(VI v) { return cvt_i32(and_i(v, set1i(int32_t(0xFu << (4 * p))))); }
};

#define GLM_ALWAYS_INLINE __attribute__((always_inline))

template <class Fn, int... P>
GLM_ALWAYS_INLINE inline void for_each_phase(const Fn& fn, std::integer_sequence<int, P...>) {
  (fn(std::integral_constant<int, P>{}), ...);
}

struct FmaKernel {
  static constexpr int kRowsPerPass = 8;

  template <Format F> struct Activations {
    using L = Layout<F>;
    static constexpr int kPhases = L::kPhases;
    static constexpr int64_t kBlockWeights = int64_t(kPhases) * W;
    int64_t full_blocks = 0, tail_bytes = 0;
    const float* x[16] = {};
    float correction[16] = {};

    Activations(const bf16* xp, int64_t M, int64_t K) {
      const int64_t rb = row_bytes<F>(K);
      full_blocks = rb / kBlock;
      tail_bytes = rb % kBlock;
      const int64_t blocks = full_blocks + (tail_bytes > 0);
      const int64_t stride = blocks * kBlockWeights;
      static thread_local std::vector<float> buf;  // x is small: it stays in L1 / L2 across the weight rows
      if (int64_t(buf.size()) < M * stride) buf.resize(M * stride);
      float scales[kPhases];
      int phase_of_col[kPhases];
      for (int p = 0; p < kPhases; ++p) {
        scales[p] = L::xscale(p);
        phase_of_col[L::col(p)] = p;
      }
      for (int64_t m = 0; m < M; ++m) {
        float* dst = buf.data() + m * stride;
        const bf16* src = xp + m * K;
        double total = 0.0, top = 0.0;  // the sum of the row, and of its columns of the unbiased top phase
        for (int64_t b = 0; b < blocks; ++b) {
          float* db = dst + b * kBlockWeights;
          for (int i = 0; i < W; ++i)
            for (int c = 0; c < kPhases; ++c) {
              const int64_t k = b * kBlockWeights + int64_t(i) * kPhases + c;
              const int p = phase_of_col[c];
              const float v = k < K ? to_f32(src[k]) : 0.0f;
              db[p * W + i] = v * scales[p];
              total += v;
              if (p == kPhases - 1) top += v;
            }
        }
        x[m] = dst;
        correction[m] = float(double(L::kBias) * (total - top));
      }
    }
  };

  // out[r * 16 + m] for R weight rows (any addresses) and M activation rows; U accumulators per (r, m) that the
  // phases take in turn (independent FMA chains).
  template <Format F, int M, int R, int U>
  static void tile(const Activations<F>& xs, int m0, const uint8_t* const* rows, float* out) {
    using L = Layout<F>;
    constexpr int P = L::kPhases;
    VF acc[R][M][U];
    for (int r = 0; r < R; ++r)
      for (int m = 0; m < M; ++m)
        for (int u = 0; u < U; ++u) acc[r][m][u] = zero();
    const VI flip = set1i(L::kXor);
    auto step = [&](const VI* v, int64_t b) GLM_ALWAYS_INLINE {
      const float* xb[M];
      for (int m = 0; m < M; ++m) xb[m] = xs.x[m0 + m] + b * (P * W);
      for_each_phase([&](auto pc) GLM_ALWAYS_INLINE {
        constexpr int p = decltype(pc)::value;
        VF wv[R];
        for (int r = 0; r < R; ++r) wv[r] = L::template weights<p>(v[r]);
        for (int m = 0; m < M; ++m) {
          const VF xv = loadu(xb[m] + p * W);
          for (int r = 0; r < R; ++r) acc[r][m][p % U] = fmadd(wv[r], xv, acc[r][m][p % U]);
        }
      }, std::make_integer_sequence<int, P>{});
    };
    const int64_t nb = xs.full_blocks;
    for (int64_t b = 0; b < nb; ++b) {
      VI v[R];
      for (int r = 0; r < R; ++r) {
        const uint8_t* p = rows[r] + b * kBlock;
        if (kBlock >= 64 || ((b * kBlock) & 63) == 0) prefetch(p);
        v[r] = loadu_i(p);
        if constexpr (L::kXor != 0) v[r] = xor_i(v[r], flip);
      }
      step(v, b);
    }
    if (xs.tail_bytes > 0) {
      VI v[R];
      for (int r = 0; r < R; ++r) {
        alignas(64) uint8_t tmp[kBlock] = {};
        std::memcpy(tmp, rows[r] + nb * kBlock, size_t(xs.tail_bytes));
        v[r] = loadu_i(tmp);
        if constexpr (L::kXor != 0) v[r] = xor_i(v[r], flip);
      }
      step(v, nb);
    }
    for (int r = 0; r < R; ++r)
      for (int m = 0; m < M; ++m) {
        VF t = acc[r][m][0];
        for (int u = 1; u < U; ++u) t = add(t, acc[r][m][u]);
        out[r * 16 + m] = reduce_add(t) - xs.correction[m0 + m];
      }
  }

  // Tile shapes per activation-row count: accumulators R * M * U within the register file (16 ymm / 32 zmm).
  template <int M> static constexpr int rows_per_tile() {
    return W == 16 ? (M <= 4 ? 4 : 2) : (M <= 2 ? 4 : (M <= 4 ? 2 : 1));
  }
  template <int M> static constexpr int unroll() { return W == 16 ? (M <= 2 ? 2 : 1) : (M == 1 ? 2 : 1); }

  template <Format F, int M>
  static void any_rows(const Activations<F>& xs, int m0, const uint8_t* const* rows, int nrows, float* out) {
    constexpr int R = rows_per_tile<M>(), U = unroll<M>();
    int r = 0;
    for (; r + R <= nrows; r += R) tile<F, M, R, U>(xs, m0, rows + r, out + r * 16);
    for (; r < nrows; ++r) tile<F, M, 1, U>(xs, m0, rows + r, out + r * 16);
  }

  template <Format F>
  static void tiles(const Activations<F>& xs, int m0, int mc, const uint8_t* const* rows, int nrows, int64_t,
                    float* out) {
    switch (mc) {
      case 1: return any_rows<F, 1>(xs, m0, rows, nrows, out);
      case 2: return any_rows<F, 2>(xs, m0, rows, nrows, out);
      case 3: return any_rows<F, 3>(xs, m0, rows, nrows, out);
      case 4: return any_rows<F, 4>(xs, m0, rows, nrows, out);
      case 5: return any_rows<F, 5>(xs, m0, rows, nrows, out);
      case 6: return any_rows<F, 6>(xs, m0, rows, nrows, out);
      case 7: return any_rows<F, 7>(xs, m0, rows, nrows, out);
      default: return any_rows<F, 8>(xs, m0, rows, nrows, out);
    }
  }
};

}  // namespace

at::Tensor gemv_bf16(const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& bias) {
  return GemvOps<FmaKernel>::bf16w(x, w, bias);
}
at::Tensor gemv_int8(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scale,
                     const c10::optional<at::Tensor>& bias) {
  return GemvOps<FmaKernel>::int8w(x, w, scale, bias);
}
at::Tensor gemv_int4(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scale,
                     const c10::optional<at::Tensor>& bias) {
  return GemvOps<FmaKernel>::int4w(x, w, scale, bias);
}

}  // namespace glm_cpu
