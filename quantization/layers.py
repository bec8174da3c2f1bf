"""Quantized tensor-parallel linears and `quantize(model, bits)`, GLM-130B's W8A16 / W4A16 inference."""
import torch
from torch import nn

from model import mpu
from model.errors import UserError
from model.layers import ColumnParallelLinear, RowParallelLinear
from model.sharding import QUANTIZED_LINEARS
from quantization import matmul
from quantization.functional import quantize_weight
from quantization.matmul import CPU_INT4, ORIGINAL


class QuantizedLinearMixin:
    """Replaces a parallel linear's `weight` by int8 storage plus an fp16 `weight_scale` (one per local row).

    state_dict() is always the original's format (`<name>.weight` int8 [N, K] or packed [N, K/2],
    `<name>.weight_scale` fp16 [N]). On a CPU without this project's kernels an INT4 weight is held in PyTorch's
    int4 kernel layout instead (one resident copy; converted back for state_dict).
    """

    def _init_quantized(self, linear: nn.Module, bits: int) -> None:
        nn.Module.__init__(self)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.bits, self.layout = bits, ORIGINAL
        w = linear.weight
        if w.is_meta:  # before loading a quantized checkpoint: shapes only
            cols = w.shape[1] if bits == 8 else w.shape[1] // 2
            q = torch.empty(w.shape[0], cols, dtype=torch.int8, device="meta")
            scale = torch.empty(w.shape[0], dtype=torch.float16, device="meta")
        else:  # quantize on load, from this rank's shard
            q, scale = quantize_weight(w, bits)
        self.weight = nn.Parameter(q, requires_grad=False)
        self.weight_scale = nn.Parameter(scale, requires_grad=False)
        self.bias = linear.bias
        self.register_buffer("int4_scales_and_zeros", None, persistent=False)
        self.after_load()

    def after_load(self) -> None:
        """Move to the layout quantization.matmul.resident_layout picks once real weights are in place (the loader
        calls this; idempotent)."""
        w = self.weight
        if (self.layout != ORIGINAL or w.is_meta or getattr(self, "offloaded", False)  # a swap slot: kept as stored
                or matmul.resident_layout(w, self.bits) == ORIGINAL):
            return
        self.weight = nn.Parameter(matmul.to_cpu_int4(w.data), requires_grad=False)
        self.layout = CPU_INT4
        dtype = self.bias.dtype if self.bias is not None else torch.bfloat16
        if (dtype, 4) in matmul.CPU_KERNEL_MAX_ROWS:
            self.int4_scales_and_zeros = matmul.int4_scales_and_zeros(self.weight_scale, 2 * w.shape[1], dtype)

    def original_weight(self) -> torch.Tensor:
        """The weight storage in the original format."""
        return matmul.from_cpu_int4(self.weight) if self.layout == CPU_INT4 else self.weight

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.layout == CPU_INT4:
            destination[prefix + "weight"] = self.original_weight()

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        if self.layout == CPU_INT4:  # back to the stored format, so that loading sees matching shapes and dtypes
            self.weight = nn.Parameter(self.original_weight(), requires_grad=False)
            self.layout, self.int4_scales_and_zeros = ORIGINAL, None
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self.after_load()

    def local_matmul(self, x: torch.Tensor) -> torch.Tensor:
        sz = self.int4_scales_and_zeros
        if self.layout == CPU_INT4 and matmul.uses_cpu_kernel(x, 4) and (sz is None or sz.dtype != x.dtype):
            sz = self.int4_scales_and_zeros = matmul.int4_scales_and_zeros(self.weight_scale, x.shape[-1], x.dtype)
        return matmul.weight_only_linear(x, self.weight, self.weight_scale, self.bits, self.layout, sz)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, layout={self.layout}"


class QuantizedColumnParallelLinear(QuantizedLinearMixin, ColumnParallelLinear):
    def __init__(self, linear: ColumnParallelLinear, bits: int):
        self._init_quantized(linear, bits)


class QuantizedRowParallelLinear(QuantizedLinearMixin, RowParallelLinear):
    def __init__(self, linear: RowParallelLinear, bits: int):
        self._init_quantized(linear, bits)


def quantize(model: nn.Module, bits: int) -> nn.Module:
    """Replace the four big linears of every layer by quantized ones (in place; returns the model).

    On a meta model (before loading a --from-quantized-checkpoint) this only sets up the int8 `weight` and fp16
    `weight_scale` shapes. On a loaded 16-bit model it quantizes each rank's local shard, so scales follow the
    tensor-parallel layout as in the original. Unlike the original, the biases of the quantized linears are kept
    here: its quantize() built fresh layers whose biases were zero, silently dropping the trained biases.
    """
    if bits not in (4, 8):
        raise UserError(f"--quantization-bit-width must be 4 or 8, got {bits}")
    mpu.print_rank_0(f"> Quantizing model weight to {bits} bits")
    targets = [(name, m) for name, m in model.named_modules() if name.endswith(QUANTIZED_LINEARS)]
    for name, module in targets:
        if isinstance(module, QuantizedLinearMixin):
            raise UserError(f"{name} is already quantized ({module.bits} bits); quantize the model only once")
        cls = QuantizedColumnParallelLinear if isinstance(module, ColumnParallelLinear) else QuantizedRowParallelLinear
        if bits == 4 and module.weight.shape[1] % 2:
            raise UserError(f"{name} has an odd number of input columns ({module.weight.shape[1]}); INT4 packs two "
                            f"per byte, use --quantization-bit-width 8")
        parent_name, child = name.rsplit(".", 1)
        setattr(model.get_submodule(parent_name), child, cls(module, bits))
    return model


def quantized_linear_bytes(model: nn.Module) -> int:
    """Bytes resident for the quantized linears' weights: storage, scales and any kernel table (biases excluded)."""
    total = 0
    for m in model.modules():
        if isinstance(m, QuantizedLinearMixin):
            tensors = [m.weight, m.weight_scale, m.int4_scales_and_zeros]
            total += sum(t.numel() * t.element_size() for t in tensors if t is not None)
    return total


def fp16_linear_bytes(model: nn.Module) -> int:
    """What the same linears' weights take in 16 bits (for comparing with quantized_linear_bytes)."""
    return sum(2 * m.out_features * m.in_features for m in model.modules() if isinstance(m, QuantizedLinearMixin))
