"""A fast decoding path over the same model (issue 12).

The eager `Transformer.forward` is the one the notebooks teach. This module runs the *same
modules and weights* (each layer's wq/wk/wv/wo, norms and feed-forward, so an int8 model works
too) with the changes that make decoding fast, gpt-fast style:

1. A static KV cache laid out (batch, kv_heads, max_seq_len, head_dim), the layout attention
   reads, so no transpose copy per step; written in place with index_copy_.
2. Grouped-query attention through SDPA's enable_gqa: no repeat_kv copies of keys and values.
3. RoPE with real cos/sin tables (the real and imaginary parts of `model.freqs_cis`), since
   torch.compile handles real tensors better than complex ones.
4. Attention over only the filled part of the cache. Eagerly that is exactly the filled length;
   compiled on a GPU, it is rounded up to a power of two (at least `min_bucket`) and the
   unfilled tail masked, so a whole generation needs only a handful of shapes (one compiled
   graph each). Compiled on a CPU, where one compile takes minutes, it is the whole cache.
5. Optionally `torch.compile` of the decode step. On a GPU, mode="reduce-overhead" (CUDA
   graphs: one launch per token instead of hundreds). On a CPU, weights frozen into the graph
   and inductor's own GEMM kernels (max_autotune), which use every core for a batch-1
   matrix-vector product where MKL uses one: see `FastDecoder._compile_for_cpu`.

`greedy_generate` is tested to give the same tokens as `Llama.generate(temperature=0)`.
"""
from __future__ import annotations

import math
from typing import List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .model import Transformer
from .quantize import Int8Linear


