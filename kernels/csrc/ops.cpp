// Registers the ops under torch.ops.glm_cpu. Every tier's library (kernels/cpu.py builds one per instruction set,
// each from this file, decode_step.cpp, read_sum.cpp, convert.cpp and its gemv_<kind>.cpp) registers the same names, so only one
// tier can be loaded per process; `tier()` says which one this library is.
#include <torch/library.h>

#include "ops.h"

#ifndef GLM_TIER
#error "compile with -DGLM_TIER=<tier name> (kernels/cpu.py does)"
#endif
#define GLM_STR2(x) #x
#define GLM_STR(x) GLM_STR2(x)

namespace glm_cpu {
namespace {
std::string tier() { return GLM_STR(GLM_TIER); }
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
  m.def("fp16_to_bf16(Tensor src, Tensor(a!) dst) -> ()");
  m.def("pool_check(int jobs, int chunks, int first_generation=-1) -> int", &pool_check);
  m.def("pool_rest() -> ()", &pool_rest);
  m.def("tier() -> str", &tier);
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
  m.impl("fp16_to_bf16", &fp16_to_bf16);
}

}  // namespace glm_cpu
