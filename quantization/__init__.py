"""Weight-only INT8 / INT4 quantization of GLM-130B's four big linears per layer (the original's format).

Loader/initializer entry points:
    checkpoint_preparer(bits, from_quantized)  # the loader's hook: flag checks, quantize-on-load of a 16-bit shard
    quantize(model, bits)   # before loading a --from-quantized-checkpoint (shapes), or after loading 16-bit weights
    quantize_state_dict(sd, bits)  # a raw 16-bit shard in the quantized format (quantize-on-load before dtype casts)
Run time: weight_only_linear(x, q, scale, bits, layout) chooses the kernel per device/dtype/rows (quantization/matmul.py).
"""
from quantization.functional import (check_quantization_matches, checkpoint_preparer, dequantize,
                                     detect_quantization, pack_int4, quantize_state_dict, quantize_weight, unpack_int4)
from quantization.layers import (QuantizedColumnParallelLinear, QuantizedLinearMixin, QuantizedRowParallelLinear,
                                 fp16_linear_bytes, quantize, quantized_linear_bytes)
from quantization.matmul import weight_only_linear

__all__ = ["check_quantization_matches", "checkpoint_preparer", "dequantize", "detect_quantization", "pack_int4",
           "quantize_state_dict", "quantize_weight", "unpack_int4", "QuantizedColumnParallelLinear", "QuantizedLinearMixin", "QuantizedRowParallelLinear",
           "fp16_linear_bytes", "quantize", "quantized_linear_bytes", "weight_only_linear"]
