// The GEMV tiles of the avx512 and avx2 tiers, for CPUs without AVX-512 BF16: fp32 FMA on 16 (AVX-512F) or 8
// (AVX2) lanes for bf16 weights (FmaKernel), 16-bit integer products for INT8 (Int8ByInt16, below), byte products
// for INT4 (Int4ByBytes). The driver (row chunks, streams, output) is gemv.h's.
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
          if ((b + 1) * kBlockWeights <= K) {  // x read as the weights are: the same vector, the same phases
            const VI v = loadu_i(src + b * kBlockWeights);
            for_each_phase([&](auto pc) {
              constexpr int p = decltype(pc)::value;
              storeu(db + p * W, L::template weights<p>(v));
            }, std::make_integer_sequence<int, kPhases>{});
            continue;
          }
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

// x rounded to integers for the INT8 and INT4 kernels, per span of n columns (a block or group, n a multiple of W):
// X = round(x * 2^(14 - e)) with 2^e > max |x| of the span, X <= 2^14 - 1 (so X splits into two int8 halves), an
// error of at most 2^-14 of the span's largest |x|. Columns from n_valid on are 0. Writes X[0, n); returns the span's
// scale 2^(e - 14), or NaN (X all 0) when an x is not finite, so the output is NaN as in the fp32 path.
inline float round_span(const bf16* src, int64_t n_valid, int64_t n, int32_t* X) {
  auto load = [&](int64_t c) {
    return c + W <= n_valid ? load_bf16(src + c) : (c < n_valid ? load_bf16_n(src + c, n_valid - c) : zero());
  };
  VI top = zero_i();
  for (int64_t c = 0; c < n; c += W) top = max_i32(top, and_i(as_i(load(c)), set1i(0x7FFFFFFF)));
  alignas(64) int32_t lanes[W];
  storeu_i(lanes, top);
  int32_t bits = 0;
  for (int i = 0; i < W; ++i) bits = std::max(bits, lanes[i]);
  if (bits >= 0x7F800000) {  // inf or NaN
    std::fill(X, X + n, 0);
    return std::numeric_limits<float>::quiet_NaN();
  }
  float top_value;
  std::memcpy(&top_value, &bits, 4);
  int e = 0;
  std::frexp(top_value, &e);  // top < 2^e
  e = std::max(e, -100);      // spans of subnormal-sized x: 2^(14 - e) stays finite
  const VF up = set1(std::ldexp(1.0f, 14 - e));
  for (int64_t c = 0; c < n; c += W) storeu_i(X + c, min_i32(round_i32(mul(load(c), up)), set1i((1 << 14) - 1)));
  return std::ldexp(1.0f, e - 14);
}

// INT8 by 16-bit integer products (vpmaddwd), faster than widening every weight to fp32 (fewer instructions per
// weight: shifts sign-extend a byte in place, one madd multiplies 2W of them). Each 16-bit lane i of a weight vector
// holds the weights of columns 2i (low byte, phase 0) and 2i + 1 (phase 1) of its block of kCols columns (kBlock
// bytes); x is rounded once per call per block (round_span) and laid out phase by phase to match. The madds of a
// block sum in int32 (|sum| < 2^23) and go into the fp32 accumulator once per block, times the block's scale.
struct Int8ByInt16 {
  static constexpr int kPhases = 2;
  static constexpr int kLanes16 = 2 * W;
  static constexpr int64_t kCols = kBlock;  // columns per block

  template <int p> static inline VI weights(VI v) {
    if constexpr (p == 1) return srai16<8>(v);
    else return srai16<8>(slli16<8>(v));
  }

  struct Activations {
    int64_t full_blocks = 0, tail_bytes = 0;
    const int16_t* x[16] = {};
    const float* scale[16] = {};

