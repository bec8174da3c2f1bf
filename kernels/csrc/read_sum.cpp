// Sum of a large fp32 buffer, read the fastest way found on this machine (each thread reads kStreams separate
// sequential streams with L2 prefetch, as the GEMV kernels read weights): the benchmark's read-bandwidth probe.
#include <ATen/ATen.h>

#include <atomic>
#include <memory>
#include <vector>

#include "gemv.h"
#include "ops.h"
#include "simd.h"
#include "thread_pool.h"

namespace glm_cpu {

double read_sum(const at::Tensor& x_in) {
  using namespace simd;
  TORCH_CHECK(x_in.scalar_type() == at::kFloat && x_in.is_contiguous(), "glm_cpu read_sum: contiguous fp32 expected");
  const float* p = x_in.data_ptr<float>();
  const int64_t n = x_in.numel(), line = 16;  // floats per cache line
  const int64_t lines = n / line;
  const int64_t chunk = (1 << 20) / 64;  // 1 MiB of lines per chunk
  std::vector<double> partial((lines + chunk - 1) / chunk, 0.0);
  auto line_sum = [](const float* q) {
    VF s = loadu(q);
    for (int j = kLanes; j < 16; j += kLanes) s = add(s, loadu(q + j));
    return s;
  };
  parallel_chunks(lines, chunk, [&](int64_t l0, int64_t l1) {
    const int64_t sub = (l1 - l0) / kStreams;
    VF a[kStreams];
    for (int s = 0; s < kStreams; ++s) a[s] = zero();
    for (int64_t i = 0; i < sub; ++i)
      for (int s = 0; s < kStreams; ++s) {
        const float* q = p + (l0 + s * sub + i) * line;
        prefetch(q);
        a[s] = add(a[s], line_sum(q));
      }
    double t = 0.0;
    for (int s = 0; s < kStreams; ++s) t += reduce_add(a[s]);
    for (int64_t l = l0 + kStreams * sub; l < l1; ++l) t += reduce_add(line_sum(p + l * line));
    partial[l0 / chunk] = t;
  });
  double total = 0.0;
  for (double v : partial) total += v;
  for (int64_t i = lines * line; i < n; ++i) total += p[i];
  return total;
}

void pool_rest() { Pool::get().rest(); }

int64_t pool_check(int64_t jobs, int64_t chunks, int64_t first_generation) {
  if (first_generation >= 0) Pool::get().restart_at(uint32_t(first_generation));
  int64_t wrong = 0;
  std::unique_ptr<std::atomic<int>[]> runs(new std::atomic<int>[chunks]);
  for (int64_t j = 0; j < jobs; ++j) {
    const int64_t n = 2 + j % (chunks - 1);  // calls of 2..chunks chunks: a call often has more than the last
    for (int64_t c = 0; c < n; ++c) runs[c].store(0, std::memory_order_relaxed);
    parallel_chunks(n, 1, [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) {
        for (int64_t k = 0; k < (j + c) % 64; ++k) _mm_pause();  // chunks of uneven length
        runs[c].fetch_add(1, std::memory_order_relaxed);
      }
    });
    for (int64_t c = 0; c < n; ++c) wrong += runs[c].load(std::memory_order_relaxed) != 1;
  }
  return wrong;
}

}  // namespace glm_cpu
