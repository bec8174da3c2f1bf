// The GEMV tiles of the avx512bf16 tier: AVX-512 BF16 dot products (vdpbf16ps, 32 bf16 products per instruction,
// fp32 accumulation). Integer weights become exact bf16 values with integer instructions first. The driver (row
// chunks, streams, output) is gemv.h's.
#include <ATen/ATen.h>

#include <immintrin.h>

#include <type_traits>

#include "gemv.h"

#if !defined(__AVX512BF16__) || !defined(__AVX512BW__) || !defined(__AVX512VL__)
#error "gemv_avx512bf16.cpp needs -mavx512f -mavx512bw -mavx512vl -mavx512dq -mavx512bf16"
#endif

namespace glm_cpu {
namespace {

inline __m512bh as_bh(__m512i v) { return (__m512bh)v; }
inline __mmask32 tail_mask32(int64_t n) { return n >= 32 ? 0xFFFFFFFFu : (__mmask32)((1u << n) - 1u); }
inline __mmask16 tail_mask16(int64_t n) { return n >= 16 ? 0xFFFF : (__mmask16)((1u << n) - 1u); }

inline __m512bh int8x32_to_bf16(__m128i lo, __m128i hi) {
  __m512 flo = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(lo));
  __m512 fhi = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(hi));
  return _mm512_cvtne2ps_pbh(fhi, flo);  // exact: |q| <= 128 fits bf16's 8-bit significand
}

// Integer weights become bf16 with integer instructions only (the conversion unit is the bottleneck otherwise):
// for a 4-bit field n, the bf16 with bits 0x4300 | n is exactly 128 + n, and n ^ 8 turns a two's-complement nibble
// q into q + 8. So a weight w is fed to the dot product as an exact bf16 of (w + bias), and bias * sum(x) is
// subtracted from the row sum at the end (fp32; the extra rounding is ~1e-5 relative, far below bf16's 4e-3).
// One chunk of a weight row as bf16 vectors: BF16 and INT8 give 32 weights (one vector), INT4 gives 64 weights as
// two vectors (even columns, odd columns). `n` < full chunk means a masked tail.
template <Format F> struct Chunk;

// 32 weights as one bf16 vector against 32 consecutive activations.
struct OneVector {
  static constexpr int64_t kWeights = 32;
  static constexpr float kBias = 0.0f;
  static constexpr int kParts = 1;
  __m512bh v;
  template <class X> inline __m512 dot(__m512 acc, const X& x, int64_t k) const {
    return _mm512_dpbf16_ps(acc, v, as_bh(_mm512_loadu_si512(x.x + k)));
  }
  template <class X> inline __m512 dot_tail(__m512 acc, const X& x, int64_t k, int64_t n) const {
    return _mm512_dpbf16_ps(acc, v, as_bh(_mm512_maskz_loadu_epi16(tail_mask32(n), x.x + k)));
  }
};

template <> struct Chunk<Format::BF16> : OneVector {
  static constexpr int64_t kBytes = 64;
  inline void load(const uint8_t* p) { v = as_bh(_mm512_loadu_si512(p)); }
  inline void load_tail(const uint8_t* p, int64_t n) { v = as_bh(_mm512_maskz_loadu_epi16(tail_mask32(n), p)); }
};

template <> struct Chunk<Format::INT8> : OneVector {
  static constexpr int64_t kBytes = 32;
  inline void load(const uint8_t* p) {
    v = int8x32_to_bf16(_mm_loadu_si128((const __m128i*)p), _mm_loadu_si128((const __m128i*)(p + 16)));
  }
  inline void load_tail(const uint8_t* p, int64_t n) {
    v = int8x32_to_bf16(_mm_maskz_loadu_epi8(tail_mask16(n), p), _mm_maskz_loadu_epi8(tail_mask16(n > 16 ? n - 16 : 0), p + 16));
  }
};

