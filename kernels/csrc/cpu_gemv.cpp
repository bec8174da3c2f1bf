// CPU kernels for batch-1..16 decoding of GLM on x86 with AVX-512 (F, BW, VL, DQ, BF16).
//
// Decoding at small batch is bound by memory bandwidth: every weight is read once per token. PyTorch's bf16
// matrix x vector path reaches only a fraction of this machine's read bandwidth, so these kernels stream each
// weight row once and do all the arithmetic in registers:
//   gemv_bf16 : y = x W^T (+ b)            x bf16 [M, K], W bf16 [N, K]
//   gemv_int8 : y = (x q^T) * scale (+ b)  q int8 [N, K], one scale per output row (GLM-130B's W8A16 scheme)
//   gemv_int4 : same with q packed [N, K/2]: byte k = (q[2k] << 4) | (q[2k+1] & 0xF), two's-complement nibbles
// Products are bf16 x bf16 accumulated in fp32 (vdpbf16ps); integer weights become exact bf16 values first.
// Fused helpers for one decoding step: RoPE + KV-cache append + attention of one query, GeGLU, residual + LayerNorm.
// Everything computes in fp32 internally and rounds to bf16 once per output (round to nearest even).
// The Python side (kernels/cpu_gemv.py) checks the CPU flags before this file is compiled or loaded.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <functional>
#include <mutex>
#include <thread>
#include <type_traits>
#include <cfloat>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace glm_cpu {
namespace {

using bf16 = uint16_t;

inline float to_f32(bf16 v) {
  uint32_t u = uint32_t(v) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline bf16 to_bf16(float f) { return c10::BFloat16(f).x; }  // round to nearest even

inline __m512 load16_bf16(const bf16* p) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)p)), 16));
}
inline __m512 maskz_load16_bf16(__mmask16 m, const bf16* p) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, p)), 16));
}
inline void store16_bf16(bf16* p, __m512 v) { _mm256_storeu_si256((__m256i*)p, (__m256i)_mm512_cvtneps_pbh(v)); }
inline void mask_store16_bf16(bf16* p, __mmask16 m, __m512 v) {
  _mm256_mask_storeu_epi16(p, m, (__m256i)_mm512_cvtneps_pbh(v));
}
inline __m512bh as_bh(__m512i v) { return (__m512bh)v; }
inline __mmask32 tail_mask32(int64_t n) { return n >= 32 ? 0xFFFFFFFFu : (__mmask32)((1u << n) - 1u); }
inline __mmask16 tail_mask16(int64_t n) { return n >= 16 ? 0xFFFF : (__mmask16)((1u << n) - 1u); }

// ------------------------------------------------------------------------------------------------------------
// A small thread pool with dynamic chunks and no barrier. Decoding makes ~260 short parallel calls per token; with
// OpenMP each call waits for every thread, so when another process holds a core (a shared machine) each call
// stalls for a scheduler time slice. Here the calling thread takes chunks itself and only waits for chunks that a
// helper has actually started: a descheduled helper costs speed, never a stall. Helpers spin briefly between calls
// (decoding calls come every few microseconds), then sleep.

class Pool {
 public:
  static Pool& get() {
    static Pool pool;
    return pool;
  }

  // fn(i) for every i in [0, n), spread over the calling thread and the helpers.
  template <class Fn>
  void run(int64_t n, const Fn& fn) {
    const int want = std::max(1, at::get_num_threads());
    if (n <= 1 || want == 1) {
      for (int64_t i = 0; i < n; ++i) fn(i);
      return;
    }
    std::lock_guard<std::mutex> one_job(run_mu_);  // callers from several threads take turns
    resize(want - 1);
    job_ = [&fn](int64_t i) { fn(i); };
    total_.store(n, std::memory_order_relaxed);
    done_.store(0, std::memory_order_relaxed);
    const uint64_t gen = (next_.load(std::memory_order_relaxed) >> 32) + 1;
    next_.store(gen << 32, std::memory_order_seq_cst);  // publish: generation in the high half, next index low
    if (sleeping_.load(std::memory_order_seq_cst) > 0) {
      std::lock_guard<std::mutex> l(mu_);
      cv_.notify_all();
    }
    participate(gen);
    while (done_.load(std::memory_order_acquire) < n) _mm_pause();  // chunks a helper is still running
  }