def apply_rope_real(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """`positions.apply_rotary_emb` in real arithmetic. x (bsz, seq, heads, head_dim) with
    interleaved pairs (x0, x1); cos, sin (seq, head_dim/2). (x0 + i x1)(c + i s) =
    (x0 c - x1 s) + i (x0 s + x1 c)."""
    xf = x.float().unflatten(-1, (-1, 2))
    x0, x1 = xf[..., 0], xf[..., 1]
    c, s = cos[:, None, :], sin[:, None, :]  # (seq, 1, hd/2): broadcast over batch and heads
    return torch.stack([x0 * c - x1 * s, x0 * s + x1 * c], dim=-1).flatten(-2).type_as(x)


class FastDecoder(nn.Module):
    """Prefill and one-token decode steps over a static cache. One decoder per batch size."""

    def __init__(self, model: Transformer, batch_size: int = 1, max_seq_len: Optional[int] = None,
                 compile: bool = False, min_bucket: int = 256):
        super().__init__()
        p = model.params
        self.model = model
        self.batch_size = batch_size
        self.max_seq_len = max_seq_len or p.max_seq_len
        if self.max_seq_len > p.max_seq_len:
            raise ValueError(f"max_seq_len {self.max_seq_len} exceeds the model's {p.max_seq_len}")
        weight = model.tok_embeddings.weight
        dtype = weight.dtype if weight.is_floating_point() else torch.float32
        shape = (batch_size, p.n_kv_heads, self.max_seq_len, p.head_dim)
        self.k_cache = [torch.zeros(shape, dtype=dtype, device=weight.device) for _ in model.layers]
        self.v_cache = [torch.zeros(shape, dtype=dtype, device=weight.device) for _ in model.layers]
        freqs = model.freqs_cis.to(weight.device)[: self.max_seq_len]
        self.cos, self.sin = freqs.real.contiguous(), freqs.imag.contiguous()
        self.compiled = compile
        self.min_bucket = min_bucket
        self._freeze = compile and weight.device.type == "cpu"
        if not compile:
            self._decode = self.forward
        elif self._freeze:
            self._decode = self._compile_for_cpu(model, min_bucket)
        else:  # the caches are mutated in place: keep their addresses fixed for CUDA graphs
            for t in self.k_cache + self.v_cache:
                torch._dynamo.mark_static_address(t)
            # The decode step is where per-token overhead lives; prefill runs once, eagerly.
            self._decode = torch.compile(self.forward, mode="reduce-overhead", fullgraph=True)

    def _compile_for_cpu(self, model: Transformer, min_bucket: int):
        """On a CPU the time goes to the matrix-vector products, not to launches: at batch 1
        MKL's sgemv runs on one core and reads about 11 GB/s here, half of what both cores
        stream. Freezing the weights into the compiled graph as constants lets inductor
        (max_autotune) pack each matrix once for its own C++ GEMM kernel, which splits every
        product over the cores. The packed copies double the weights' memory, and the graph keeps
        the weights it was compiled with: change the model, build a new decoder."""
        if any(isinstance(mod, Int8Linear) for mod in model.modules()):
            raise ValueError(
                "compile=True on a CPU freezes the weights into constants, which folds int8 weights back "
                "into float32 ones: float32 speed and more memory than either; decode an int8 model with "
                "compile=False, or compile the float model")
        # Each new shape costs a compile of minutes on a CPU: attend over the whole cache,
        # masked, so that one graph serves every position.
        self.min_bucket = max(min_bucket, self.max_seq_len)
        # nn.Module.__call__ on the compiled module, not self.forward: frozen weights must be
        # the parameters of the module being compiled.
        compiled = torch.compile(self, fullgraph=True, dynamic=False, options={
            "max_autotune": True, "max_autotune_gemm_backends": "CPP,ATEN"})
        return lambda *args: self._call_frozen(compiled, *args)

    @staticmethod
    def _call_frozen(compiled, *args):
        # Dynamo decides whether parameters are constants while tracing, from this global
        # flag, so it is set around the call rather than passed in torch.compile's options.
        with torch._inductor.config.patch(freezing=True):
            return compiled(*args)

    def kv_len(self, filled: int) -> int:
        """How many cache slots a step attends over when `filled` positions hold keys."""
        if not self.compiled:
            return filled
        bucket = max(self.min_bucket, 1 << math.ceil(math.log2(filled)))
        return min(bucket, self.max_seq_len)

    def _attention(self, i: int, attn, x, input_pos, cos, sin, mask, kv_len: Optional[int]):
        bsz, seqlen, _ = x.shape
        q = attn.wq(x).view(bsz, seqlen, attn.n_heads, attn.head_dim)
        k = attn.wk(x).view(bsz, seqlen, attn.n_kv_heads, attn.head_dim)
        v = attn.wv(x).view(bsz, seqlen, attn.n_kv_heads, attn.head_dim)
        q, k = apply_rope_real(q, cos, sin), apply_rope_real(k, cos, sin)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (bsz, heads, seq, hd)
        self.k_cache[i].index_copy_(2, input_pos, k)
        self.v_cache[i].index_copy_(2, input_pos, v)
        scale = 1 / math.sqrt(attn.head_dim)
        if kv_len is None:  # prefill from position 0: the new block is the whole past, causal
            out = F.scaled_dot_product_attention(q, k, v, is_causal=seqlen > 1, scale=scale, enable_gqa=True)
        else:
            keys, values = self.k_cache[i][:, :, :kv_len], self.v_cache[i][:, :, :kv_len]
            out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=scale, enable_gqa=True)
        return attn.wo(out.transpose(1, 2).reshape(bsz, seqlen, -1))

    def forward(self, tokens: torch.Tensor, input_pos: torch.Tensor, kv_len: Optional[int] = None,
                mask_tail: bool = True) -> torch.Tensor:
        """tokens (bsz, seq) at positions input_pos (seq,) -> float logits (bsz, seq, vocab).
        kv_len None: a prefill starting at position 0. Otherwise attend over cache[:kv_len],
        masking slots past each query's position; mask_tail=False says a single token's kv_len
        is exactly the filled length, so there is nothing to mask."""
        m = self.model
        h = m.tok_embeddings(tokens)
        cos, sin = self.cos[input_pos], self.sin[input_pos]
        mask = None
        if kv_len is not None and (mask_tail or tokens.shape[1] > 1):
            mask = torch.arange(kv_len, device=tokens.device)[None, :] <= input_pos[:, None]  # (seq, kv_len)
        for i, layer in enumerate(m.layers):
            h = h + self._attention(i, layer.attention, layer.attention_norm(h), input_pos, cos, sin, mask, kv_len)
            h = h + layer.feed_forward(layer.ffn_norm(h))
        return m.output(m.norm(h)).float()

    def prefill(self, tokens: torch.Tensor) -> torch.Tensor:
        """The prompt (bsz, seq) at positions 0.. -> logits of its last position (bsz, vocab)."""
        self._check(tokens, 0)
        pos = torch.arange(tokens.shape[1], device=tokens.device)
        return self.forward(tokens, pos)[:, -1]

    def decode(self, token: torch.Tensor, pos: int) -> torch.Tensor:
        """One token per row (bsz, 1) at position pos -> next-token logits (bsz, vocab)."""
        self._check(token, pos)
        input_pos = torch.tensor([pos], device=token.device)
        if self.compiled and not self._freeze:
            torch.compiler.cudagraph_mark_step_begin()
        return self._decode(token, input_pos, self.kv_len(pos + 1), self.compiled)[:, -1]

    def _check(self, tokens: torch.Tensor, start: int) -> None:
        if tokens.shape[0] != self.batch_size:
            raise ValueError(f"batch of {tokens.shape[0]} rows, but this decoder's cache holds {self.batch_size}")
        if start + tokens.shape[1] > self.max_seq_len:
            raise ValueError(f"position {start + tokens.shape[1]} is past the cache's {self.max_seq_len} slots")


@torch.inference_mode()
def greedy_generate(model: Transformer, prompt_tokens: Sequence[int], max_new_tokens: int,
                    stop_ids: Sequence[int] = (), compile: bool = False,
                    decoder: Optional[FastDecoder] = None) -> List[int]:
    """Greedy continuation of one prompt: up to max_new_tokens new tokens, stopping after (and
    not returning) a token in stop_ids. Pass a decoder to reuse its cache (and compiled graphs)."""
    if not prompt_tokens:
        raise ValueError("empty prompt: give at least one token")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    device = model.tok_embeddings.weight.device
    total = len(prompt_tokens) + max_new_tokens
    decoder = decoder or FastDecoder(model, 1, min(total, model.params.max_seq_len), compile=compile)
    tokens = torch.tensor([list(prompt_tokens)], device=device)
    logits = decoder.prefill(tokens)
    out: List[int] = []
    pos = len(prompt_tokens)
    while True:
        next_token = torch.argmax(logits, dim=-1)  # (1,)
        token = int(next_token)
        if token in stop_ids:
            break
        out.append(token)
        if len(out) == max_new_tokens or pos >= decoder.max_seq_len:
            break
        logits = decoder.decode(next_token[:, None], pos)
        pos += 1
    return out