template <> struct Chunk<Format::INT4> {
  static constexpr int64_t kWeights = 64, kBytes = 32;
  static constexpr float kBias = 136.0f;  // each nibble q is fed as 136 + q (0x4300 | (n ^ 8))
  static constexpr int kParts = 2;
  __m512bh hi, lo;
  inline void decode(__m512i wb) {
    const __m512i magic = _mm512_set1_epi16(0x4308);
    hi = as_bh(_mm512_xor_si512(_mm512_srli_epi16(wb, 4), magic));                            // even columns
    lo = as_bh(_mm512_ternarylogic_epi32(wb, _mm512_set1_epi16(0x0F), magic, 0x6A));  // (wb & 15) ^ magic: odd
  }
  inline void load(const uint8_t* p) { decode(_mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i*)p))); }
  inline void load_tail(const uint8_t* p, int64_t n) {  // n weights = n / 2 bytes (x is zero beyond: no bias)
    decode(_mm512_cvtepu8_epi16(_mm256_maskz_loadu_epi8(tail_mask32(n / 2), p)));
  }
  template <class X> inline __m512 dot(__m512 acc, const X& x, int64_t k) const {
    acc = _mm512_dpbf16_ps(acc, hi, as_bh(_mm512_loadu_si512(x.xe + k / 2)));
    return _mm512_dpbf16_ps(acc, lo, as_bh(_mm512_loadu_si512(x.xo + k / 2)));
  }
  template <class X> inline void dot2(__m512& a, __m512& b, const X& x, int64_t k) const {
    a = _mm512_dpbf16_ps(a, hi, as_bh(_mm512_loadu_si512(x.xe + k / 2)));
    b = _mm512_dpbf16_ps(b, lo, as_bh(_mm512_loadu_si512(x.xo + k / 2)));
  }
  template <class X> inline __m512 dot_tail(__m512 acc, const X& x, int64_t k, int64_t n) const {
    const __mmask32 mk = tail_mask32(n / 2);
    acc = _mm512_dpbf16_ps(acc, hi, as_bh(_mm512_maskz_loadu_epi16(mk, x.xe + k / 2)));
    return _mm512_dpbf16_ps(acc, lo, as_bh(_mm512_maskz_loadu_epi16(mk, x.xo + k / 2)));
  }
};

// INT8 for one or two activation rows: q = 16 * (q >> 4) + (q & 15), both parts 4-bit fields fed as exact bf16:
// 16 * (136 + (q >> 4)) = bits 0x4500 | (n_high ^ 8), and 128 + (q & 15) = bits 0x4300 | n_low; bias 2176 + 128.
// Two dot products per 32 weights but no conversion instructions: faster than Chunk<INT8> for M <= 2.
struct ChunkInt8Nibbles {
  static constexpr int64_t kWeights = 32, kBytes = 32;
  static constexpr float kBias = 2304.0f;
  static constexpr int kParts = 2;
  __m512bh hi, lo;
  inline void decode(__m512i wb) {
    hi = as_bh(_mm512_xor_si512(_mm512_srli_epi16(wb, 4), _mm512_set1_epi16(0x4508)));
    lo = as_bh(_mm512_ternarylogic_epi32(wb, _mm512_set1_epi16(0x0F), _mm512_set1_epi16(0x4300), 0xEA));  // (a&b)|c
  }
  inline void load(const uint8_t* p) { decode(_mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i*)p))); }
  inline void load_tail(const uint8_t* p, int64_t n) { decode(_mm512_cvtepu8_epi16(_mm256_maskz_loadu_epi8(tail_mask32(n), p))); }
  template <class X> inline __m512 dot(__m512 acc, const X& x, int64_t k) const {
    const __m512bh xv = as_bh(_mm512_loadu_si512(x.x + k));
    return _mm512_dpbf16_ps(_mm512_dpbf16_ps(acc, hi, xv), lo, xv);
  }
  template <class X> inline void dot2(__m512& a, __m512& b, const X& x, int64_t k) const {
    const __m512bh xv = as_bh(_mm512_loadu_si512(x.x + k));
    a = _mm512_dpbf16_ps(a, hi, xv);
    b = _mm512_dpbf16_ps(b, lo, xv);
  }
  template <class X> inline __m512 dot_tail(__m512 acc, const X& x, int64_t k, int64_t n) const {
    const __m512bh xv = as_bh(_mm512_maskz_loadu_epi16(tail_mask32(n), x.x + k));
    return _mm512_dpbf16_ps(_mm512_dpbf16_ps(acc, hi, xv), lo, xv);
  }
};

// The horizontal sums of four vectors, as one 4-vector (a transpose-and-add tree).
inline __m128 hsum4(__m512 a, __m512 b, __m512 c, __m512 d) {
  const __m512 ab = _mm512_add_ps(_mm512_shuffle_f32x4(a, b, _MM_SHUFFLE(1, 0, 1, 0)),
                                  _mm512_shuffle_f32x4(a, b, _MM_SHUFFLE(3, 2, 3, 2)));
  const __m512 cd = _mm512_add_ps(_mm512_shuffle_f32x4(c, d, _MM_SHUFFLE(1, 0, 1, 0)),
                                  _mm512_shuffle_f32x4(c, d, _MM_SHUFFLE(3, 2, 3, 2)));
  __m512 t = _mm512_add_ps(_mm512_shuffle_f32x4(ab, cd, _MM_SHUFFLE(2, 0, 2, 0)),
                           _mm512_shuffle_f32x4(ab, cd, _MM_SHUFFLE(3, 1, 3, 1)));  // 128-bit lanes: a, b, c, d
  t = _mm512_add_ps(t, _mm512_permute_ps(t, _MM_SHUFFLE(2, 3, 0, 1)));
  t = _mm512_add_ps(t, _mm512_permute_ps(t, _MM_SHUFFLE(1, 0, 3, 2)));
  return _mm512_castps512_ps128(_mm512_permutexvar_ps(_mm512_setr_epi32(0, 4, 8, 12, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0), t));
}