 private:
  Pool() = default;
  ~Pool() {
    {
      std::lock_guard<std::mutex> l(mu_);
      stop_ = true;
      cv_.notify_all();
    }
    for (auto& t : workers_) t.join();
  }

  // Take chunks of generation `gen` until none is left (the CAS fails once a newer generation is published).
  void participate(uint64_t gen) {
    for (;;) {
      uint64_t v = next_.load(std::memory_order_acquire);
      for (;;) {
        if ((v >> 32) != gen || int64_t(v & 0xFFFFFFFFu) >= total_.load(std::memory_order_relaxed)) return;
        if (next_.compare_exchange_weak(v, v + 1, std::memory_order_acq_rel)) break;
      }
      job_(int64_t(v & 0xFFFFFFFFu));
      done_.fetch_add(1, std::memory_order_release);
    }
  }

  void worker() {
    uint64_t seen = next_.load(std::memory_order_acquire) >> 32;
    for (;;) {
      int spins = 0;
      uint64_t gen;
      while ((gen = next_.load(std::memory_order_acquire) >> 32) == seen) {
        if (++spins < kSpins) {
          _mm_pause();
          continue;
        }
        std::unique_lock<std::mutex> l(mu_);
        sleeping_.fetch_add(1, std::memory_order_seq_cst);
        cv_.wait_for(l, std::chrono::milliseconds(50),
                     [&] { return stop_ || (next_.load(std::memory_order_seq_cst) >> 32) != seen; });
        sleeping_.fetch_sub(1, std::memory_order_seq_cst);
        if (stop_) return;
        spins = 0;
      }
      seen = gen;
      participate(gen);
    }
  }

  void resize(int helpers) {
    if (int(workers_.size()) >= helpers) return;  // extra helpers just find no work
    while (int(workers_.size()) < helpers) workers_.emplace_back([this] { worker(); });
  }

#ifndef GLM_SPINS
#define GLM_SPINS 200000
#endif
  static constexpr int kSpins = GLM_SPINS;
  std::vector<std::thread> workers_;
  std::function<void(int64_t)> job_;
  std::atomic<int64_t> total_{0};
  std::atomic<uint64_t> next_{0};
  std::atomic<int64_t> done_{0};
  std::atomic<int> sleeping_{0};
  std::mutex mu_, run_mu_;
  std::condition_variable cv_;
  bool stop_ = false;
};

// fn(begin, end) over [0, n) in chunks of `chunk` items, on the pool.
template <class Fn>
void parallel_chunks(int64_t n, int64_t chunk, const Fn& fn) {
  chunk = std::max<int64_t>(1, chunk);
  const int64_t chunks = (n + chunk - 1) / chunk;
  Pool::get().run(chunks, [&](int64_t c) { fn(c * chunk, std::min(n, (c + 1) * chunk)); });
}

// ------------------------------------------------------------------------------------------------------------
// Matrix x vector. Threads take chunks of weight rows; each chunk is read as kStreams sequential streams (rows from
// kStreams separate parts of it, in memory order within each), and every loaded weight chunk is applied to all M
// activation rows held in L1.

enum class Format { BF16, INT8, INT4 };

// Software prefetch into L2 this far ahead on each weight stream (helps the hardware prefetcher keep several
// streams going; measured on AMD Zen 4).
#ifndef GLM_PREFETCH_BYTES
#define GLM_PREFETCH_BYTES 1024
#endif
inline void prefetch(const void* p) {
  if (GLM_PREFETCH_BYTES > 0) _mm_prefetch(static_cast<const char*>(p) + GLM_PREFETCH_BYTES, _MM_HINT_T2);
}

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

