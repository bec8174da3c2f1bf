// The GEMV tiles of the avx512 and avx2 tiers, for CPUs without AVX-512 BF16: fp32 FMA on 16 (AVX-512F) or 8
// (AVX2) lanes for bf16 weights (FmaKernel), 16-bit integer products for INT8 and INT4 (ByInt16, below). The
// driver (row chunks, streams, output) is gemv.h's.
//
// FmaKernel reads weights one integer vector (kBlock = 4 * kLanes bytes) at a time and turns it into kPhases fp32
// vectors with one integer instruction each, no shuffles: lane i of phase p holds the weight of column
// block * kPhases * kLanes + kPhases * i + p: the two bf16 of a 32-bit lane, low half << 16 (even column),
// high half & 0xFFFF0000 (odd). x is laid out to match once per call (fp32, phase by phase, zero beyond K), so one
// FMA per phase and activation row applies a weight vector.
#include <ATen/ATen.h>

#include <immintrin.h>

#include <cmath>
#include <cstring>
#include <limits>
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
  template <int p> static inline VF weights(VI v) {
    if constexpr (p == 0) return as_f(slli32<16>(v));
    else return as_f(and_i(v, set1i(int32_t(0xFFFF0000u))));
  }
};

#define GLM_ALWAYS_INLINE __attribute__((always_inline))

template <class Fn, int... P>
GLM_ALWAYS_INLINE inline void for_each_phase(const Fn& fn, std::integer_sequence<int, P...>) {
  (fn(std::integral_constant<int, P>{}), ...);
}

// step(v, b) for every block b of kBlock weight bytes of R rows: v[r] is block b of row r, the last (partial) block
// zero-filled beyond the row's tail_bytes.
template <int R, class Step>
GLM_ALWAYS_INLINE inline void for_each_block(const uint8_t* const* rows, int64_t full_blocks, int64_t tail_bytes,
                                             const Step& step) {
  for (int64_t b = 0; b < full_blocks; ++b) {
    VI v[R];
    for (int r = 0; r < R; ++r) {
      const uint8_t* p = rows[r] + b * kBlock;
      if (kBlock >= 64 || ((b * kBlock) & 63) == 0) prefetch(p);
      v[r] = loadu_i(p);
    }
    step(v, b);
  }
  if (tail_bytes > 0) {
    VI v[R];
    for (int r = 0; r < R; ++r) {
      alignas(64) uint8_t tmp[kBlock] = {};
      std::memcpy(tmp, rows[r] + full_blocks * kBlock, size_t(tail_bytes));
      v[r] = loadu_i(tmp);
    }
    step(v, full_blocks);
  }
}

// fn(std::integral_constant<int, M>) for a run-time row count mc in 1..8 (more than 8 is taken as 8).
template <class Fn>
inline void with_rows(int mc, const Fn& fn) {
  switch (mc) {
    case 1: return fn(std::integral_constant<int, 1>{});
    case 2: return fn(std::integral_constant<int, 2>{});
    case 3: return fn(std::integral_constant<int, 3>{});
    case 4: return fn(std::integral_constant<int, 4>{});
    case 5: return fn(std::integral_constant<int, 5>{});
    case 6: return fn(std::integral_constant<int, 6>{});
    case 7: return fn(std::integral_constant<int, 7>{});
    default: return fn(std::integral_constant<int, 8>{});
  }
}

struct FmaKernel {
  static constexpr int kRowsPerPass = 8;