    Activations(const bf16* xp, int64_t M, int64_t K) {
      full_blocks = K / kBlock;
      tail_bytes = K % kBlock;
      const int64_t blocks = full_blocks + (tail_bytes > 0);
      static thread_local std::vector<int16_t> xbuf;
      static thread_local std::vector<float> sbuf;
      if (int64_t(xbuf.size()) < M * blocks * kCols) xbuf.resize(M * blocks * kCols);
      if (int64_t(sbuf.size()) < M * blocks) sbuf.resize(M * blocks);
      alignas(64) int32_t X[kCols];
      for (int64_t m = 0; m < M; ++m) {
        int16_t* dst = xbuf.data() + m * blocks * kCols;
        float* sc = sbuf.data() + m * blocks;
        for (int64_t b = 0; b < blocks; ++b) {
          sc[b] = round_span(xp + m * K + b * kCols, K - b * kCols, kCols, X);
          int16_t* db = dst + b * kCols;
          for (int i = 0; i < kLanes16; ++i) {
            db[i] = int16_t(X[2 * i]);
            db[kLanes16 + i] = int16_t(X[2 * i + 1]);
          }
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
        for (int m = 0; m < M; ++m) xp[m] = loadu_i(xs.x[m0 + m] + (b * kPhases + p) * kLanes16);
        for (int r = 0; r < R; ++r) {
          const VI w = weights<p>(v[r]);
          for (int m = 0; m < M; ++m) sum[r][m] = p == 0 ? madd_i16(w, xp[m]) : add_i32(sum[r][m], madd_i16(w, xp[m]));
        }
      }, std::make_integer_sequence<int, kPhases>{});
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
};

// INT4 by byte products (vpmaddubsw: uint8 x int8, adjacent pairs summed to int16), which needs fewer and cheaper
// instructions per weight than 16-bit products (one shift per 2W weight bytes; the rest are ands and adds).
// Nibbles become unsigned by a xor with 8 (u = w + 8, 0..15): byte j of a block's lo vector is u of column 2j + 1
// (the low nibble), of its hi vector u of column 2j. x is rounded once per call per group of kGroup blocks
// (round_span) and split into two int8 halves, X = 128 h + l with l = X & 127, so sum u X = 128 sum u h + sum u l.
// The int16 sums stay below 2^15 over a group (2 * kGroup products of pairs of at most 15 * 128), go to int32 once
// per group (vpmaddwd by 128 and by 1), lose the offset's 8 * sum X lane by lane (exactly, in int32: each lane is
// then a true partial sum below 2^22, exact in fp32) and enter the fp32 accumulator times the group's scale.
struct Int4ByBytes {
  static constexpr int64_t kCols = 2 * kBlock;  // columns per block (kBlock bytes of nibbles)
  static constexpr int64_t kGroup = 4;          // blocks per scale of x
  static constexpr int kHalves = 4;             // x vectors per block: h of hi, h of lo, l of hi, l of lo

  struct Activations {
    int64_t full_blocks = 0, tail_bytes = 0;
    const int8_t* x[16] = {};
    const float* scale[16] = {};
    const int32_t* offset[16] = {};  // per group and int32 lane: 8 * sum X over the columns that lane sums

    Activations(const bf16* xp, int64_t M, int64_t K) {
      full_blocks = row_bytes<Format::INT4>(K) / kBlock;
      tail_bytes = row_bytes<Format::INT4>(K) % kBlock;
      const int64_t blocks = full_blocks + (tail_bytes > 0), groups = (blocks + kGroup - 1) / kGroup;
      const int64_t xlen = groups * kGroup * kHalves * kBlock, gcols = kGroup * kCols;
      static thread_local std::vector<int8_t> xbuf;
      static thread_local std::vector<float> sbuf;
      static thread_local std::vector<int32_t> obuf;
      if (int64_t(xbuf.size()) < M * xlen) xbuf.resize(M * xlen);
      if (int64_t(sbuf.size()) < M * groups) sbuf.resize(M * groups);
      if (int64_t(obuf.size()) < M * groups * W) obuf.resize(M * groups * W);
      alignas(64) int32_t X[gcols];
      for (int64_t m = 0; m < M; ++m) {
        for (int64_t g = 0; g < groups; ++g) {
          sbuf[m * groups + g] = round_span(xp + m * K + g * gcols, K - g * gcols, gcols, X);
          int32_t* off = obuf.data() + (m * groups + g) * W;
          std::fill(off, off + W, 0);
          for (int64_t j = 0; j < gcols / 2; ++j) {
            const int32_t even = X[2 * j], odd = X[2 * j + 1];
            int8_t* block = xbuf.data() + m * xlen + (g * kGroup + j / kBlock) * kHalves * kBlock + j % kBlock;
            block[0] = int8_t(even >> 7);
            block[kBlock] = int8_t(odd >> 7);
            block[2 * kBlock] = int8_t(even & 127);
            block[3 * kBlock] = int8_t(odd & 127);
            off[(j % kBlock) / 4] += 8 * (even + odd);  // int32 lane i sums weight bytes 4i..4i+3 of each block
          }
        }
        x[m] = xbuf.data() + m * xlen;
        scale[m] = sbuf.data() + m * groups;
        offset[m] = obuf.data() + m * groups * W;
      }
    }
  };

