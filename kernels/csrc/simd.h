// bf16 <-> fp32 helpers and a small fp32 vector layer over the instruction set a kernel library is compiled for:
// 16 lanes (__m512) with AVX-512F, else 8 lanes (__m256) with AVX2 + FMA. The elementwise kernels (attention, GeGLU,
// the read probe, the fp32 GEMV) are written once against it; each tier's library compiles them with its own -m
// flags (kernels/cpu.py). Conversions to bf16 round to nearest even with NaN -> 0x7FC0, as c10::BFloat16 does.
#pragma once

#include <c10/util/BFloat16.h>

#include <immintrin.h>

#include <cstdint>
#include <cstring>

#if !defined(__AVX2__) || !defined(__FMA__)
#error "the glm_cpu kernels need at least AVX2 and FMA (-mavx2 -mfma)"
#endif

namespace glm_cpu {

using bf16 = uint16_t;

inline float to_f32(bf16 v) {
  uint32_t u = uint32_t(v) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline bf16 to_bf16(float f) { return c10::BFloat16(f).x; }  // round to nearest even

// Software prefetch into L2 this far ahead on each weight stream (helps the hardware prefetcher keep several
// streams going; measured on AMD Zen 4).
#ifndef GLM_PREFETCH_BYTES
#define GLM_PREFETCH_BYTES 1024
#endif
inline void prefetch(const void* p) {
  if (GLM_PREFETCH_BYTES > 0) _mm_prefetch(static_cast<const char*>(p) + GLM_PREFETCH_BYTES, _MM_HINT_T2);
}

namespace simd {

#if defined(__AVX512F__)
constexpr int kLanes = 16;
using VF = __m512;
using VI = __m512i;

inline VF zero() { return _mm512_setzero_ps(); }
inline VF set1(float v) { return _mm512_set1_ps(v); }
inline VI set1i(int32_t v) { return _mm512_set1_epi32(v); }
inline VF loadu(const float* p) { return _mm512_loadu_ps(p); }
inline void storeu(float* p, VF v) { _mm512_storeu_ps(p, v); }
inline VI loadu_i(const void* p) { return _mm512_loadu_si512(p); }
inline VF add(VF a, VF b) { return _mm512_add_ps(a, b); }
inline VF sub(VF a, VF b) { return _mm512_sub_ps(a, b); }
inline VF mul(VF a, VF b) { return _mm512_mul_ps(a, b); }
inline VF div(VF a, VF b) { return _mm512_div_ps(a, b); }
inline VF min(VF a, VF b) { return _mm512_min_ps(a, b); }
inline VF max(VF a, VF b) { return _mm512_max_ps(a, b); }
inline VF fmadd(VF a, VF b, VF c) { return _mm512_fmadd_ps(a, b, c); }    // a * b + c
inline VF fnmadd(VF a, VF b, VF c) { return _mm512_fnmadd_ps(a, b, c); }  // c - a * b
inline VI and_i(VI a, VI b) { return _mm512_and_si512(a, b); }
inline VI or_i(VI a, VI b) { return _mm512_or_si512(a, b); }
inline VI xor_i(VI a, VI b) { return _mm512_xor_si512(a, b); }
template <int n> inline VI slli32(VI a) { return _mm512_slli_epi32(a, n); }
inline VF as_f(VI a) { return _mm512_castsi512_ps(a); }
inline VI as_i(VF a) { return _mm512_castps_si512(a); }
inline VF cvt_i32(VI a) { return _mm512_cvtepi32_ps(a); }
inline VI add_i32(VI a, VI b) { return _mm512_add_epi32(a, b); }
inline VI madd_i16(VI a, VI b) { return _mm512_madd_epi16(a, b); }  // int16 pairs multiplied, each pair summed
template <int n> inline VI slli16(VI a) { return _mm512_slli_epi16(a, n); }
template <int n> inline VI srai16(VI a) { return _mm512_srai_epi16(a, n); }
template <int n> inline VI srli16(VI a) { return _mm512_srli_epi16(a, n); }
inline VI sub_i32(VI a, VI b) { return _mm512_sub_epi32(a, b); }
inline VI add_i16(VI a, VI b) { return _mm512_add_epi16(a, b); }
inline VI set1i8(int8_t v) { return _mm512_set1_epi8(v); }
inline VI set1i16(int16_t v) { return _mm512_set1_epi16(v); }
inline VI zero_i() { return _mm512_setzero_si512(); }
inline VI maddubs_i8(VI u, VI s) { return _mm512_maddubs_epi16(u, s); }  // uint8 x int8 pairs, each pair summed
inline VI max_i32(VI a, VI b) { return _mm512_max_epi32(a, b); }
inline VI min_i32(VI a, VI b) { return _mm512_min_epi32(a, b); }
inline VI round_i32(VF a) { return _mm512_cvtps_epi32(a); }  // to nearest even (the default rounding mode)
inline void storeu_i(void* p, VI v) { _mm512_storeu_si512(p, v); }
inline float reduce_add(VF v) { return _mm512_reduce_add_ps(v); }
inline VF round_nearest(VF v) { return _mm512_roundscale_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
inline VF scale_pow2(VF p, VF n) { return _mm512_scalef_ps(p, n); }  // p * 2^n, n integer-valued

inline __mmask16 tail_mask16(int64_t n) { return n >= 16 ? 0xFFFF : (__mmask16)((1u << n) - 1u); }
inline VF load_bf16(const bf16* p) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)p)), 16));
}
inline VF load_bf16_n(const bf16* p, int64_t n) {  // the first n < kLanes values, zeros beyond
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(tail_mask16(n), p)), 16));
}
inline VF load_fp16(const uint16_t* p) { return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)p)); }
inline __m256i to_bf16_bits(VF v) {
#if defined(__AVX512BF16__)
  return (__m256i)_mm512_cvtneps_pbh(v);
#else
  const __m512i b = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(b, 16), _mm512_set1_epi32(1));
  __m512i r = _mm512_srli_epi32(_mm512_add_epi32(b, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF))), 16);
  r = _mm512_mask_blend_epi32(_mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), r, _mm512_set1_epi32(0x7FC0));
  return _mm512_cvtepi32_epi16(r);
