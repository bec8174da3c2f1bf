// One decoding step on every tier: RoPE + KV-cache append + attention of one query (decode_attention), GeGLU,
// residual + LayerNorm (add_layernorm), and all layers of a step in one call (decode_layers) over the tier's GEMV.
// fp32 inside, one bf16 rounding per output; vectors through simd.h (the tier's width), dot products of q and the
// cached keys with vdpbf16ps where the tier has AVX-512 BF16.
#include <ATen/ATen.h>

#include <immintrin.h>

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstring>
#include <vector>

#include "ops.h"
#include "simd.h"
#include "thread_pool.h"

namespace glm_cpu {
using namespace simd;
namespace {

// ------------------------------------------------------------------------------------------------------------
// One decoding step of attention: RoPE on q and k, append k and v to the cache at `pos`, attend over 0..pos.

inline float dot_bf16(const bf16* a, const bf16* b, int64_t n) {
#if defined(__AVX512BF16__)
  auto as_bh = [](__m512i v) { return (__m512bh)v; };
  __m512 acc = _mm512_setzero_ps();
  int64_t i = 0;
  for (; i + 32 <= n; i += 32)
    acc = _mm512_dpbf16_ps(acc, as_bh(_mm512_loadu_si512(a + i)), as_bh(_mm512_loadu_si512(b + i)));
  if (i < n) {
    const __mmask32 mk = n - i >= 32 ? 0xFFFFFFFFu : (__mmask32)((1u << (n - i)) - 1u);
    acc = _mm512_dpbf16_ps(acc, as_bh(_mm512_maskz_loadu_epi16(mk, a + i)), as_bh(_mm512_maskz_loadu_epi16(mk, b + i)));
  }
  return _mm512_reduce_add_ps(acc);
#else
  VF acc0 = zero(), acc1 = zero();
  int64_t i = 0;
  for (; i + 2 * kLanes <= n; i += 2 * kLanes) {
    acc0 = fmadd(load_bf16(a + i), load_bf16(b + i), acc0);
    acc1 = fmadd(load_bf16(a + i + kLanes), load_bf16(b + i + kLanes), acc1);
  }
  for (; i + kLanes <= n; i += kLanes) acc0 = fmadd(load_bf16(a + i), load_bf16(b + i), acc0);
  if (i < n) acc1 = fmadd(load_bf16_n(a + i, n - i), load_bf16_n(b + i, n - i), acc1);
  return reduce_add(add(acc0, acc1));
#endif
}

}  // namespace

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
        const VF pj = set1(p[j] * inv);
        const bf16* vj = vb + j * D;
        int64_t i = 0;
        for (; i + kLanes <= D; i += kLanes) storeu(o.data() + i, fmadd(pj, load_bf16(vj + i), loadu(o.data() + i)));
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
      const int64_t n = std::min<int64_t>({kLanes, F - col, i1 - i});
      const bool full = n == kLanes;
      const VF a = full ? load_bf16(up + row * F2 + col) : load_bf16_n(up + row * F2 + col, n);
      const VF g = full ? load_bf16(up + row * F2 + F + col) : load_bf16_n(up + row * F2 + F + col, n);
      const VF gelu = mul(mul(set1(0.5f), g), add(set1(1.0f), simd::erf(mul(g, set1(0.70710678118654752f)))));
      if (full)
        store_bf16(op + i, mul(a, gelu));
      else
        store_bf16_n(op + i, mul(a, gelu), n);
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

// ------------------------------------------------------------------------------------------------------------
// One decoding step through every layer, the loop of model/fast_decode.py's unfused step without Python between the
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
    if (bits == 8) return gemv_int8(in, weights[idx], scales[idx], b);
    if (bits == 4) return gemv_int4(in, weights[idx], scales[idx], b);
    return gemv_bf16(in, weights[idx], b);
  };
  at::Tensor x = x_in;
  for (int64_t i = 0; i < L; ++i) {
    const at::Tensor ctx = decode_attention(linear(4 * i, x), cos, sin, k_cache[i], v_cache[i], pos, mask);
    const at::Tensor y = add_layernorm(x, linear(4 * i + 1, ctx), alpha, norms[4 * i], norms[4 * i + 1], eps);
    x = add_layernorm(y, linear(4 * i + 3, geglu(linear(4 * i + 2, y))), alpha, norms[4 * i + 2], norms[4 * i + 3], eps);
  }
  return x;
}

}  // namespace glm_cpu
