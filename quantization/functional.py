"""GLM-130B's weight-only quantization, bit for bit: symmetric, one fp16 scale per output row, no zero point.

    scale = fp16(max_c |W[r, c]| / (2^(b-1) - 1))        127 for INT8, 7 for INT4
    q     = round_half_even(fp16(W / scale[:, None]))     int8; INT4 packs two per byte, even column in the high nibble

The original computes this on the GPU with fp16 tensors. Both divisions there round to fp16 once from an fp32 result:
- `amax / 127` (a Python scalar divisor) is computed by CUDA as amax * fp32(1/127); for every fp16 amax this gives
  the same fp16 as the exact quotient (checked exhaustively in tests/test_quantization.py);
- `W / scale` (fp16 by fp16) is the fp32 quotient rounded to fp16, which equals the correctly rounded fp16
  quotient because fp32 carries more than 2·11+2 bits (double rounding is innocuous there).
So the fp32 arithmetic below reproduces the original on any device.
"""
from typing import Callable, Dict, Optional, Tuple

import torch

from model.errors import UserError
from model.sharding import is_quantized_weight

MAX_LEVEL = {8: 127, 4: 7}
STORAGE_RANGE = {8: (-128, 127), 4: (-8, 7)}
_ROWS_PER_BLOCK_ELEMENTS = 1 << 20  # quantize big matrices a block of rows at a time (bounded temporaries)


def _check_bits(bits: int) -> None:
    if bits not in MAX_LEVEL:
        raise UserError(f"quantization bit width must be 4 or 8, got {bits}")


