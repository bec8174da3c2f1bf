"""The GLM-130B network, numerically as SwissArmyTransformer 0.2.x computes it (see model-math.md).

Parameter names equal the released checkpoint keys. Activations are [batch, seq, hidden] (SAT uses
[seq, batch, hidden]; the math is the same). Masks are bool with True = may NOT attend.
"""
import math
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from kernels import cpu
from model import fast_decode, mpu
from model.offload import NO_OFFLOAD
from model.config import GLMConfig
from model.layers import ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding


class RotaryEmbedding:
    """1-D rotate-half RoPE over the full head dim, base 10000, tables indexed by per-token position ids.

    Legacy (SAT 0.2.x, default): inv_freq is rounded to fp16, and in fp16 models the angles and cos/sin tables are
    fp16 too. Exact: fp32 inv_freq, angles and tables (cast to the activation dtype at use).
    """

    def __init__(self, head_dim: int, exact: bool, max_length: int):
        inv_freq = 1.0 / (10000 ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
        self.inv_freq = inv_freq if exact else inv_freq.half().float()
        self.exact = exact
        self.max_length = max_length
        self._tables = {}

    def _table(self, dtype: torch.dtype, device, needed: int = 0) -> Tuple[torch.Tensor, torch.Tensor]:
        """cos/sin for positions [0, max_length) (values do not depend on the table size, as in SAT)."""
        table_dtype = torch.float16 if (dtype == torch.float16 and not self.exact) else torch.float32
        key = (table_dtype, str(device))
        cached = self._tables.get(key)
        if cached is None or cached[0].shape[0] < needed:
            self.max_length = max(self.max_length, needed)
            t = torch.arange(self.max_length, dtype=torch.float32)
            freqs = torch.outer(t, self.inv_freq).to(table_dtype)  # fp16 legacy: rounded like fp16 t * fp16 inv_freq
            emb = torch.cat([freqs, freqs], dim=-1)
            cached = (emb.float().cos().to(table_dtype).to(device), emb.float().sin().to(table_dtype).to(device))
            self._tables[key] = cached
        return cached

    def cos_sin(self, position_ids: torch.Tensor, dtype: torch.dtype) -> Tuple[torch.Tensor, torch.Tensor]:
        """cos and sin for each token, [b, 1, s, d], in the activation dtype."""
        # On CPU, positions past --max-sequence-length grow the table; on GPU that check would sync every step.
        needed = int(position_ids.max()) + 1 if position_ids.device.type == "cpu" else 0
        cos, sin = self._table(dtype, position_ids.device, needed)
        return F.embedding(position_ids, cos).unsqueeze(1).to(dtype), F.embedding(position_ids, sin).unsqueeze(1).to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return x * cos + rotate_half(x) * sin


class _NoPast:
    """Attention keys/values are just the current tokens'."""

    def update(self, layer_id, k, v):
        return k, v


class _ConcatPast:
    """SAT's `mems`: [layers, b, mem_len, 2·H_local] post-RoPE k|v prepended to the current tokens'."""

    def __init__(self, mems: torch.Tensor, heads: int, head_dim: int, batch: int):
        self.mems, self.heads, self.head_dim, self.batch = mems, heads, head_dim, batch

    def update(self, layer_id, k, v):
        mem = self.mems[layer_id].expand(self.batch, -1, -1)
        past_k, past_v = mem.chunk(2, dim=-1)
        shape = (self.batch, mem.shape[1], self.heads, self.head_dim)
        past_k = past_k.reshape(shape).transpose(1, 2).to(k.dtype)
        past_v = past_v.reshape(shape).transpose(1, 2).to(v.dtype)
        return torch.cat([past_k, k], dim=2), torch.cat([past_v, v], dim=2)


class KVCache:
    """Preallocated post-RoPE keys and values, [b, heads_local, max_length, head_dim] per layer."""

    def __init__(self, model: "GLM130B", batch_size: int, max_length: int):
        attn = model.transformer.layers[0].attention
        param = model.transformer.final_layernorm.weight
        shape = (batch_size, attn.heads_local, max_length, attn.head_dim)
        n = len(model.transformer.layers)
        self.k = [torch.empty(shape, dtype=param.dtype, device=param.device) for _ in range(n)]
        self.v = [torch.empty(shape, dtype=param.dtype, device=param.device) for _ in range(n)]
        self.length = 0
        self.max_length = max_length
        self._pending = 0

    @property
    def batch_size(self) -> int:
        return self.k[0].shape[0]

    def reserve(self, n: int) -> int:
        """The next n positions, to be written now (by update() or in place by a kernel); advance() then keeps them.
        Returns the first."""
        if self.length + n > self.max_length:
            raise ValueError(f"KV cache full: {self.length + n} tokens exceed its {self.max_length}")
        self._pending = n
        return self.length

    def update(self, layer_id, k, v):
        start = self.reserve(k.shape[2])
        end = start + k.shape[2]
        self.k[layer_id][:, :, start:end] = k
        self.v[layer_id][:, :, start:end] = v
        return self.k[layer_id][:, :, :end], self.v[layer_id][:, :, :end]

    def advance(self) -> None:
        self.length += self._pending
        self._pending = 0

    def reorder(self, index: torch.Tensor) -> None:
        """Keep batch rows `index` (in that order; may repeat rows, e.g. to expand one prompt to several beams)."""
        index = index.to(self.k[0].device)
        self.k = [t.index_select(0, index) for t in self.k]
        self.v = [t.index_select(0, index) for t in self.v]


class SelfAttention(nn.Module):
    def __init__(self, config: GLMConfig, layer_id: int, dtype, device):
        super().__init__()
        world = mpu.get_model_parallel_world_size()
        if config.num_attention_heads % world:
            raise ValueError(f"--num-attention-heads {config.num_attention_heads} is not divisible by the "
                             f"model-parallel size {world}")
        self.layer_id = layer_id
        self.head_dim = config.head_dim
        self.heads_local = config.num_attention_heads // world
        self.query_key_value = ColumnParallelLinear(config.hidden_size, 3 * config.hidden_size, dtype=dtype, device=device)
        self.dense = RowParallelLinear(config.hidden_size, config.hidden_size, dtype=dtype, device=device)

    def forward(self, x, cos, sin, mask, past, use_sdpa: bool):
        b, s, _ = x.shape
        qkv = self.query_key_value(x).view(b, s, self.heads_local, 3 * self.head_dim)  # per head [q | k | v]
        q, k, v = qkv.transpose(1, 2).chunk(3, dim=-1)  # each [b, heads, s, d]
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        keys, values = past.update(self.layer_id, k, v)
        if use_sdpa:
            ctx = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=1.0 / math.sqrt(self.head_dim))
        else:
            ctx = self._sat_attention(q, keys, values, mask)
        ctx = ctx.transpose(1, 2).reshape(b, s, self.heads_local * self.head_dim)
        return self.dense(ctx), k, v

    def _sat_attention(self, q, k, v, mask):
        # SAT divides q by (l+1) in the model dtype and multiplies the scores back in fp32 (an fp16 overflow guard).
        c = self.layer_id + 1
        scores = torch.matmul(q / (math.sqrt(self.head_dim) * c), k.transpose(-1, -2))
        scores = scores.masked_fill(mask, -10000.0).float() * c
        probs = torch.softmax(scores, dim=-1).to(v.dtype)
        return torch.matmul(probs, v)


