"""Notebook 04: one attention module for multi-head, multi-query and grouped-query attention.

n_kv_heads == n_heads is MHA, n_kv_heads == 1 is MQA, anything between that divides n_heads is
GQA: each key/value head is shared by n_heads // n_kv_heads query heads.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelArgs
from .kv_cache import KVCache
from .positions import apply_rotary_emb
from .quantize import is_quantized


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """(bsz, seq, n_kv_heads, head_dim) -> (bsz, seq, n_kv_heads * n_rep, head_dim), each kv
    head repeated n_rep times in place, so query head h reads kv head h // n_rep."""
    bs, slen, n_kv_heads, head_dim = x.shape
    if n_rep == 1:
        return x
    return x[:, :, :, None, :].expand(bs, slen, n_kv_heads, n_rep, head_dim).reshape(bs, slen, n_kv_heads * n_rep, head_dim)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_heads = args.n_heads
        self.n_kv_heads = args.n_kv_heads
        self.n_rep = self.n_heads // self.n_kv_heads
        self.head_dim = args.head_dim
        self.wq = nn.Linear(args.dim, args.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(args.dim, self.n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(args.dim, self.n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(args.n_heads * self.head_dim, args.dim, bias=False)
        self.cache: KVCache | None = None  # set by Transformer.setup_cache

    def forward(self, x: torch.Tensor, start_pos: int, freqs_cis: torch.Tensor,
                mask: torch.Tensor | None) -> torch.Tensor:
        bsz, seqlen, _ = x.shape
        xq = self.wq(x).view(bsz, seqlen, self.n_heads, self.head_dim)
        xk = self.wk(x).view(bsz, seqlen, self.n_kv_heads, self.head_dim)
        xv = self.wv(x).view(bsz, seqlen, self.n_kv_heads, self.head_dim)
        xq, xk = apply_rotary_emb(xq, xk, freqs_cis)

        if self.cache is not None:
            keys, values = self.cache.update(start_pos, xk, xv)  # (bsz, start_pos + seqlen, kv, hd)
        else:
            keys, values = xk, xv

        # Query head h reads kv head h // n_rep. A decode step on the CPU hands SDPA the shared
        # heads as they are (enable_gqa): recent torch's CPU kernel reads them in place instead of
        # copying the whole cache n_rep times every step (notebook 04 measures that copy; an older
        # torch copies inside SDPA, as repeat_kv would). Prompts (with their mask) and GPUs copy
        # with repeat_kv, as Meta's reference does: whether a fused GPU kernel takes enable_gqa
        # depends on mask, dtype, GPU and torch version (CUDA's memory-efficient kernel never
        # does, flash takes no mask), one that refuses falls back to the slower math kernel, and
        # on Apple GPUs torch 2.5 and 2.6 fail on it.
        share = self.n_rep > 1 and mask is None and x.device.type == "cpu"
        if self.n_rep > 1 and not share:
            keys = repeat_kv(keys, self.n_rep)  # (bsz, cache_len, n_heads, hd)
            values = repeat_kv(values, self.n_rep)

        # (bsz, seq, heads, hd) -> (bsz, heads, seq, hd)
        xq, keys, values = xq.transpose(1, 2), keys.transpose(1, 2), values.transpose(1, 2)
        # softmax(q k^T / sqrt(hd) + mask) v; notebook 04 writes it out and checks it against this.
        out = F.scaled_dot_product_attention(xq, keys, values, attn_mask=mask, scale=1 / math.sqrt(self.head_dim),
                                             enable_gqa=share)
        out = out.transpose(1, 2).reshape(bsz, seqlen, -1)  # (bsz, seq, heads * hd)
        return self.wo(out)


# -- Changing the number of key/value heads of a trained model (notebook 04) -------------------

def regroup_kv_weight(w: torch.Tensor, n_kv_heads: int, new_n_kv_heads: int) -> torch.Tensor:
    """Rows of a W_k or W_v, (n_kv_heads * head_dim, dim), for new_n_kv_heads key/value heads.

    Fewer heads: each new head is the mean of the old heads it replaces (the GQA paper's
    "mean-pooling" before uptraining; an approximation). More heads: each old head is repeated,
    so new head j copies old head j // n_rep, exactly the sharing repeat_kv spells out (exact).
    """
    out_dim, dim = w.shape
    head_dim = out_dim // n_kv_heads
    if new_n_kv_heads <= n_kv_heads:
        if n_kv_heads % new_n_kv_heads:
            raise ValueError(f"{n_kv_heads} kv heads cannot be pooled into {new_n_kv_heads} equal groups")
        group = n_kv_heads // new_n_kv_heads
        return w.view(new_n_kv_heads, group, head_dim, dim).mean(dim=1).reshape(-1, dim)
    if new_n_kv_heads % n_kv_heads:
        raise ValueError(f"{n_kv_heads} kv heads cannot be repeated into {new_n_kv_heads}")
    n_rep = new_n_kv_heads // n_kv_heads
    return w.view(n_kv_heads, 1, head_dim, dim).expand(n_kv_heads, n_rep, head_dim, dim).reshape(-1, dim)


@torch.no_grad()
def with_kv_heads(model: nn.Module, n_kv_heads: int) -> nn.Module:
    """A new Transformer like `model` but with n_kv_heads key/value heads per layer (1 is MQA,
    n_heads is MHA), its W_k/W_v regrouped by regroup_kv_weight; every other weight is copied.
    The original model is unchanged."""
    if is_quantized(model):
        raise ValueError("with_kv_heads regroups float weights; this model has int8 linears (load it without quantize)")
    args = model.params
    new_args = args.replace(n_kv_heads=n_kv_heads)  # validates n_heads % n_kv_heads
    state = {k: v.clone() for k, v in model.state_dict().items()}
    for i in range(args.n_layers):
        for name in ("wk", "wv"):
            key = f"layers.{i}.attention.{name}.weight"
            state[key] = regroup_kv_weight(state[key], args.n_kv_heads, n_kv_heads).contiguous()
    with torch.device("meta"):  # no random init of weights that are overwritten next
        new = type(model)(new_args)
    new.load_state_dict(state, assign=True)
    if new_args.tie_embeddings:
        new.output.weight = new.tok_embeddings.weight
    new.freqs_cis = model.freqs_cis.clone()
    return new.eval()