  template <Format F> struct Activations {
    using L = Layout<F>;
    static constexpr int kPhases = L::kPhases;
    static constexpr int64_t kBlockWeights = int64_t(kPhases) * W;
    int64_t full_blocks = 0, tail_bytes = 0;
    const float* x[16] = {};

    Activations(const bf16* xp, int64_t M, int64_t K) {
      const int64_t rb = row_bytes<F>(K);
      full_blocks = rb / kBlock;
      tail_bytes = rb % kBlock;
      const int64_t blocks = full_blocks + (tail_bytes > 0);
      const int64_t stride = blocks * kBlockWeights;
      static thread_local std::vector<float> buf;  // x is small: it stays in L1 / L2 across the weight rows
      if (int64_t(buf.size()) < M * stride) buf.resize(M * stride);
      for (int64_t m = 0; m < M; ++m) {
        float* dst = buf.data() + m * stride;
        const bf16* src = xp + m * K;
        for (int64_t b = 0; b < blocks; ++b) {
          float* db = dst + b * kBlockWeights;
          for (int i = 0; i < W; ++i)
            for (int p = 0; p < kPhases; ++p) {
              const int64_t k = b * kBlockWeights + int64_t(i) * kPhases + p;
              db[p * W + i] = k < K ? to_f32(src[k]) : 0.0f;
            }
        }
        x[m] = dst;
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
    for_each_block<R>(rows, xs.full_blocks, xs.tail_bytes, step);
    for (int r = 0; r < R; ++r)
      for (int m = 0; m < M; ++m) {
        VF t = acc[r][m][0];
        for (int u = 1; u < U; ++u) t = add(t, acc[r][m][u]);
        out[r * 16 + m] = reduce_add(t);
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
    with_rows(mc, [&](auto mcon) { any_rows<F, decltype(mcon)::value>(xs, m0, rows, nrows, out); });
  }
};

// INT8 and INT4 by 16-bit integer products (vpmaddwd), faster than widening every weight to fp32 (fewer
// instructions per weight: shifts sign-extend a byte or nibble in place, one madd multiplies 2W of them).
// Each 16-bit lane of a weight vector holds kPhases weights (Int16Layout: 2 bytes, or 4 nibbles); phase p of lane
// i is the weight of column col(i, p) of its block of kCols columns (kBlock bytes). x is rounded once per call to
// int16 per block, in the same order: X = round(x * 2^(14 - e)) with 2^e > max |x| of the block, so |X| <= 2^14 and
// the rounding error is at most 2^-15 of the block's largest |x| (bf16 outputs are rounded at 2^-9 of their
// value). The madds of a block sum in int32 (|sum| < 2^23) and go into the fp32 accumulator once per block, times
// the block's 2^(e - 14).
template <Format F> struct Int16Layout;

template <> struct Int16Layout<Format::INT8> {  // byte p of lane i: column 2i + p
  static constexpr int kPhases = 2;
  static constexpr int64_t col(int i, int p) { return 2 * i + p; }
  template <int p> static inline VI weights(VI v) {
    if constexpr (p == 1) return srai16<8>(v);
    else return srai16<8>(slli16<8>(v));
  }
};

template <> struct Int16Layout<Format::INT4> {  // nibble q of lane i: column 4i + (q ^ 1) (the high nibble is even)
  static constexpr int kPhases = 4;
  static constexpr int64_t col(int i, int q) { return 4 * i + (q ^ 1); }
  template <int q> static inline VI weights(VI v) {
    if constexpr (q == 3) return srai16<12>(v);
    else return srai16<12>(slli16<12 - 4 * q>(v));
  }
};

template <Format F>
struct ByInt16 {
  using L = Int16Layout<F>;
  static constexpr int kLanes16 = 2 * W;
  static constexpr int64_t kCols = int64_t(L::kPhases) * kLanes16;  // columns per block (kBlock bytes of weights)

  struct Activations {
    int64_t full_blocks = 0, tail_bytes = 0;
    const int16_t* x[16] = {};
    const float* scale[16] = {};

    Activations(const bf16* xp, int64_t M, int64_t K) {
      full_blocks = row_bytes<F>(K) / kBlock;
      tail_bytes = row_bytes<F>(K) % kBlock;
      const int64_t blocks = full_blocks + (tail_bytes > 0);
      static thread_local std::vector<int16_t> xbuf;
      static thread_local std::vector<float> sbuf;
      if (int64_t(xbuf.size()) < M * blocks * kCols) xbuf.resize(M * blocks * kCols);
      if (int64_t(sbuf.size()) < M * blocks) sbuf.resize(M * blocks);
      for (int64_t m = 0; m < M; ++m) {
        const bf16* src = xp + m * K;
        int16_t* dst = xbuf.data() + m * blocks * kCols;
        float* sc = sbuf.data() + m * blocks;
        for (int64_t b = 0; b < blocks; ++b) {
          auto value = [&](int64_t c) { return b * kCols + c < K ? to_f32(src[b * kCols + c]) : 0.0f; };
          float top = 0.0f;
          bool finite = true;
          for (int64_t c = 0; c < kCols; ++c) {
            const float v = value(c);
            top = std::max(top, std::fabs(v));
            finite = finite && std::isfinite(v);
          }
          int e = 0;
          std::frexp(top, &e);  // top < 2^e
          const float up = std::ldexp(1.0f, 14 - e);
          sc[b] = finite ? std::ldexp(1.0f, e - 14) : std::numeric_limits<float>::quiet_NaN();
          for (int i = 0; i < kLanes16; ++i)
            for (int p = 0; p < L::kPhases; ++p)
              dst[(b * L::kPhases + p) * kLanes16 + i] = finite ? int16_t(std::lrint(value(L::col(i, p)) * up)) : 0;
        }
        x[m] = dst;
        scale[m] = sc;
      }
    }
  };

  template <int M, int R>
  static void tile(const Activations& xs, int m0, const uint8_t* const* rows, float* out) {
    VF acc[R][M];
    for (int r = 0; r < R; ++r)
      for (int m = 0; m < M; ++m) acc[r][m] = zero();
    auto step = [&](const VI* v, int64_t b) GLM_ALWAYS_INLINE {
      VI sum[R][M];
      for_each_phase([&](auto pc) GLM_ALWAYS_INLINE {
        constexpr int p = decltype(pc)::value;
        VI xp[M];
        for (int m = 0; m < M; ++m) xp[m] = loadu_i(xs.x[m0 + m] + (b * L::kPhases + p) * kLanes16);
        for (int r = 0; r < R; ++r) {
          const VI w = L::template weights<p>(v[r]);
          for (int m = 0; m < M; ++m) sum[r][m] = p == 0 ? madd_i16(w, xp[m]) : add_i32(sum[r][m], madd_i16(w, xp[m]));
        }
      }, std::make_integer_sequence<int, L::kPhases>{});
      for (int m = 0; m < M; ++m) {
        const VF s = set1(xs.scale[m0 + m][b]);
        for (int r = 0; r < R; ++r) acc[r][m] = fmadd(cvt_i32(sum[r][m]), s, acc[r][m]);
      }
    };
    for_each_block<R>(rows, xs.full_blocks, xs.tail_bytes, step);
    for (int r = 0; r < R; ++r)
      for (int m = 0; m < M; ++m) out[r * 16 + m] = reduce_add(acc[r][m]);
  }

  template <int M> static constexpr int rows_per_tile() { return M <= 2 ? 4 : (M <= 4 ? 2 : 1); }

  static void tiles(const Activations& xs, int m0, int mc, const uint8_t* const* rows, int nrows, float* out) {
    with_rows(mc, [&](auto mcon) {
      constexpr int M = decltype(mcon)::value, R = rows_per_tile<M>();
      int r = 0;
      for (; r + R <= nrows; r += R) tile<M, R>(xs, m0, rows + r, out + r * 16);
      for (; r < nrows; ++r) tile<M, 1>(xs, m0, rows + r, out + r * 16);
    });
  }
};

// This tier's kernel: FmaKernel for bf16, ByInt16 for INT8 and INT4.
struct TierKernel {
  static constexpr int kRowsPerPass = FmaKernel::kRowsPerPass;
  template <Format F>
  using Activations = std::conditional_t<F == Format::BF16, FmaKernel::Activations<F>, typename ByInt16<F>::Activations>;
  template <Format F>
  static void tiles(const Activations<F>& xs, int m0, int mc, const uint8_t* const* rows, int nrows, int64_t K,
                    float* out) {
    if constexpr (F == Format::BF16) FmaKernel::tiles<F>(xs, m0, mc, rows, nrows, K, out);
    else ByInt16<F>::tiles(xs, m0, mc, rows, nrows, out);
  }
};

}  // namespace

GLM_DEFINE_GEMV_OPS(TierKernel)

}  // namespace glm_cpu