class GEGLUMLP(nn.Module):
    def __init__(self, config: GLMConfig, dtype, device):
        super().__init__()
        self.dense_h_to_4h = ColumnParallelLinear(config.hidden_size, 2 * config.inner_hidden_size, dtype=dtype, device=device)
        self.dense_4h_to_h = RowParallelLinear(config.inner_hidden_size, config.hidden_size, dtype=dtype, device=device)

    def forward(self, x):
        a, g = self.dense_h_to_4h(x).chunk(2, dim=-1)  # this rank's [A_r | G_r]
        return self.dense_4h_to_h(a * F.gelu(g))


class GLMBlock(nn.Module):
    """DeepNorm Post-LN: the residual carries the normalised value, scaled by alpha = sqrt(2·num_layers)."""

    def __init__(self, config: GLMConfig, layer_id: int, dtype, device):
        super().__init__()
        eps = config.layernorm_epsilon
        self.alpha = config.deepnorm_alpha
        self.input_layernorm = nn.LayerNorm(config.hidden_size, eps=eps, dtype=dtype, device=device)
        self.attention = SelfAttention(config, layer_id, dtype, device)
        self.post_attention_layernorm = nn.LayerNorm(config.hidden_size, eps=eps, dtype=dtype, device=device)
        self.mlp = GEGLUMLP(config, dtype, device)

    def forward(self, h, cos, sin, mask, past, use_sdpa):
        x = self.input_layernorm(h)
        attn_out, k, v = self.attention(x, cos, sin, mask, past, use_sdpa)
        h = x * self.alpha + attn_out
        y = self.post_attention_layernorm(h)
        return y * self.alpha + self.mlp(y), k, v


class Transformer(nn.Module):
    def __init__(self, config: GLMConfig, dtype, device):
        super().__init__()
        self.word_embeddings = VocabParallelEmbedding(config.vocab_size, config.hidden_size, dtype=dtype, device=device)
        self.layers = nn.ModuleList(GLMBlock(config, i, dtype, device) for i in range(config.num_layers))
        self.final_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layernorm_epsilon, dtype=dtype, device=device)