struct RowX {  // one activation row
  const bf16* x;
  const bf16* xe;
  const bf16* xo;
  float sum;  // sum of the row (for the weight bias of the integer formats)
};

// The chunk decoder used for M activation rows.
template <Format F, int M>
using ChunkFor = std::conditional_t<F == Format::INT8 && M <= 2, ChunkInt8Nibbles, Chunk<F>>;

// out[r * 16 + m] = <weight row r, x row m> for R weight rows (any addresses) and M activation rows.
// U chunks per row and step give U independent accumulator chains per (r, m).
template <Format F, int M, int R, int U>
inline void tile_dot(const RowX* xs, const uint8_t* const* rows, int64_t K, float* out) {
  using C = ChunkFor<F, M>;
  constexpr int64_t CW = C::kWeights, CB = C::kBytes;
  __m512 acc[R][U][M];
  for (int r = 0; r < R; ++r)
    for (int u = 0; u < U; ++u)
      for (int m = 0; m < M; ++m) acc[r][u][m] = _mm512_setzero_ps();
  int64_t k = 0, byte = 0;
  C c;
  if constexpr (C::kParts == 2 && U == 2) {  // two bf16 vectors per chunk: one accumulator set each
    for (; k + CW <= K; k += CW, byte += CB) {
      for (int r = 0; r < R; ++r) {
        if (CB >= 64 || (byte & 63) == 0) prefetch(rows[r] + byte);
        c.load(rows[r] + byte);
        for (int m = 0; m < M; ++m) c.dot2(acc[r][0][m], acc[r][1][m], xs[m], k);
      }
    }
  } else {
    for (; k + U * CW <= K; k += U * CW, byte += U * CB) {
      for (int r = 0; r < R; ++r) {
        for (int u = 0; u < U; ++u) {
          if (((byte + u * CB) & 63) == 0) prefetch(rows[r] + byte + u * CB);
          c.load(rows[r] + byte + u * CB);
          for (int m = 0; m < M; ++m) acc[r][u][m] = c.dot(acc[r][u][m], xs[m], k + u * CW);
        }
      }
    }
  }
  for (; k + CW <= K; k += CW, byte += CB) {
    for (int r = 0; r < R; ++r) {
      c.load(rows[r] + byte);
      for (int m = 0; m < M; ++m) acc[r][0][m] = c.dot(acc[r][0][m], xs[m], k);
    }
  }
  if (k < K) {
    for (int r = 0; r < R; ++r) {
      c.load_tail(rows[r] + byte, K - k);
      for (int m = 0; m < M; ++m) acc[r][0][m] = c.dot_tail(acc[r][0][m], xs[m], k, K - k);
    }
  }
  for (int m = 0; m < M; ++m) {
    __m512 t[R];
    for (int r = 0; r < R; ++r) {
      t[r] = acc[r][0][m];
      for (int u = 1; u < U; ++u) t[r] = _mm512_add_ps(t[r], acc[r][u][m]);
    }
    const float correction = C::kBias * xs[m].sum;
    int r = 0;
    for (; r + 4 <= R; r += 4) {
      alignas(16) float s4[4];
      _mm_store_ps(s4, hsum4(t[r], t[r + 1], t[r + 2], t[r + 3]));
      for (int i = 0; i < 4; ++i) out[(r + i) * 16 + m] = s4[i] - correction;
    }
    for (; r < R; ++r) out[r * 16 + m] = _mm512_reduce_add_ps(t[r]) - correction;
  }
}

template <int M> constexpr int tile_rows() { return M <= 4 ? 4 : 2; }
#ifndef GLM_UNROLL1
#define GLM_UNROLL1 2
#endif
// Accumulator sets per (row, activation row): two-part chunks get one set per part while registers allow.
template <Format F, int M> constexpr int tile_unroll() {
  return ChunkFor<F, M>::kParts == 2 ? (tile_rows<M>() * M <= 8 ? 2 : 1) : (M == 1 ? GLM_UNROLL1 : 1);
}

