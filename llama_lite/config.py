"""ModelArgs: every number that fixes a Llama's shape, and presets for the models the series uses.

Reading them from a checkpoint's own settings is each format's job: checkpoint.py (Meta's
params.json), hf.py (config.json), gguf.py (GGUF metadata).
"""
from __future__ import annotations

from dataclasses import dataclass, replace


@dataclass
class ModelArgs:
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int | None = None  # None means n_heads (multi-head attention)
    vocab_size: int = 32000
    multiple_of: int = 256  # SwiGLU hidden size is rounded up to a multiple of this
    ffn_dim_multiplier: float | None = None
    hidden_dim: int | None = None  # set when a checkpoint states it; else Meta's rule decides
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_seq_len: int = 4096
    tie_embeddings: bool = False

    def __post_init__(self):
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        for name in ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "max_seq_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"ModelArgs.{name} must be >= 1, got {getattr(self, name)}")
        if self.dim % self.n_heads:
            raise ValueError(f"dim={self.dim} is not divisible by n_heads={self.n_heads}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(
                f"n_heads={self.n_heads} is not a multiple of n_kv_heads={self.n_kv_heads}: "
                "each key/value head must serve a whole group of query heads"
            )
        if self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim} must be even: RoPE rotates pairs of dimensions")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def ffn_hidden_dim(self) -> int:
        if self.hidden_dim is not None:
            return self.hidden_dim
        from .feedforward import ffn_hidden_dim

        return ffn_hidden_dim(self.dim, self.multiple_of, self.ffn_dim_multiplier)

    def replace(self, **changes) -> ModelArgs:
        return replace(self, **changes)

    @classmethod
    def from_name(cls, name: str) -> ModelArgs:
        key = name.lower().replace("_", "-")
        if key not in PRESETS:
            raise ValueError(f"unknown model name {name!r}; known names: {', '.join(sorted(PRESETS))}")
        return cls(**PRESETS[key])



# Llama-2 numbers are Meta's params.json (vocab from its tokenizer, context from the paper);
# SmolLM2's are its config.json, the same ones its GGUF file states.
PRESETS = {
    "llama2-7b": dict(dim=4096, n_layers=32, n_heads=32, vocab_size=32000, multiple_of=256, norm_eps=1e-5),
    "llama2-13b": dict(dim=5120, n_layers=40, n_heads=40, vocab_size=32000, multiple_of=256, norm_eps=1e-5),
    "llama2-70b": dict(
        dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, vocab_size=32000,
        multiple_of=4096, ffn_dim_multiplier=1.3, norm_eps=1e-5,
    ),
    "smollm2-135m": dict(
        dim=576, n_layers=30, n_heads=9, n_kv_heads=3, vocab_size=49152, multiple_of=256,
        norm_eps=1e-5, rope_theta=100000.0, max_seq_len=8192, tie_embeddings=True,
    ),
}


def count_parameters(args: ModelArgs) -> int:
    """Parameters of the Transformer these args describe, from the shapes alone."""
    kv_dim = args.n_kv_heads * args.head_dim
    attention = args.dim * args.dim * 2 + args.dim * kv_dim * 2  # wq, wo; wk, wv
    feedforward = 3 * args.dim * args.ffn_hidden_dim  # w1, w2, w3
    norms = 2 * args.dim  # attention_norm, ffn_norm
    embeddings = args.vocab_size * args.dim * (1 if args.tie_embeddings else 2)
    return embeddings + args.n_layers * (attention + feedforward + norms) + args.dim