class GLM130B(nn.Module):
    """`logits, *per_layer = model(tokens, position_ids, attention_mask, mems=None)` as SAT's GLM130B."""

    def __init__(self, config: GLMConfig, dtype=torch.float32, device="cpu", attention: str = "auto"):
        super().__init__()
        self.config = config
        self.transformer = Transformer(config, dtype, device)
        for p in self.parameters():
            p.requires_grad_(False)
        self.rotary = RotaryEmbedding(config.head_dim, config.exact_rope, config.max_sequence_length)
        self.attention = attention  # "plain" (SAT's exact op order), "sdpa", or "auto" (sdpa unless fp32/fp16)
        self.offload = NO_OFFLOAD  # a model.offload.LayerStreamer when some layers' weights are streamed (--bminf)

    @property
    def dtype(self) -> torch.dtype:
        return self.transformer.final_layernorm.weight.dtype

    def uses_sdpa(self) -> bool:
        if self.attention == "auto":
            return self.dtype == torch.bfloat16
        return self.attention == "sdpa"

    def _run(self, tokens, position_ids, attention_mask, past, logits_index=None, parallel_output=False,
             keep_kv=True):
        h = self.transformer.word_embeddings(tokens)
        cos, sin = self.rotary.cos_sin(position_ids, h.dtype)
        use_sdpa = self.uses_sdpa()
        mask = attention_mask.bool()
        if use_sdpa:  # additive mask with a finite floor: fully masked (padding) rows stay uniform, as in SAT
            mask = torch.zeros(mask.shape, dtype=h.dtype, device=h.device).masked_fill_(mask, torch.finfo(h.dtype).min)
        new_kv = []
        with self.offload.forward():
            for i, layer in enumerate(self.transformer.layers):
                with self.offload.layer(i):
                    h, k, v = layer(h, cos, sin, mask, past, use_sdpa)
                if keep_kv:
                    new_kv.append((k, v))
        if logits_index is not None:  # only the rows whose logits are wanted: [b] or [b, k] positions
            index = logits_index.to(h.device)
            index = index[:, None] if index.dim() == 1 else index
            h = h.gather(1, index[..., None].expand(-1, -1, h.shape[-1]))
        h = self.transformer.final_layernorm(h)
        logits = cpu.linear(h, self.transformer.word_embeddings.weight)  # F.linear; a GEMV kernel for few rows
        if not parallel_output:
            logits = mpu.gather_from_model_parallel_region(logits)
        return logits, new_kv

    @torch.inference_mode()
    def forward(self, tokens, position_ids, attention_mask, mems=None, parallel_output=False):
        attn = self.transformer.layers[0].attention
        past = _NoPast() if mems is None else _ConcatPast(mems, attn.heads_local, attn.head_dim, tokens.shape[0])
        logits, new_kv = self._run(tokens, position_ids, attention_mask, past, parallel_output=parallel_output)
        b, s = tokens.shape
        per_layer = [{"mem_kv": torch.cat([k.transpose(1, 2).reshape(b, s, -1), v.transpose(1, 2).reshape(b, s, -1)], -1)}
                     for k, v in new_kv]
        return (logits, *per_layer)

    @torch.inference_mode()
    def logits(self, tokens, position_ids, attention_mask, logits_index: Optional[torch.Tensor] = None,
               parallel_output=False) -> torch.Tensor:
        """Logits without keeping any keys/values (scoring). logits_index [b] or [b, k]: only those rows."""
        return self._run(tokens, position_ids, attention_mask, _NoPast(), logits_index, parallel_output,
                         keep_kv=False)[0]

    @torch.inference_mode()
    def forward_with_cache(self, tokens, position_ids, attention_mask, cache: KVCache,
                           logits_index: Optional[torch.Tensor] = None, parallel_output=False) -> torch.Tensor:
        """Run the new tokens against the cached ones and append their keys/values to `cache`.

        attention_mask: bool [b|1, 1, s_new, cache.length + s_new]. logits_index [b]: return only the logits of
        that row per batch element ([b, 1, V]); None returns all rows.
        """
        if fast_decode.applies(self, tokens, attention_mask, cache):  # bf16 CPU decoding: fused kernels
            logits = fast_decode.decode_step(self, tokens, position_ids, attention_mask, cache)
        else:
            logits, _ = self._run(tokens, position_ids, attention_mask, cache, logits_index, parallel_output)
        cache.advance()
        return logits


def update_mems(per_layer: List[dict], mems: Optional[torch.Tensor]) -> torch.Tensor:
    """SAT's mems bookkeeping: stack the layers' `mem_kv` and append them along the sequence."""
    new = torch.stack([d["mem_kv"] for d in per_layer])
    return new if mems is None else torch.cat([mems.expand(-1, new.shape[1], -1, -1), new], dim=2)
