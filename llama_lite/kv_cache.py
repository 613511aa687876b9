"""Notebook 03: the KV cache. Keys and values of past tokens never change, so keep them."""
import torch

from .config import ModelArgs


def kv_cache_bytes(args: ModelArgs, batch_size: int, seq_len: int, dtype: torch.dtype = torch.float16) -> int:
    """2 (K and V) x layers x kv heads x head_dim x tokens x batch x bytes per element."""
    element = torch.empty((), dtype=dtype).element_size()
    return 2 * args.n_layers * args.n_kv_heads * args.head_dim * seq_len * batch_size * element


class KVCache(torch.nn.Module):
    """One layer's static cache, allocated once for max_batch_size x max_seq_len.

    Pre-allocating (as Meta's reference and gpt-fast do) means no copy per step and a fixed
    memory footprint, at the price of reserving the whole context up front.
    """

    def __init__(self, max_batch_size: int, max_seq_len: int, n_kv_heads: int, head_dim: int,
                 dtype: torch.dtype = torch.float32, device=None):
        super().__init__()
        shape = (max_batch_size, max_seq_len, n_kv_heads, head_dim)
        self.register_buffer("cache_k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("cache_v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    @property
    def max_seq_len(self) -> int:
        return self.cache_k.shape[1]

    def update(self, start_pos: int, xk: torch.Tensor, xv: torch.Tensor):
        """Write xk, xv (bsz, seqlen, n_kv_heads, head_dim) at start_pos; return all keys and
        values so far, (bsz, start_pos + seqlen, n_kv_heads, head_dim)."""
        bsz, seqlen = xk.shape[:2]
        end = start_pos + seqlen
        if end > self.max_seq_len:
            raise ValueError(
                f"position {end} is past the KV cache's {self.max_seq_len} slots; "
                "build the model with a larger max_seq_len"
            )
        if bsz > self.cache_k.shape[0]:
            raise ValueError(f"batch of {bsz} is larger than the cache's max_batch_size {self.cache_k.shape[0]}")
        self.cache_k[:bsz, start_pos:end] = xk
        self.cache_v[:bsz, start_pos:end] = xv
        return self.cache_k[:bsz, :end], self.cache_v[:bsz, :end]

    def reorder(self, index: torch.Tensor) -> None:
        """Keep batch rows `index` (beam search: each surviving beam takes its parent's past)."""
        n = index.shape[0]
        self.cache_k[:n] = self.cache_k.index_select(0, index)
        self.cache_v[:n] = self.cache_v.index_select(0, index)