// Weight rows in flight per thread. They come from kStreams separate parts of the thread's row range, so the
// memory system sees several independent sequential streams (measurably faster than one stream per core here).
#ifndef GLM_STREAMS
#define GLM_STREAMS 4
#endif
constexpr int kStreams = GLM_STREAMS;
template <int M> constexpr int tile_rows() { return M <= 4 ? 4 : 2; }
#ifndef GLM_UNROLL1
#define GLM_UNROLL1 2
#endif
// Accumulator sets per (row, activation row): two-part chunks get one set per part while registers allow.
template <Format F, int M> constexpr int tile_unroll() {
  return ChunkFor<F, M>::kParts == 2 ? (tile_rows<M>() * M <= 8 ? 2 : 1) : (M == 1 ? GLM_UNROLL1 : 1);
}

template <Format F>
constexpr int64_t row_bytes(int64_t K) { return F == Format::BF16 ? 2 * K : (F == Format::INT8 ? K : K / 2); }

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

// A 1-D fp32 / fp16 / bf16 tensor read as float (scales and biases, whatever dtype the layer keeps them in).
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

inline float row_sum(const bf16* x, int64_t n) {
  __m512 acc = _mm512_setzero_ps();
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) acc = _mm512_add_ps(acc, load16_bf16(x + i));
  if (i < n) acc = _mm512_add_ps(acc, maskz_load16_bf16(tail_mask16(n - i), x + i));
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

