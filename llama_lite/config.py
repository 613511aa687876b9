"""ModelArgs: every number that fixes a Llama's shape, and presets for the models the series uses."""
from __future__ import annotations

import json
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Optional


@dataclass
class ModelArgs:
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: Optional[int] = None  # None means n_heads (multi-head attention)
    vocab_size: int = 32000
    multiple_of: int = 256  # SwiGLU hidden size is rounded up to a multiple of this
    ffn_dim_multiplier: Optional[float] = None
    hidden_dim: Optional[int] = None  # set when a checkpoint states it; else Meta's rule decides
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_seq_len: int = 4096
    max_batch_size: int = 1
    tie_embeddings: bool = False

    def __post_init__(self):
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        for name in ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "max_seq_len", "max_batch_size"):
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

    def replace(self, **changes) -> "ModelArgs":
        return replace(self, **changes)

    @classmethod
    def from_name(cls, name: str) -> "ModelArgs":
        key = name.lower().replace("_", "-")
        if key not in PRESETS:
            raise ValueError(f"unknown model name {name!r}; known names: {', '.join(sorted(PRESETS))}")
        return cls(**PRESETS[key])

    @classmethod
    def from_meta_params(cls, params: dict, vocab_size: Optional[int] = None) -> "ModelArgs":
        """From Meta's params.json. Llama-2 ships vocab_size=-1 there: the tokenizer (or the
        embedding matrix) decides it, so the caller passes it in."""
        known = {f.name for f in fields(cls)}
        kw = {k: v for k, v in params.items() if k in known}
        if kw.get("vocab_size", -1) in (-1, None):
            if vocab_size is None:
                raise ValueError("params.json has vocab_size=-1 and no vocab_size was given")
            kw["vocab_size"] = vocab_size
        kw.setdefault("max_seq_len", 4096)
        return cls(**kw)

    @classmethod
    def from_hf_config(cls, config: dict) -> "ModelArgs":
        """From a Hugging Face config.json of model_type 'llama'."""
        if config.get("model_type", "llama") != "llama":
            raise ValueError(f"config.json has model_type={config.get('model_type')!r}; only 'llama' is supported")
        rope = config.get("rope_parameters") or {}
        if (config.get("rope_scaling") or rope.get("rope_type", "default")) not in (None, "default"):
            raise ValueError("RoPE scaling (Llama-3.1 style) is not supported: Llama-2 uses plain RoPE")
        dim, n_heads = config["hidden_size"], config["num_attention_heads"]
        if config.get("head_dim") not in (None, dim // n_heads):
            raise ValueError(f"head_dim={config['head_dim']} differs from hidden_size/num_attention_heads")
        return cls(
            dim=dim,
            n_layers=config["num_hidden_layers"],
            n_heads=n_heads,
            n_kv_heads=config.get("num_key_value_heads") or n_heads,
            vocab_size=config["vocab_size"],
            hidden_dim=config["intermediate_size"],
            norm_eps=config.get("rms_norm_eps", 1e-5),
            rope_theta=config.get("rope_theta", rope.get("rope_theta", 10000.0)),
            max_seq_len=config.get("max_position_embeddings", 4096),
            tie_embeddings=bool(config.get("tie_word_embeddings", False)),
        )

    def to_hf_config(self) -> dict:
        """The inverse of from_hf_config: the fields of a config.json for these args (the
        transformers reference in tests and benchmarks, and the checkpoints they write)."""
        return dict(model_type="llama", architectures=["LlamaForCausalLM"], hidden_act="silu",
                    hidden_size=self.dim, intermediate_size=self.ffn_hidden_dim, num_hidden_layers=self.n_layers,
                    num_attention_heads=self.n_heads, num_key_value_heads=self.n_kv_heads,
                    vocab_size=self.vocab_size, rms_norm_eps=self.norm_eps, rope_theta=self.rope_theta,
                    max_position_embeddings=self.max_seq_len, tie_word_embeddings=self.tie_embeddings)

    @classmethod
    def from_json(cls, path) -> "ModelArgs":
        return cls(**json.loads(Path(path).read_text()))


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
