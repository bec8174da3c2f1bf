"""The fused one-token decode step: GLM130B.forward_with_cache through kernels/cpu.py's `decode_layers`.

Batch-1..16 decoding on CPU spends as much time in ~40 small PyTorch ops per layer as in the weights' bandwidth;
`decode_layers` runs every layer of a step in one C++ call. This module decides when that applies (`applies`), and
collects the flat tensor lists the kernel reads from the model's own modules (`_plan`): the kernels stay tensor ops.
With streamed layers (--bminf, model/offload.py) the step is one call per run of layers that starts at a streamed
one, so that each streamed layer's weights are in its swap slot before the call that reads them.
"""
from typing import Optional

import torch
import torch.nn.functional as F

from kernels import cpu
from model import mpu


def applies(model, tokens: torch.Tensor, attention_mask: torch.Tensor, cache) -> bool:
    """Whether `decode_step` can run this forward_with_cache call: one new token per row, a bf16 CPU model using
    fused attention (--attention sdpa/auto; "plain" keeps SAT's op order) whose linears are all in one kernel format,
    no tensor parallelism, at most cpu.MAX_GEMV_ROWS rows, and the mask covering exactly the cached tokens plus the
    new one."""
    return (tokens.dim() == 2 and tokens.shape[1] == 1 and tokens.shape[0] <= cpu.MAX_GEMV_ROWS
            and tokens.device.type == "cpu" and model.dtype == torch.bfloat16 and model.uses_sdpa()
            and cache.batch_size == tokens.shape[0] and cache.length < cache.max_length
            and attention_mask.shape[-1] == cache.length + 1 and attention_mask.shape[-2] == 1
            and mpu.get_model_parallel_world_size() == 1 and cpu.available() and _plan(model) is not None)


def _kernel_bits(module) -> Optional[int]:
    """16, 8 or 4 when the decode kernels read this linear's weight as stored; None otherwise (a quantized linear
    carries `bits`, `layout` and `weight_scale`)."""
    bits = getattr(module, "bits", None) or 16
    dtype_ok = module.weight.dtype == (torch.bfloat16 if bits == 16 else torch.int8)
    layout_ok = getattr(module, "layout", "original") == "original"
    return bits if dtype_ok and layout_ok and module.weight.is_contiguous() and module.bias is not None else None


def _plan(model):
    """The flat tensor lists decode_layers reads, built once per model and rebuilt when its linears or weights are
    replaced (quantize() swaps every linear, loading assigns new tensors: the first and last ones are checked).
    None when the linears are not all in one kernel format."""
    t = model.transformer
    first, last = t.layers[0].attention.query_key_value, t.layers[-1].mlp.dense_4h_to_h
    key = (id(first), id(first.weight), id(last), id(last.weight), id(t.word_embeddings.weight))
    cached = getattr(model, "_fast_decode_plan", None)
    if cached is not None and cached[0] == key:
        return cached[1]
    linears = [m for layer in t.layers for m in (layer.attention.query_key_value, layer.attention.dense,
                                                   layer.mlp.dense_h_to_4h, layer.mlp.dense_4h_to_h)]
    bits = {_kernel_bits(m) for m in linears}
    plan = None
    if len(bits) == 1 and None not in bits:
        next_norms = [layer.input_layernorm for layer in t.layers[1:]] + [t.final_layernorm]
        norms = [p for layer, nxt in zip(t.layers, next_norms)
                 for p in (layer.post_attention_layernorm.weight, layer.post_attention_layernorm.bias,
                           nxt.weight, nxt.bias)]
        plan = {"bits": bits.pop(), "weights": [m.weight for m in linears], "biases": [m.bias for m in linears],
                "scales": [m.weight_scale for m in linears if hasattr(m, "weight_scale")], "norms": norms,
                "alpha": t.layers[0].alpha, "eps": t.final_layernorm.eps}
    model._fast_decode_plan = (key, plan)
    return plan


def decode_step(model, tokens, position_ids, attention_mask, cache) -> torch.Tensor:
    """GLM130B.forward_with_cache for one new token per row, with fused kernels. Returns logits [b, 1, V].

    The embedding and first input_layernorm here, then every layer in one call (qkv GEMV, RoPE + cache append +
    attention, dense GEMV, x·alpha + attn → LayerNorm, h→4h GEMV, GeGLU, 4h→h GEMV, y·alpha + mlp → next
    LayerNorm), then the logits GEMV. The caller advances the cache."""
    t, plan = model.transformer, _plan(model)
    h = t.word_embeddings(tokens)
    cos, sin = model.rotary.cos_sin(position_ids, h.dtype)  # rounded to bf16 as the unfused path's tables
    ln = t.layers[0].input_layernorm
    x = F.layer_norm(h, ln.normalized_shape, ln.weight, ln.bias, ln.eps)
    pos, cos, sin = cache.reserve(1), cos.float(), sin.float()
    mask = attention_mask.reshape(attention_mask.shape[0], -1)
    scales = plan["scales"]
    with model.offload.forward():  # streamed layers (--bminf): a call per run of layers that starts at one
        for a, b in model.offload.segments(len(t.layers)):
            with model.offload.layer(a):
                x = cpu.decode_layers(x, plan["bits"], plan["weights"][4 * a:4 * b], scales[4 * a:4 * b],
                                      plan["biases"][4 * a:4 * b], plan["norms"][4 * a:4 * b], plan["alpha"],
                                      plan["eps"], cache.k[a:b], cache.v[a:b], pos, cos, sin, mask)
    return cpu.gemv_bf16(x, t.word_embeddings.weight)