template <Format F>
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

  RowX xs[16] = {};
  at::Tensor split;
  const bf16* xp = reinterpret_cast<const bf16*>(x.data_ptr<at::BFloat16>());
  if (F == Format::INT4) {  // de-interleave x once: even columns pair with high nibbles, odd with low
    TORCH_CHECK(K % 2 == 0, "glm_cpu gemv_int4: K must be even");
    split = at::empty({2, M, K / 2}, x.options());
    bf16* sp = reinterpret_cast<bf16*>(split.data_ptr<at::BFloat16>());
    for (int64_t m = 0; m < M; ++m) {
      xs[m].xe = sp + m * (K / 2);
      xs[m].xo = sp + (M + m) * (K / 2);
      deinterleave(xp + m * K, K / 2, const_cast<bf16*>(xs[m].xe), const_cast<bf16*>(xs[m].xo));
    }
  } else {
    for (int64_t m = 0; m < M; ++m) xs[m].x = xp + m * K;
  }
  if (F != Format::BF16)
    for (int64_t m = 0; m < M; ++m) xs[m].sum = row_sum(xp + m * K, K);
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
  parallel_chunks(N, chunk, [&](int64_t n0, int64_t n1) {
    // rows n0 + s * sub + i for s < kStreams are processed together; the last (n1 - n0) % kStreams rows alone.
    const int64_t sub = (n1 - n0) / kStreams;
    alignas(64) float acc[kStreams * 16];
    int64_t idx[kStreams];
    const uint8_t* rows[kStreams];
    auto emit = [&](int nrows) {
      for (int64_t m0 = 0; m0 < M; m0 += 8) {
        const int mc = int(std::min<int64_t>(8, M - m0));
        tile_dispatch<F>(xs + m0, mc, rows, nrows, K, acc);
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

at::Tensor gemv_bf16(const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(w.scalar_type() == at::kBFloat16, "glm_cpu gemv_bf16: weight must be bfloat16");
  return gemv<Format::BF16>(x, w, c10::nullopt, bias);
}
at::Tensor gemv_int8(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scale,
                     const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(w.scalar_type() == at::kChar, "glm_cpu gemv_int8: weight must be int8");
  return gemv<Format::INT8>(x, w, scale, bias);
}
at::Tensor gemv_int4(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scale,
                     const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(w.scalar_type() == at::kChar || w.scalar_type() == at::kByte,
              "glm_cpu gemv_int4: packed weight must be int8 or uint8");
  return gemv<Format::INT4>(x, w, scale, bias);
}

// ------------------------------------------------------------------------------------------------------------
// One decoding step of attention: RoPE on q and k, append k and v to the cache at `pos`, attend over 0..pos.

inline float dot_bf16(const bf16* a, const bf16* b, int64_t n) {
  __m512 acc = _mm512_setzero_ps();
  int64_t i = 0;
  for (; i + 32 <= n; i += 32)
    acc = _mm512_dpbf16_ps(acc, as_bh(_mm512_loadu_si512(a + i)), as_bh(_mm512_loadu_si512(b + i)));
  if (i < n) {
    __mmask32 mk = tail_mask32(n - i);
    acc = _mm512_dpbf16_ps(acc, as_bh(_mm512_maskz_loadu_epi16(mk, a + i)), as_bh(_mm512_maskz_loadu_epi16(mk, b + i)));
  }
  return _mm512_reduce_add_ps(acc);
}

at::Tensor decode_attention(const at::Tensor& qkv_in, const at::Tensor& cos_in, const at::Tensor& sin_in,
                            const at::Tensor& k_cache, const at::Tensor& v_cache, int64_t pos,
                            const c10::optional<at::Tensor>& mask_in) {
  TORCH_CHECK(qkv_in.scalar_type() == at::kBFloat16 && k_cache.scalar_type() == at::kBFloat16 &&
                  v_cache.scalar_type() == at::kBFloat16, "glm_cpu decode_attention: bfloat16 tensors expected");
  TORCH_CHECK(k_cache.dim() == 4 && k_cache.is_contiguous() && v_cache.is_contiguous() &&
                  v_cache.sizes() == k_cache.sizes(), "glm_cpu decode_attention: caches must be contiguous [B, H, T, D]");
  const int64_t B = k_cache.size(0), H = k_cache.size(1), T = k_cache.size(2), D = k_cache.size(3);
  TORCH_CHECK(pos >= 0 && pos < T, "glm_cpu decode_attention: KV cache full");
  TORCH_CHECK(D % 2 == 0 && D <= 1024, "glm_cpu decode_attention: unsupported head dim");
  at::Tensor qkv = qkv_in.contiguous();
  TORCH_CHECK(qkv.numel() == B * H * 3 * D, "glm_cpu decode_attention: qkv must be [B, 1, H * 3 * D]");
  at::Tensor cs = cos_in.to(at::kFloat).contiguous(), sn = sin_in.to(at::kFloat).contiguous();
  TORCH_CHECK(cs.numel() == B * D && sn.numel() == B * D, "glm_cpu decode_attention: cos/sin must be [B, 1, 1, D]");
  const int64_t L = pos + 1;
  at::Tensor mask;
  int64_t mask_rows = 0;
  if (mask_in.has_value()) {
    mask = mask_in->to(at::kBool).contiguous();
    TORCH_CHECK(mask.size(-1) == L && (mask.numel() == L || mask.numel() == B * L),
                "glm_cpu decode_attention: mask must be [B or 1, 1, 1, pos + 1]");
    mask_rows = mask.numel() / L;
  }
  at::Tensor out = at::empty({B, 1, H * D}, qkv.options());
  const bf16* qp = reinterpret_cast<const bf16*>(qkv.data_ptr<at::BFloat16>());
  const float* cp = cs.data_ptr<float>();
  const float* sp = sn.data_ptr<float>();
  bf16* kc = reinterpret_cast<bf16*>(k_cache.data_ptr<at::BFloat16>());
  bf16* vc = reinterpret_cast<bf16*>(v_cache.data_ptr<at::BFloat16>());
  const bool* mp = mask.defined() ? mask.data_ptr<bool>() : nullptr;
  bf16* op = reinterpret_cast<bf16*>(out.data_ptr<at::BFloat16>());
  const float scale = 1.0f / std::sqrt(float(D));
  const int64_t half = D / 2;

  parallel_chunks(B * H, 1, [&](int64_t t0, int64_t t1) {
    std::vector<bf16> qr(D);
    std::vector<float> p(L), o(D);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t b = t / H, h = t % H;
      const bf16* q = qp + (b * H + h) * 3 * D;
      const bf16* k = q + D;
      const bf16* v = q + 2 * D;
      const float* c = cp + b * D;
      const float* s = sp + b * D;
      bf16* kdst = kc + ((b * H + h) * T + pos) * D;
      bf16* vdst = vc + ((b * H + h) * T + pos) * D;
      for (int64_t i = 0; i < half; ++i) {  // x * cos + rotate_half(x) * sin, rotate_half(x) = [-x2, x1]
        qr[i] = to_bf16(to_f32(q[i]) * c[i] - to_f32(q[i + half]) * s[i]);
        qr[i + half] = to_bf16(to_f32(q[i + half]) * c[i + half] + to_f32(q[i]) * s[i + half]);
        kdst[i] = to_bf16(to_f32(k[i]) * c[i] - to_f32(k[i + half]) * s[i]);
        kdst[i + half] = to_bf16(to_f32(k[i + half]) * c[i + half] + to_f32(k[i]) * s[i + half]);
      }
      std::memcpy(vdst, v, D * sizeof(bf16));
      const bf16* kb = kc + (b * H + h) * T * D;
      const bf16* vb = vc + (b * H + h) * T * D;
      const bool* mrow = mp ? mp + (mask_rows == 1 ? 0 : b) * L : nullptr;
      float mx = -FLT_MAX;
      bool any = false;
      for (int64_t j = 0; j < L; ++j) {
        if (mrow && mrow[j]) continue;
        p[j] = dot_bf16(qr.data(), kb + j * D, D) * scale;
        mx = std::max(mx, p[j]);
        any = true;
      }
      float sum = 0.0f;
      for (int64_t j = 0; j < L; ++j) {  // a fully masked row attends uniformly (as SAT's finite mask value does)
        p[j] = !any ? 1.0f : (mrow && mrow[j]) ? 0.0f : std::exp(p[j] - mx);
        sum += p[j];
      }
      const float inv = 1.0f / sum;
      std::fill(o.begin(), o.end(), 0.0f);
      for (int64_t j = 0; j < L; ++j) {
        if (p[j] == 0.0f) continue;
        const __m512 pj = _mm512_set1_ps(p[j] * inv);
        const bf16* vj = vb + j * D;
        int64_t i = 0;
        for (; i + 16 <= D; i += 16)
          _mm512_storeu_ps(o.data() + i, _mm512_fmadd_ps(pj, load16_bf16(vj + i), _mm512_loadu_ps(o.data() + i)));
        for (; i < D; ++i) o[i] += p[j] * inv * to_f32(vj[i]);
      }
      bf16* dst = op + (b * H + h) * D;
      for (int64_t i = 0; i < D; ++i) dst[i] = to_bf16(o[i]);
    }
  });
  return out;
}

// ------------------------------------------------------------------------------------------------------------
// Elementwise parts of a layer.

// exp(x) for x in [-87, 88]: 2^n * p(r), |r| <= ln2/2, degree-6 polynomial (relative error ~2e-7).
inline __m512 exp_ps(__m512 x) {
  x = _mm512_max_ps(_mm512_min_ps(x, _mm512_set1_ps(88.0f)), _mm512_set1_ps(-87.0f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.0f / 720);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(p, n);
}

// erf(x), Abramowitz & Stegun 7.1.26 (absolute error <= 1.5e-7).
inline __m512 erf_ps(__m512 x) {
  const __m512 ax = _mm512_abs_ps(x);
  const __m512 t = _mm512_div_ps(_mm512_set1_ps(1.0f), _mm512_fmadd_ps(ax, _mm512_set1_ps(0.3275911f), _mm512_set1_ps(1.0f)));
  __m512 y = _mm512_set1_ps(1.061405429f);
  y = _mm512_fmadd_ps(y, t, _mm512_set1_ps(-1.453152027f));
  y = _mm512_fmadd_ps(y, t, _mm512_set1_ps(1.421413741f));
  y = _mm512_fmadd_ps(y, t, _mm512_set1_ps(-0.284496736f));
  y = _mm512_fmadd_ps(y, t, _mm512_set1_ps(0.254829592f));
  y = _mm512_mul_ps(y, t);
  const __m512 e = exp_ps(_mm512_mul_ps(_mm512_sub_ps(_mm512_setzero_ps(), ax), ax));
  const __m512 r = _mm512_fnmadd_ps(y, e, _mm512_set1_ps(1.0f));
  return _mm512_castsi512_ps(_mm512_or_si512(_mm512_castps_si512(r),
                                             _mm512_and_si512(_mm512_castps_si512(x), _mm512_set1_epi32(0x80000000))));
}

// out = a * gelu(g) with [a | g] = u along the last dim (GLM's GeGLU; gelu with erf).
at::Tensor geglu(const at::Tensor& u_in) {
  TORCH_CHECK(u_in.scalar_type() == at::kBFloat16, "glm_cpu geglu: bfloat16 expected");
  const int64_t F2 = u_in.size(-1), F = F2 / 2;
  TORCH_CHECK(F2 % 2 == 0, "glm_cpu geglu: last dim must be even");
  at::Tensor u = u_in.reshape({-1, F2}).contiguous();
  const int64_t rows = u.size(0);
  std::vector<int64_t> shape(u_in.sizes().begin(), u_in.sizes().end());
  shape.back() = F;
  at::Tensor out = at::empty({rows, F}, u.options());
  const bf16* up = reinterpret_cast<const bf16*>(u.data_ptr<at::BFloat16>());
  bf16* op = reinterpret_cast<bf16*>(out.data_ptr<at::BFloat16>());
  parallel_chunks(rows * F, std::max<int64_t>(F, 4096), [&](int64_t i0, int64_t i1) {
    int64_t i = i0;
    while (i < i1) {
      const int64_t row = i / F, col = i % F;
      const int64_t n = std::min<int64_t>({16, F - col, i1 - i});
      const __mmask16 mk = tail_mask16(n);
      const __m512 a = maskz_load16_bf16(mk, up + row * F2 + col);
      const __m512 g = maskz_load16_bf16(mk, up + row * F2 + F + col);
      const __m512 gelu = _mm512_mul_ps(_mm512_mul_ps(_mm512_set1_ps(0.5f), g),
                                        _mm512_add_ps(_mm512_set1_ps(1.0f),
                                                      erf_ps(_mm512_mul_ps(g, _mm512_set1_ps(0.70710678118654752f)))));
      mask_store16_bf16(op + i, mk, _mm512_mul_ps(a, gelu));
      i += n;
    }
  });
  return out.reshape(shape);
}

// y = LayerNorm(x * alpha + r) (DeepNorm's residual), the sum rounded to bf16 first as the unfused path does.
at::Tensor add_layernorm(const at::Tensor& x_in, const at::Tensor& r_in, double alpha, const at::Tensor& w_in,
                         const at::Tensor& b_in, double eps) {
  TORCH_CHECK(x_in.scalar_type() == at::kBFloat16 && r_in.scalar_type() == at::kBFloat16,
              "glm_cpu add_layernorm: bfloat16 expected");
  const int64_t Hd = x_in.size(-1);
  at::Tensor x = x_in.reshape({-1, Hd}).contiguous(), r = r_in.reshape({-1, Hd}).contiguous();
  TORCH_CHECK(x.sizes() == r.sizes(), "glm_cpu add_layernorm: shapes differ");
  TORCH_CHECK(w_in.numel() == Hd && b_in.numel() == Hd, "glm_cpu add_layernorm: weight and bias need ", Hd, " values");
  std::vector<float> wb(2 * Hd);  // the affine parameters as fp32 (whatever dtype the module keeps them in)
  const Vec1d w(w_in), b(b_in);
  for (int64_t i = 0; i < Hd; ++i) {
    wb[i] = w.get(i, 1.0f);
    wb[Hd + i] = b.get(i, 0.0f);
  }
  at::Tensor out = at::empty_like(x);
  const bf16* xp = reinterpret_cast<const bf16*>(x.data_ptr<at::BFloat16>());
  const bf16* rp = reinterpret_cast<const bf16*>(r.data_ptr<at::BFloat16>());
  const float* wp = wb.data();
  const float* bp = wb.data() + Hd;
  bf16* op = reinterpret_cast<bf16*>(out.data_ptr<at::BFloat16>());
  const float al = float(alpha);
  parallel_chunks(x.size(0), 4, [&](int64_t r0, int64_t r1) {
    std::vector<float> h(Hd);
    for (int64_t row = r0; row < r1; ++row) {
      double sum = 0.0;
      for (int64_t i = 0; i < Hd; ++i) {
        h[i] = to_f32(to_bf16(to_f32(xp[row * Hd + i]) * al + to_f32(rp[row * Hd + i])));
        sum += h[i];
      }
      const float mean = float(sum / Hd);
      double var = 0.0;
      for (int64_t i = 0; i < Hd; ++i) var += double(h[i] - mean) * double(h[i] - mean);
      const float rstd = 1.0f / std::sqrt(float(var / Hd) + float(eps));
      for (int64_t i = 0; i < Hd; ++i) op[row * Hd + i] = to_bf16((h[i] - mean) * rstd * wp[i] + bp[i]);
    }
  });
  return out.reshape(x_in.sizes());
}

// Sum of a large fp32 buffer, read the fastest way found on this machine (each thread reads kStreams separate
// sequential streams with L2 prefetch): the read-bandwidth probe of the benchmark.
double read_sum(const at::Tensor& x_in) {
  TORCH_CHECK(x_in.scalar_type() == at::kFloat && x_in.is_contiguous(), "glm_cpu read_sum: contiguous fp32 expected");
  const float* p = x_in.data_ptr<float>();
  const int64_t n = x_in.numel(), line = 16;  // floats per cache line
  const int64_t lines = n / line;
  const int64_t chunk = (1 << 20) / 64;  // 1 MiB of lines per chunk
  std::vector<double> partial((lines + chunk - 1) / chunk, 0.0);
  parallel_chunks(lines, chunk, [&](int64_t l0, int64_t l1) {
    const int64_t sub = (l1 - l0) / kStreams;
    __m512 a[kStreams];
    for (int s = 0; s < kStreams; ++s) a[s] = _mm512_setzero_ps();
    for (int64_t i = 0; i < sub; ++i)
      for (int s = 0; s < kStreams; ++s) {
        const float* q = p + (l0 + s * sub + i) * line;
        prefetch(q);
        a[s] = _mm512_add_ps(a[s], _mm512_loadu_ps(q));
      }
    double t = 0.0;
    for (int s = 0; s < kStreams; ++s) t += _mm512_reduce_add_ps(a[s]);
    for (int64_t l = l0 + kStreams * sub; l < l1; ++l) t += _mm512_reduce_add_ps(_mm512_loadu_ps(p + l * line));
    partial[l0 / chunk] = t;
  });
  double total = 0.0;
  for (double v : partial) total += v;
  for (int64_t i = lines * line; i < n; ++i) total += p[i];
  return total;
}

// ------------------------------------------------------------------------------------------------------------
// One decoding step through every layer, the loop of kernels/cpu_gemv.py's decode_step without Python between the
// ops (at small sizes that overhead is a sizeable share of a step). Per layer i, with the four linears j = 0..3
// (query_key_value, dense, dense_h_to_4h, dense_4h_to_h) at weights[4i + j], biases[4i + j] and, for bits 8 / 4,
// scales[4i + j]; norms[4i .. 4i + 3] = post_attention_layernorm weight, bias, then the next layer's input_layernorm
// (the final_layernorm after the last layer) weight, bias, in the modules' own dtype:
//   ctx = attention(qkv(x)); y = LN2(x * alpha + dense(ctx)); x = LN_next(y * alpha + 4h_to_h(geglu(h_to_4h(y)))).
// Returns the final-layernormed hidden state; k_cache[i] / v_cache[i] get this token's keys and values at `pos`.
at::Tensor decode_layers(const at::Tensor& x_in, int64_t bits, at::TensorList weights, at::TensorList scales,
                         at::TensorList biases, at::TensorList norms, double alpha, double eps, at::TensorList k_cache,
                         at::TensorList v_cache, int64_t pos, const at::Tensor& cos, const at::Tensor& sin,
                         const c10::optional<at::Tensor>& mask) {
  const int64_t L = int64_t(k_cache.size());
  TORCH_CHECK(bits == 16 || bits == 8 || bits == 4, "glm_cpu decode_layers: bits must be 16, 8 or 4");
  TORCH_CHECK(int64_t(weights.size()) == 4 * L && int64_t(biases.size()) == 4 * L && int64_t(norms.size()) == 4 * L &&
                  int64_t(v_cache.size()) == L && (bits == 16 || int64_t(scales.size()) == 4 * L),
              "glm_cpu decode_layers: 4 weights, biases, norms (and scales) per layer expected");
  auto linear = [&](int64_t idx, const at::Tensor& in) {
    const c10::optional<at::Tensor> b = biases[idx];
    if (bits == 8) return gemv<Format::INT8>(in, weights[idx], scales[idx], b);
    if (bits == 4) return gemv<Format::INT4>(in, weights[idx], scales[idx], b);
    return gemv<Format::BF16>(in, weights[idx], c10::nullopt, b);
  };
  at::Tensor x = x_in;
  for (int64_t i = 0; i < L; ++i) {
    const at::Tensor ctx = decode_attention(linear(4 * i, x), cos, sin, k_cache[i], v_cache[i], pos, mask);
    const at::Tensor y = add_layernorm(x, linear(4 * i + 1, ctx), alpha, norms[4 * i], norms[4 * i + 1], eps);
    x = add_layernorm(y, linear(4 * i + 3, geglu(linear(4 * i + 2, y))), alpha, norms[4 * i + 2], norms[4 * i + 3], eps);
  }
  return x;
}

}  // namespace

TORCH_LIBRARY(glm_cpu, m) {
  m.def("gemv_bf16(Tensor x, Tensor w, Tensor? bias=None) -> Tensor");
  m.def("gemv_int8(Tensor x, Tensor w, Tensor scale, Tensor? bias=None) -> Tensor");
  m.def("gemv_int4(Tensor x, Tensor w, Tensor scale, Tensor? bias=None) -> Tensor");
  m.def("decode_attention(Tensor qkv, Tensor cos, Tensor sin, Tensor(a!) k_cache, Tensor(b!) v_cache, int pos, "
        "Tensor? mask=None) -> Tensor");
  m.def("geglu(Tensor u) -> Tensor");
  m.def("decode_layers(Tensor x, int bits, Tensor[] weights, Tensor[] scales, Tensor[] biases, Tensor[] norms, "
        "float alpha, float eps, Tensor(a!)[] k_cache, Tensor(b!)[] v_cache, int pos, Tensor cos, Tensor sin, "
        "Tensor? mask=None) -> Tensor");
  m.def("add_layernorm(Tensor x, Tensor r, float alpha, Tensor weight, Tensor bias, float eps) -> Tensor");
  m.def("read_sum(Tensor x) -> float");
}

TORCH_LIBRARY_IMPL(glm_cpu, CPU, m) {
  m.impl("gemv_bf16", &gemv_bf16);
  m.impl("gemv_int8", &gemv_int8);
  m.impl("gemv_int4", &gemv_int4);
  m.impl("decode_attention", &decode_attention);
  m.impl("geglu", &geglu);
  m.impl("decode_layers", &decode_layers);
  m.impl("add_layernorm", &add_layernorm);
  m.impl("read_sum", &read_sum);
}

}  // namespace glm_cpu