def quantize_weight(weight: torch.Tensor, bits: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """(storage, scale) for a [rows, cols] weight: int8 [rows, cols] (INT8) or packed int8 [rows, cols/2] (INT4),
    and the fp16 per-row scale. The weight is taken as fp16, as the original's fp16 checkpoints are.

    A row of zeros gets scale 0 and q = 0 (the original divides 0 by 0 there). q saturates at the storage range
    ([-128, 127], INT4 [-8, 7]): values beyond it only arise when the fp16 scale is subnormal (row max below
    127·2^-14 ≈ 0.0078 for INT8, 7·2^-14 ≈ 0.00043 for INT4), where the original's float->int8 cast is undefined
    in C++ (PyTorch on CPU wraps around) and its INT4 nibbles wrap. A row holding NaN or Inf (in fp16) gets q = 0
    and scale NaN: it dequantizes to NaN, as the 16-bit row computes NaN, never to a plausible all-zero row (the
    loader and convert_tp.py refuse such weights unless told to keep them).
    """
    _check_bits(bits)
    if weight.dim() != 2 or (bits == 4 and weight.shape[1] % 2):
        raise UserError(f"cannot quantize a weight of shape {list(weight.shape)} to {bits} bits: "
                        f"need a matrix{' with an even number of columns' if bits == 4 else ''}")
    w16 = weight.to(torch.float16)
    scale = (w16.abs().amax(dim=-1).float() / MAX_LEVEL[bits]).to(torch.float16)
    divisor = torch.where(scale == 0, torch.ones_like(scale), scale).float()[:, None]
    q = torch.empty(w16.shape, dtype=torch.int8, device=w16.device)
    step = max(1, _ROWS_PER_BLOCK_ELEMENTS // max(1, w16.shape[1]))
    for r in range(0, w16.shape[0], step):
        ratio = (w16[r:r + step].float() / divisor[r:r + step]).to(torch.float16)  # fp16 quotient, as the original
        q[r:r + step] = torch.round(ratio.float()).clamp_(*STORAGE_RANGE[bits]).to(torch.int8)  # half to even
    non_finite = ~torch.isfinite(scale)
    if bool(non_finite.any()):
        q[non_finite] = 0
        scale[non_finite] = float("nan")
    return (pack_int4(q) if bits == 4 else q), scale


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """int8 [rows, cols] with values in [-8, 7] -> int8 [rows, cols/2]: byte k = (q[2k] << 4) | (q[2k+1] & 0xF)."""
    q = q.to(torch.int8)
    return (q[:, 0::2] << 4) | (q[:, 1::2] & 0x0F)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of pack_int4: high nibble -> even column, low nibble -> odd column, both sign-extended."""
    b = packed.view(torch.int8)
    return torch.stack([b >> 4, (b << 4) >> 4], dim=-1).reshape(b.shape[0], -1)


def dequantize(storage: torch.Tensor, scale: torch.Tensor, bits: int, dtype=torch.float16) -> torch.Tensor:
    """The reference dense weight q * scale (the exact product rounded once to `dtype`, as the original's kernel)."""
    _check_bits(bits)
    q = unpack_int4(storage) if bits == 4 else storage
    return (q.float() * scale.float()[:, None]).to(dtype)


def quantize_state_dict(state_dict: Dict[str, torch.Tensor], bits: int) -> Dict[str, torch.Tensor]:
    """A 16-bit shard's state dict in the quantized checkpoint format (what convert_tp.py writes for that shard):
    the four big weights of each layer become int8 storage plus `<key>_scale`; everything else is passed through.

    Quantizing the checkpoint's own fp16 tensors (before any cast to the model dtype) keeps quantize-on-load
    bit-identical to loading a converted checkpoint also for bf16/fp32 models.
    """
    out = {}
    for key, value in state_dict.items():
        if is_quantized_weight(key):
            out[key], out[key + "_scale"] = quantize_weight(value, bits)
        else:
            out[key] = value
    return out


# ---------------------------------------------------------------------------------------------------------------
# Checkpoint checks

def detect_quantization(state_dict: Dict[str, torch.Tensor], path: str = "checkpoint") -> Optional[int]:
    """The bit width (8 or 4) of a quantized shard's weights, or None when they are 16/32-bit.

    INT4 packs two values per byte, so a column-parallel weight (query_key_value) has hidden/2 columns instead of
    hidden, where hidden is the size of the layer's (replicated) input_layernorm.
    """
    weights = [k for k in state_dict if is_quantized_weight(k)]
    int8 = [k for k in weights if state_dict[k].dtype == torch.int8]
    scales = [k for k in state_dict if k.endswith(".weight_scale")]
    if not int8 and not scales:
        return None
    partial = [k for k in weights if state_dict[k].dtype != torch.int8 or k + "_scale" not in state_dict]
    if partial:
        raise UserError(f"{path} is only partly quantized ({partial[0]} is {state_dict[partial[0]].dtype} or lacks "
                        f"its weight_scale); re-create it with tools/convert_tp.py --quantization-bit-width 4|8")
    qkv = next((k for k in int8 if k.endswith("attention.query_key_value.weight")), None)
    norm = qkv and qkv.replace("attention.query_key_value.weight", "input_layernorm.weight")
    if qkv is None or norm not in state_dict:
        raise UserError(f"{path} holds int8 weights but no query_key_value/input_layernorm pair to tell INT8 from "
                        f"INT4; is it a GLM checkpoint?")
    hidden, cols = state_dict[norm].shape[0], state_dict[qkv].shape[1]
    if cols == hidden:
        return 8
    if 2 * cols == hidden:
        return 4
    raise UserError(f"{path}: {qkv} has {cols} columns, neither hidden ({hidden}, INT8) nor hidden/2 (INT4)")


def check_quantization_matches(state_dict: Dict[str, torch.Tensor], bits: Optional[int], from_quantized: bool,
                               path: str = "checkpoint") -> Optional[int]:
    """Raise a one-line UserError unless the shard's format fits --quantization-bit-width/--from-quantized-checkpoint.
    Returns the shard's bit width (None for 16-bit weights)."""
    found = detect_quantization(state_dict, path)
    if found is not None and not from_quantized:
        raise UserError(f"{path} is an INT{found}-quantized checkpoint; load it with --quantization-bit-width {found} "
                        f"--from-quantized-checkpoint")
    if found is None and from_quantized:
        raise UserError(f"{path} holds 16-bit weights but --from-quantized-checkpoint was given; drop that flag "
                        f"(--quantization-bit-width {bits} then quantizes while loading)")
    if found is not None and found != bits:
        raise UserError(f"{path} holds INT{found} weights but --quantization-bit-width is {bits}; "
                        f"pass --quantization-bit-width {found}")
    return found


def checkpoint_preparer(bits: Optional[int], from_quantized: bool) -> Callable[[Dict[str, torch.Tensor], str], Dict]:
    """The loader's `prepare_shard` for --quantization-bit-width / --from-quantized-checkpoint: a quantized shard
    must match the flags (one-line UserError otherwise); a 16-bit shard is quantized on load when bits are given,
    so quantize-on-load equals loading a checkpoint converted by tools/convert_tp.py, bit for bit, in every dtype."""
    def prepare(state_dict: Dict[str, torch.Tensor], path: str) -> Dict[str, torch.Tensor]:
        if not (bits or from_quantized or any(k.endswith(".weight_scale") for k in state_dict)):
            return state_dict
        if check_quantization_matches(state_dict, bits, from_quantized, path) is None:
            return quantize_state_dict(state_dict, bits)
        return state_dict
    return prepare