#endif
}
inline void store_bf16(bf16* p, VF v) { _mm256_storeu_si256((__m256i*)p, to_bf16_bits(v)); }
inline void store_bf16_n(bf16* p, VF v, int64_t n) { _mm256_mask_storeu_epi16(p, tail_mask16(n), to_bf16_bits(v)); }

#else  // AVX2 + FMA
constexpr int kLanes = 8;
using VF = __m256;
using VI = __m256i;

inline VF zero() { return _mm256_setzero_ps(); }
inline VF set1(float v) { return _mm256_set1_ps(v); }
inline VI set1i(int32_t v) { return _mm256_set1_epi32(v); }
inline VF loadu(const float* p) { return _mm256_loadu_ps(p); }
inline void storeu(float* p, VF v) { _mm256_storeu_ps(p, v); }
inline VI loadu_i(const void* p) { return _mm256_loadu_si256((const __m256i*)p); }
inline VF add(VF a, VF b) { return _mm256_add_ps(a, b); }
inline VF sub(VF a, VF b) { return _mm256_sub_ps(a, b); }
inline VF mul(VF a, VF b) { return _mm256_mul_ps(a, b); }
inline VF div(VF a, VF b) { return _mm256_div_ps(a, b); }
inline VF min(VF a, VF b) { return _mm256_min_ps(a, b); }
inline VF max(VF a, VF b) { return _mm256_max_ps(a, b); }
inline VF fmadd(VF a, VF b, VF c) { return _mm256_fmadd_ps(a, b, c); }
inline VF fnmadd(VF a, VF b, VF c) { return _mm256_fnmadd_ps(a, b, c); }
inline VI and_i(VI a, VI b) { return _mm256_and_si256(a, b); }
inline VI or_i(VI a, VI b) { return _mm256_or_si256(a, b); }
inline VI xor_i(VI a, VI b) { return _mm256_xor_si256(a, b); }
template <int n> inline VI slli32(VI a) { return _mm256_slli_epi32(a, n); }
inline VF as_f(VI a) { return _mm256_castsi256_ps(a); }
inline VI as_i(VF a) { return _mm256_castps_si256(a); }
inline VF cvt_i32(VI a) { return _mm256_cvtepi32_ps(a); }
inline VI add_i32(VI a, VI b) { return _mm256_add_epi32(a, b); }
inline VI madd_i16(VI a, VI b) { return _mm256_madd_epi16(a, b); }
template <int n> inline VI slli16(VI a) { return _mm256_slli_epi16(a, n); }
template <int n> inline VI srai16(VI a) { return _mm256_srai_epi16(a, n); }
template <int n> inline VI srli16(VI a) { return _mm256_srli_epi16(a, n); }
inline VI sub_i32(VI a, VI b) { return _mm256_sub_epi32(a, b); }
inline VI add_i16(VI a, VI b) { return _mm256_add_epi16(a, b); }
inline VI set1i8(int8_t v) { return _mm256_set1_epi8(v); }
inline VI set1i16(int16_t v) { return _mm256_set1_epi16(v); }
inline VI zero_i() { return _mm256_setzero_si256(); }
inline VI maddubs_i8(VI u, VI s) { return _mm256_maddubs_epi16(u, s); }
inline VI max_i32(VI a, VI b) { return _mm256_max_epi32(a, b); }
inline VI min_i32(VI a, VI b) { return _mm256_min_epi32(a, b); }
inline VI round_i32(VF a) { return _mm256_cvtps_epi32(a); }
inline void storeu_i(void* p, VI v) { _mm256_storeu_si256((__m256i*)p, v); }
inline float reduce_add(VF v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
inline VF round_nearest(VF v) { return _mm256_round_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
inline VF scale_pow2(VF p, VF n) {  // p * 2^n for integer-valued n in [-126, 127]
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

inline VF load_bf16(const bf16* p) {
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)p)), 16));
}
inline VF load_bf16_n(const bf16* p, int64_t n) {  // the first n < kLanes values, zeros beyond
  alignas(16) bf16 tmp[kLanes] = {};
  std::memcpy(tmp, p, size_t(n) * sizeof(bf16));
  return load_bf16(tmp);
}
inline VF load_fp16(const uint16_t* p) { return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)p)); }  // F16C
inline __m128i to_bf16_bits(VF v) {
  const __m256i b = _mm256_castps_si256(v);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(b, 16), _mm256_set1_epi32(1));
  __m256i r = _mm256_srli_epi32(_mm256_add_epi32(b, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7FFF))), 16);
  r = _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7FC0), _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q)));
  return _mm256_castsi256_si128(_mm256_permute4x64_epi64(_mm256_packus_epi32(r, r), 0xD8));
}
inline void store_bf16(bf16* p, VF v) { _mm_storeu_si128((__m128i*)p, to_bf16_bits(v)); }
inline void store_bf16_n(bf16* p, VF v, int64_t n) {
  alignas(16) bf16 tmp[kLanes];
  _mm_store_si128((__m128i*)tmp, to_bf16_bits(v));
  std::memcpy(p, tmp, size_t(n) * sizeof(bf16));
}
#endif

