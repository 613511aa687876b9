"""Notebook 02: rotary position embeddings (RoPE) in Meta's complex-number form.

Meta's layout pairs neighbouring dimensions (0,1), (2,3), ... of each head and rotates each
pair as one complex number. Hugging Face's checkpoints pair dimension i with i + head_dim/2
("rotate half"); the two are the same rotation once the rows of W_q and W_k are permuted,
which `permute_rotate_half_to_interleaved` does.
"""
import torch


def precompute_freqs_cis(dim: int, end: int, theta: float = 10000.0) -> torch.Tensor:
    """e^{i m theta_j} for positions m < end and pair frequencies theta_j = theta^(-2j/dim).

    Returns a complex64 tensor of shape (end, dim // 2).
    """
    freqs = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float32)[: dim // 2] / dim))
    t = torch.arange(end, dtype=torch.float32)
    freqs = torch.outer(t, freqs)  # (end, dim/2): angle m * theta_j
    return torch.polar(torch.ones_like(freqs), freqs)


def reshape_for_broadcast(freqs_cis: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    # freqs_cis (seq, hd/2) -> (1, seq, 1, hd/2) to meet x (bsz, seq, heads, hd/2)
    assert freqs_cis.shape == (x.shape[1], x.shape[-1]), (freqs_cis.shape, x.shape)
    shape = [d if i == 1 or i == x.ndim - 1 else 1 for i, d in enumerate(x.shape)]
    return freqs_cis.view(*shape)


def apply_rotary_emb(xq: torch.Tensor, xk: torch.Tensor, freqs_cis: torch.Tensor):
    """Rotate each (even, odd) pair of q and k by its position's angle.

    xq: (bsz, seq, n_heads, head_dim), xk: (bsz, seq, n_kv_heads, head_dim),
    freqs_cis: (seq, head_dim // 2) complex.
    """
    # (bsz, seq, heads, head_dim) -> (bsz, seq, heads, head_dim/2) complex
    xq_ = torch.view_as_complex(xq.float().reshape(*xq.shape[:-1], -1, 2))
    xk_ = torch.view_as_complex(xk.float().reshape(*xk.shape[:-1], -1, 2))
    freqs_cis = reshape_for_broadcast(freqs_cis, xq_)
    xq_out = torch.view_as_real(xq_ * freqs_cis).flatten(3)
    xk_out = torch.view_as_real(xk_ * freqs_cis).flatten(3)
    return xq_out.type_as(xq), xk_out.type_as(xk)


def permute_rotate_half_to_interleaved(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Rows of a Hugging Face W_q/W_k (rotate-half pairing) -> Meta's interleaved pairing.

    The inverse of the `permute` in transformers' convert_llama_weights_to_hf.py.
    w: (n_heads * head_dim, dim).
    """
    out_dim, in_dim = w.shape
    head_dim = out_dim // n_heads
    # HF row order within a head: [x_0 .. x_{h/2-1}, y_0 .. y_{h/2-1}]; Meta's: [x_0, y_0, x_1, y_1, ...]
    return w.view(n_heads, 2, head_dim // 2, in_dim).transpose(1, 2).reshape(out_dim, in_dim)


def permute_interleaved_to_rotate_half(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Meta's interleaved W_q/W_k rows -> Hugging Face's rotate-half order (what HF's converter does)."""
    out_dim, in_dim = w.shape
    head_dim = out_dim // n_heads
    return w.view(n_heads, head_dim // 2, 2, in_dim).transpose(1, 2).reshape(out_dim, in_dim)
