// fp16 -> bf16 on the calling thread only: weight offload converts the streamed layers of an fp16 checkpoint on its
// reader thread while the pool's threads compute, so this must not take the pool (nor PyTorch's OpenMP team, whose
// spinning threads would share the cores with that compute). Each value is widened exactly to fp32 and rounded to
// nearest even, as `bf16_tensor.copy_(fp16_tensor)` does.
#include <ATen/ATen.h>

#include "ops.h"
#include "simd.h"

namespace glm_cpu {

void fp16_to_bf16(const at::Tensor& src, const at::Tensor& dst) {
  using namespace simd;
  TORCH_CHECK(src.device().is_cpu() && dst.device().is_cpu() && src.scalar_type() == at::kHalf &&
                  dst.scalar_type() == at::kBFloat16 && src.is_contiguous() && dst.is_contiguous() &&
                  src.numel() == dst.numel(),
              "glm_cpu fp16_to_bf16: contiguous CPU fp16 source and bf16 destination of one size expected");
  const auto* s = static_cast<const uint16_t*>(src.data_ptr());
  auto* d = static_cast<bf16*>(dst.data_ptr());
  const int64_t n = src.numel();
  int64_t i = 0;
  for (; i + 4 * kLanes <= n; i += 4 * kLanes)
    for (int j = 0; j < 4 * kLanes; j += kLanes) store_bf16(d + i + j, load_fp16(s + i + j));
  for (; i < n; ++i) d[i] = to_bf16(float(c10::Half(s[i], c10::Half::from_bits())));
}

}  // namespace glm_cpu