// exp(x) for x in [-87, 88]: 2^n * p(r), |r| <= ln2/2, degree-6 polynomial (relative error ~2e-7).
inline VF exp(VF x) {
  x = max(min(x, set1(88.0f)), set1(-87.0f));
  const VF n = round_nearest(mul(x, set1(1.44269504088896341f)));
  VF r = fnmadd(n, set1(0.693359375f), x);
  r = fnmadd(n, set1(-2.12194440e-4f), r);
  VF p = set1(1.0f / 720);
  p = fmadd(p, r, set1(1.0f / 120));
  p = fmadd(p, r, set1(1.0f / 24));
  p = fmadd(p, r, set1(1.0f / 6));
  p = fmadd(p, r, set1(0.5f));
  p = fmadd(p, r, set1(1.0f));
  p = fmadd(p, r, set1(1.0f));
  return scale_pow2(p, n);
}

// erf(x), Abramowitz & Stegun 7.1.26 (absolute error <= 1.5e-7).
inline VF erf(VF x) {
  const VI sign = and_i(as_i(x), set1i(int32_t(0x80000000u)));
  const VF ax = as_f(xor_i(as_i(x), sign));
  const VF t = div(set1(1.0f), fmadd(ax, set1(0.3275911f), set1(1.0f)));
  VF y = set1(1.061405429f);
  y = fmadd(y, t, set1(-1.453152027f));
  y = fmadd(y, t, set1(1.421413741f));
  y = fmadd(y, t, set1(-0.284496736f));
  y = fmadd(y, t, set1(0.254829592f));
  y = mul(y, t);
  const VF e = exp(sub(zero(), mul(ax, ax)));
  return as_f(or_i(as_i(fnmadd(y, e, set1(1.0f))), sign));
}

}  // namespace simd
}  // namespace glm_cpu
