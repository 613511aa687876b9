"""The assembled Transformer: the components of notebooks 01-05 stacked as Llama-2 stacks them."""
from __future__ import annotations

import torch
from torch import nn

from .attention import Attention
from .config import ModelArgs
from .feedforward import FeedForward
from .kv_cache import KVCache
from .norm import RMSNorm
from .positions import precompute_freqs_cis


class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.attention = Attention(args)
        self.feed_forward = FeedForward(args.dim, args.ffn_hidden_dim)
        self.attention_norm = RMSNorm(args.dim, eps=args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, eps=args.norm_eps)

    def forward(self, x: torch.Tensor, start_pos: int, freqs_cis: torch.Tensor,
                mask: torch.Tensor | None) -> torch.Tensor:
        # Pre-norm: each sub-layer sees a normalized input, and the residual stream itself is
        # never normalized, so gradients reach early layers undamped (notebook 01).
        h = x + self.attention(self.attention_norm(x), start_pos, freqs_cis, mask)
        return h + self.feed_forward(self.ffn_norm(h))


class Transformer(nn.Module):
    def __init__(self, params: ModelArgs):
        super().__init__()
        self.params = params
        self.tok_embeddings = nn.Embedding(params.vocab_size, params.dim)
        self.layers = nn.ModuleList(TransformerBlock(params) for _ in range(params.n_layers))
        self.norm = RMSNorm(params.dim, eps=params.norm_eps)
        self.output = nn.Linear(params.dim, params.vocab_size, bias=False)
        if params.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        # A plain attribute, not a buffer: Module.to(bfloat16) would cast a complex buffer to
        # real and silently drop the imaginary part. One row per position forward accepts
        # (Meta's reference makes twice as many, for fine-tuning past max_seq_len). Computed on
        # the CPU even when the model is built on the meta device to be loaded (a small table;
        # forward moves it to the activations' device, the one place that knows it).
        with torch.device("cpu"):
            self.freqs_cis = precompute_freqs_cis(params.head_dim, params.max_seq_len, params.rope_theta)

    # -- KV cache -------------------------------------------------------------------------
    def setup_cache(self, max_batch_size: int = 1, max_seq_len: int | None = None,
                    dtype: torch.dtype | None = None, device=None) -> None:
        """Give every attention layer a static KV cache; forward then attends over the past."""
        p = self.params
        max_seq_len = max_seq_len or p.max_seq_len
        weight = self.tok_embeddings.weight
        dtype = dtype or weight.dtype
        device = device or weight.device
        for layer in self.layers:
            layer.attention.cache = KVCache(max_batch_size, max_seq_len, p.n_kv_heads, p.head_dim, dtype, device)

    def clear_cache(self) -> None:
        for layer in self.layers:
            layer.attention.cache = None

    @property
    def caches(self) -> list[KVCache]:
        return [layer.attention.cache for layer in self.layers if layer.attention.cache is not None]

    # -- forward --------------------------------------------------------------------------
    def forward(self, tokens: torch.Tensor, start_pos: int = 0) -> torch.Tensor:
        """tokens (bsz, seqlen) of positions start_pos .. start_pos+seqlen-1 -> float logits
        (bsz, seqlen, vocab). start_pos > 0 needs a KV cache (setup_cache) holding the past."""
        if tokens.ndim != 2:
            raise ValueError(f"tokens must be (batch, seq), got shape {tuple(tokens.shape)}")
        bsz, seqlen = tokens.shape
        if seqlen == 0:
            raise ValueError("tokens is empty: give at least one token")
        if start_pos > 0 and not self.caches:
            raise ValueError("start_pos > 0 needs the past's keys and values: call setup_cache() first")
        if start_pos + seqlen > self.params.max_seq_len:
            raise ValueError(
                f"positions up to {start_pos + seqlen} exceed max_seq_len={self.params.max_seq_len}; "
                "shorten the prompt or build with a larger max_seq_len"
            )
        h = self.tok_embeddings(tokens)  # (bsz, seqlen, dim)
        self.freqs_cis = self.freqs_cis.to(h.device)  # a no-op once it is there
        freqs_cis = self.freqs_cis[start_pos: start_pos + seqlen]

        mask = None
        if seqlen > 1:
            # Causal mask over [cached past | new tokens]: the past is all visible, the new
            # block is lower-triangular. (seqlen, start_pos + seqlen)
            mask = torch.full((seqlen, seqlen), float("-inf"), device=tokens.device).triu(1)
            mask = torch.hstack([torch.zeros((seqlen, start_pos), device=tokens.device), mask]).type_as(h)

        for layer in self.layers:
            h = layer(h, start_pos, freqs_cis, mask)
        h = self.norm(h)
        return self.output(h).float()
