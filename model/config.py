"""Model hyper-parameters, one dataclass passed whole (the flags of configs/model_glm_130b.sh)."""
from dataclasses import dataclass
from typing import Optional


@dataclass
class GLMConfig:
    num_layers: int = 70
    hidden_size: int = 12288
    num_attention_heads: int = 96
    inner_hidden_size: Optional[int] = 32768
    vocab_size: int = 150528
    max_sequence_length: int = 2048
    layernorm_epsilon: float = 1e-5
    exact_rope: bool = False  # False: SAT 0.2.x numerics (inv_freq rounded to fp16, fp16 tables in fp16 models)

    def __post_init__(self):
        if self.inner_hidden_size is None:
            self.inner_hidden_size = 4 * self.hidden_size * 2 // 3
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"--hidden-size {self.hidden_size} is not divisible by "
                             f"--num-attention-heads {self.num_attention_heads}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def deepnorm_alpha(self) -> float:
        return (2.0 * self.num_layers) ** 0.5

    @classmethod
    def from_args(cls, args) -> "GLMConfig":
        return cls(num_layers=args.num_layers, hidden_size=args.hidden_size,
                   num_attention_heads=args.num_attention_heads, inner_hidden_size=args.inner_hidden_size,
                   vocab_size=args.vocab_size, max_sequence_length=args.max_sequence_length,
                   layernorm_epsilon=getattr(args, "layernorm_epsilon", 1e-5),
                   exact_rope=getattr(args, "exact_rope", False))