  template <int M, int R>
  static void tile(const Activations& xs, int m0, const uint8_t* const* rows, float* out) {
    const int64_t last = xs.full_blocks + (xs.tail_bytes > 0) - 1;
    VF acc[R][M];
    VI sh[R][M], sl[R][M];
    for (int r = 0; r < R; ++r)
      for (int m = 0; m < M; ++m) acc[r][m] = zero(), sh[r][m] = zero_i(), sl[r][m] = zero_i();
    const VI flip = set1i8(int8_t(0x88)), low = set1i8(0x0F), by128 = set1i16(128), by1 = set1i16(1);
    auto step = [&](const VI* v, int64_t b) GLM_ALWAYS_INLINE {
      VI hi[R], lo[R];
      for (int r = 0; r < R; ++r) {
        const VI u = xor_i(v[r], flip);
        lo[r] = and_i(u, low);
        hi[r] = and_i(srli16<4>(u), low);
      }
      for (int m = 0; m < M; ++m) {
        const int8_t* xb = xs.x[m0 + m] + b * kHalves * kBlock;
        const VI h_hi = loadu_i(xb), h_lo = loadu_i(xb + kBlock), l_hi = loadu_i(xb + 2 * kBlock),
                 l_lo = loadu_i(xb + 3 * kBlock);
        for (int r = 0; r < R; ++r) {
          sh[r][m] = add_i16(sh[r][m], add_i16(maddubs_i8(hi[r], h_hi), maddubs_i8(lo[r], h_lo)));
          sl[r][m] = add_i16(sl[r][m], add_i16(maddubs_i8(hi[r], l_hi), maddubs_i8(lo[r], l_lo)));
        }
      }
      if (b % kGroup == kGroup - 1 || b == last) {
        const int64_t g = b / kGroup;
        for (int m = 0; m < M; ++m) {
          const VF s = set1(xs.scale[m0 + m][g]);
          const VI off = loadu_i(xs.offset[m0 + m] + g * W);
          for (int r = 0; r < R; ++r) {
            const VI sum = sub_i32(add_i32(madd_i16(sh[r][m], by128), madd_i16(sl[r][m], by1)), off);
            acc[r][m] = fmadd(cvt_i32(sum), s, acc[r][m]);
            sh[r][m] = zero_i();
            sl[r][m] = zero_i();
          }
        }
      }
    };
    for_each_block<R>(rows, xs.full_blocks, xs.tail_bytes, step);
    for (int r = 0; r < R; ++r)
      for (int m = 0; m < M; ++m) out[r * 16 + m] = reduce_add(acc[r][m]);
  }

  // Tile shapes: the int16 sums, accumulators and decoded weights of R rows within the register file.
  template <int M> static constexpr int rows_per_tile() {
    return W == 16 ? (M == 1 ? 4 : (M == 2 ? 2 : 1)) : (M == 1 ? 2 : 1);
  }
};

// nrows weight rows x mc activation rows through an integer kernel, Kernel::rows_per_tile<M>() weight rows a tile.
template <class Kernel>
void integer_tiles(const typename Kernel::Activations& xs, int m0, int mc, const uint8_t* const* rows, int nrows,
                   float* out) {
  with_rows(mc, [&](auto mcon) {
    constexpr int M = decltype(mcon)::value, R = Kernel::template rows_per_tile<M>();
    int r = 0;
    for (; r + R <= nrows; r += R) Kernel::template tile<M, R>(xs, m0, rows + r, out + r * 16);
    for (; r < nrows; ++r) Kernel::template tile<M, 1>(xs, m0, rows + r, out + r * 16);
  });
}

// This tier's kernel: FmaKernel for bf16, Int8ByInt16 for INT8, Int4ByBytes for INT4.
struct TierKernel {
  static constexpr int kRowsPerPass = FmaKernel::kRowsPerPass;
  template <Format F>
  using Activations = std::conditional_t<
      F == Format::BF16, FmaKernel::Activations<F>,
      std::conditional_t<F == Format::INT8, Int8ByInt16::Activations, Int4ByBytes::Activations>>;
  template <Format F>
  static void tiles(const Activations<F>& xs, int m0, int mc, const uint8_t* const* rows, int nrows, int64_t K,
                    float* out) {
    if constexpr (F == Format::BF16) FmaKernel::tiles<F>(xs, m0, mc, rows, nrows, K, out);
    else if constexpr (F == Format::INT8) integer_tiles<Int8ByInt16>(xs, m0, mc, rows, nrows, out);
    else integer_tiles<Int4ByBytes>(xs, m0, mc, rows, nrows, out);
  }
};

}  // namespace

GLM_DEFINE_GEMV_OPS(TierKernel)

}  // namespace glm_cpu