template <Format F, int M>
void tile_any_rows(const RowX* xs, const uint8_t* const* rows, int nrows, int64_t K, float* out) {
  constexpr int R = tile_rows<M>(), U = tile_unroll<F, M>();
  int r = 0;
  for (; r + R <= nrows; r += R) tile_dot<F, M, R, U>(xs, rows + r, K, out + r * 16);
  for (; r < nrows; ++r) tile_dot<F, M, 1, U>(xs, rows + r, K, out + r * 16);
}

template <Format F>
void tile_dispatch(const RowX* xs, int mc, const uint8_t* const* rows, int nrows, int64_t K, float* out) {
  switch (mc) {
    case 1: return tile_any_rows<F, 1>(xs, rows, nrows, K, out);
    case 2: return tile_any_rows<F, 2>(xs, rows, nrows, K, out);
    case 3: return tile_any_rows<F, 3>(xs, rows, nrows, K, out);
    case 4: return tile_any_rows<F, 4>(xs, rows, nrows, K, out);
    case 5: return tile_any_rows<F, 5>(xs, rows, nrows, K, out);
    case 6: return tile_any_rows<F, 6>(xs, rows, nrows, K, out);
    case 7: return tile_any_rows<F, 7>(xs, rows, nrows, K, out);
    default: return tile_any_rows<F, 8>(xs, rows, nrows, K, out);
  }
}

inline float row_sum(const bf16* x, int64_t n) {
  __m512 acc = _mm512_setzero_ps();
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) acc = _mm512_add_ps(acc, simd::load_bf16(x + i));
  if (i < n) acc = _mm512_add_ps(acc, simd::load_bf16_n(x + i, n - i));
  return _mm512_reduce_add_ps(acc);
}

// even[j] = x[2j], odd[j] = x[2j + 1] for j < n.
inline void deinterleave(const bf16* x, int64_t n, bf16* even, bf16* odd) {
  alignas(64) static constexpr uint16_t kEven[32] = {0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30,
                                                     32, 34, 36, 38, 40, 42, 44, 46, 48, 50, 52, 54, 56, 58, 60, 62};
  const __m512i ie = _mm512_load_si512(kEven), io = _mm512_add_epi16(ie, _mm512_set1_epi16(1));
  int64_t j = 0;
  for (; j + 32 <= n; j += 32) {
    const __m512i a = _mm512_loadu_si512(x + 2 * j), b = _mm512_loadu_si512(x + 2 * j + 32);
    _mm512_storeu_si512(even + j, _mm512_permutex2var_epi16(a, ie, b));
    _mm512_storeu_si512(odd + j, _mm512_permutex2var_epi16(a, io, b));
  }
  for (; j < n; ++j) {
    even[j] = x[2 * j];
    odd[j] = x[2 * j + 1];
  }
}


// x once per call: the rows as they are (BF16, INT8), de-interleaved into even and odd columns (INT4: even columns
// pair with high nibbles, odd with low), and each row's sum for the integer formats' weight bias.
struct Bf16DotKernel {
  static constexpr int kRowsPerPass = 8;
  template <Format F> struct Activations {
    RowX rows[16] = {};
    at::Tensor split;
    Activations(const bf16* xp, int64_t M, int64_t K) {
      if (F == Format::INT4) {
        split = at::empty({2, M, K / 2}, at::TensorOptions().dtype(at::kBFloat16));
        bf16* sp = reinterpret_cast<bf16*>(split.data_ptr<at::BFloat16>());
        for (int64_t m = 0; m < M; ++m) {
          rows[m].xe = sp + m * (K / 2);
          rows[m].xo = sp + (M + m) * (K / 2);
          deinterleave(xp + m * K, K / 2, const_cast<bf16*>(rows[m].xe), const_cast<bf16*>(rows[m].xo));
        }
      } else {
        for (int64_t m = 0; m < M; ++m) rows[m].x = xp + m * K;
      }
      if (F != Format::BF16)
        for (int64_t m = 0; m < M; ++m) rows[m].sum = row_sum(xp + m * K, K);
    }
  };
  template <Format F>
  static void tiles(const Activations<F>& xs, int m0, int mc, const uint8_t* const* rows, int nrows, int64_t K,
                    float* out) {
    tile_dispatch<F>(xs.rows + m0, mc, rows, nrows, K, out);
  }
};

}  // namespace

GLM_DEFINE_GEMV_OPS(Bf16DotKernel)

}  // namespace glm_cpu
