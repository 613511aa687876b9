"""llama_lite.positions (Meta's interleaved, complex-number RoPE) against transformers'
LlamaRotaryEmbedding / apply_rotary_pos_emb (rotate-half layout) on the same q and k."""
import math

import pytest
import torch

from llama_lite import ModelArgs
from llama_lite.model import Transformer
from llama_lite.positions import (
    apply_rotary_emb,
    permute_interleaved_to_rotate_half,
    permute_rotate_half_to_interleaved,
    precompute_freqs_cis,
)

transformers = pytest.importorskip("transformers")
from transformers import LlamaConfig  # noqa: E402
from transformers.models.llama.modeling_llama import (  # noqa: E402
    LlamaRotaryEmbedding,
    apply_rotary_pos_emb,
    rotate_half,
)


def half_order(head_dim: int) -> torch.Tensor:
    """Index that takes one head's interleaved vector [x0, y0, x1, y1, ...] to rotate-half
    order [x0, x1, ..., y0, y1, ...]."""
    return torch.cat([torch.arange(0, head_dim, 2), torch.arange(1, head_dim, 2)])


def hf_rope(q, k, head_dim, theta, positions):
    """transformers' RoPE on (bsz, seq, heads, hd) tensors in rotate-half layout."""
    n_heads = q.shape[2]
    config = LlamaConfig(hidden_size=n_heads * head_dim, num_attention_heads=n_heads, rope_theta=theta,
                         max_position_embeddings=4096)
    rotary = LlamaRotaryEmbedding(config=config)
    position_ids = torch.as_tensor(positions)[None].expand(q.shape[0], -1)
    cos, sin = rotary(q, position_ids)  # (bsz, seq, hd)
    return apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=2)


@pytest.mark.parametrize("theta", [10000.0, 100000.0])
@pytest.mark.parametrize("head_dim", [8, 64, 128])
def test_freqs_cis_matches_hf_cos_sin(head_dim, theta):
    end = 257
    fc = precompute_freqs_cis(head_dim, end, theta)
    assert fc.shape == (end, head_dim // 2) and fc.dtype == torch.complex64
    config = LlamaConfig(hidden_size=4 * head_dim, num_attention_heads=4, rope_theta=theta, max_position_embeddings=end)
    rotary = LlamaRotaryEmbedding(config=config)
    x = torch.zeros(1, end, head_dim)
    cos, sin = rotary(x, torch.arange(end)[None])
    half = head_dim // 2
    # HF repeats the same frequencies in both halves: cos = [cos(m theta_j), cos(m theta_j)]
    torch.testing.assert_close(cos[0, :, :half], fc.real, atol=1e-5, rtol=0)
    torch.testing.assert_close(cos[0, :, half:], fc.real, atol=1e-5, rtol=0)
    torch.testing.assert_close(sin[0, :, :half], fc.imag, atol=1e-5, rtol=0)
    torch.testing.assert_close(sin[0, :, half:], fc.imag, atol=1e-5, rtol=0)
    # and the formula itself, in float64: theta_j = theta^(-2j/d)
    m = torch.arange(end, dtype=torch.float64)[:, None]
    j = torch.arange(half, dtype=torch.float64)[None]
    angle = m * theta ** (-2 * j / head_dim)
    torch.testing.assert_close(torch.angle(fc).double(), torch.atan2(angle.sin(), angle.cos()), atol=2e-4, rtol=0)
    torch.testing.assert_close(fc.abs(), torch.ones(end, half), atol=1e-6, rtol=0)


@pytest.mark.parametrize("n_heads,n_kv_heads,head_dim,theta", [(4, 4, 16, 10000.0), (9, 3, 64, 100000.0),
                                                              (8, 2, 128, 10000.0)])
def test_apply_rotary_emb_matches_hf_up_to_the_rotate_half_permutation(n_heads, n_kv_heads, head_dim, theta):
    g = torch.Generator().manual_seed(0)
    bsz, seq, start = 2, 37, 5
    q = torch.randn(bsz, seq, n_heads, head_dim, generator=g)
    k = torch.randn(bsz, seq, n_kv_heads, head_dim, generator=g)
    fc = precompute_freqs_cis(head_dim, start + seq, theta)[start:]
    q_meta, k_meta = apply_rotary_emb(q, k, fc)

    perm = half_order(head_dim)
    q_hf, k_hf = hf_rope(q[..., perm], k[..., perm], head_dim, theta, torch.arange(start, start + seq))
    torch.testing.assert_close(q_meta[..., perm], q_hf, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(k_meta[..., perm], k_hf, atol=1e-5, rtol=1e-5)

    # Without the permutation the two disagree: the layouts really differ.
    q_wrong, _ = hf_rope(q, k, head_dim, theta, torch.arange(start, start + seq))
    assert (q_wrong - q_meta).abs().max() > 0.1


def test_apply_rotary_emb_keeps_dtype_and_norm():
    g = torch.Generator().manual_seed(1)
    q = torch.randn(1, 10, 2, 32, generator=g)
    fc = precompute_freqs_cis(32, 10, 10000.0)
    for dtype in (torch.float32, torch.bfloat16):
        qr, kr = apply_rotary_emb(q.to(dtype), q.to(dtype), fc)
        assert qr.dtype == dtype and kr.dtype == dtype
    qr, _ = apply_rotary_emb(q, q, fc)
    # a rotation: every 2-D pair keeps its length, position 0 is the identity
    pairs = lambda x: x.reshape(*x.shape[:-1], -1, 2).norm(dim=-1)  # noqa: E731
    torch.testing.assert_close(pairs(qr), pairs(q), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(qr[:, 0], q[:, 0])


def test_apply_rotary_emb_equals_explicit_block_diagonal_rotation():
    head_dim, theta, seq = 16, 10000.0, 12
    g = torch.Generator().manual_seed(2)
    q = torch.randn(1, seq, 1, head_dim, generator=g, dtype=torch.float64)
    fc = precompute_freqs_cis(head_dim, seq, theta)
    qr, _ = apply_rotary_emb(q, q, fc)
    freqs = theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    for m in range(seq):
        R = torch.zeros(head_dim, head_dim, dtype=torch.float64)
        for j, f in enumerate(freqs):
            c, s = math.cos(m * f), math.sin(m * f)
            R[2 * j: 2 * j + 2, 2 * j: 2 * j + 2] = torch.tensor([[c, -s], [s, c]])
        torch.testing.assert_close(qr[0, m, 0], R @ q[0, m, 0], atol=1e-5, rtol=0)


@pytest.mark.parametrize("theta", [10000.0, 100000.0])
def test_scores_depend_only_on_relative_offset(theta):
    """q_m . k_n after rotation is a function of m - n: checked for every offset in
    [-200, 200] at several absolute positions."""
    head_dim, end = 64, 1200
    g = torch.Generator().manual_seed(3)
    q = torch.randn(head_dim, generator=g)
    k = torch.randn(head_dim, generator=g)
    fc = precompute_freqs_cis(head_dim, end, theta)
    qs, ks = apply_rotary_emb(q.expand(1, end, 1, head_dim), k.expand(1, end, 1, head_dim), fc)
    qs, ks = qs[0, :, 0].double(), ks[0, :, 0].double()
    offsets = range(-200, 201)
    anchors = [0, 1, 7, 250, 600, 900]
    for d in offsets:
        scores = torch.stack([qs[n + d] @ ks[n] for n in anchors if 0 <= n + d < end])
        # exact value from the math: sum_j Re(q_j conj(k_j) e^{i d theta_j})
        qc = torch.view_as_complex(q.double().reshape(-1, 2))
        kc = torch.view_as_complex(k.double().reshape(-1, 2))
        freqs = theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
        expected = (qc * kc.conj() * torch.polar(torch.ones_like(freqs), d * freqs)).real.sum()
        torch.testing.assert_close(scores, expected.expand_as(scores), atol=2e-3, rtol=1e-4)


@pytest.mark.parametrize("n_heads,head_dim", [(1, 2), (4, 16), (9, 64), (3, 64), (32, 128)])
def test_permutations_round_trip_and_match_the_index(n_heads, head_dim):
    g = torch.Generator().manual_seed(4)
    w = torch.randn(n_heads * head_dim, 24, generator=g)
    to_half = permute_interleaved_to_rotate_half(w, n_heads)
    back = permute_rotate_half_to_interleaved(to_half, n_heads)
    assert torch.equal(back, w)
    assert torch.equal(permute_interleaved_to_rotate_half(permute_rotate_half_to_interleaved(w, n_heads), n_heads), w)
    # it is a pure row permutation: per head, rows [0, 2, 4, ..., 1, 3, 5, ...]
    index = torch.cat([h * head_dim + half_order(head_dim) for h in range(n_heads)])
    assert torch.equal(to_half, w[index])
    # transformers' convert_llama_weights_to_hf.permute, written out (the script is not shipped in v5)
    hf_permute = w.view(n_heads, head_dim // 2, 2, w.shape[1]).transpose(1, 2).reshape(w.shape)
    assert torch.equal(to_half, hf_permute)


def test_same_attention_scores_meta_layout_vs_hf_layout():
    """W_q, W_k in Meta's row order + interleaved RoPE == HF's row order + rotate_half."""
    dim, n_heads, head_dim, seq, theta = 48, 3, 16, 20, 10000.0
    g = torch.Generator().manual_seed(5)
    x = torch.randn(1, seq, dim, generator=g)
    wq = torch.randn(n_heads * head_dim, dim, generator=g)
    wk = torch.randn(n_heads * head_dim, dim, generator=g)
    fc = precompute_freqs_cis(head_dim, seq, theta)
    q, k = (x @ wq.T).view(1, seq, n_heads, head_dim), (x @ wk.T).view(1, seq, n_heads, head_dim)
    qm, km = apply_rotary_emb(q, k, fc)
    scores_meta = torch.einsum("bqhd,bkhd->bhqk", qm, km)

    wq_hf, wk_hf = permute_interleaved_to_rotate_half(wq, n_heads), permute_interleaved_to_rotate_half(wk, n_heads)
    q2, k2 = (x @ wq_hf.T).view(1, seq, n_heads, head_dim), (x @ wk_hf.T).view(1, seq, n_heads, head_dim)
    qh, kh = hf_rope(q2, k2, head_dim, theta, torch.arange(seq))
    scores_hf = torch.einsum("bqhd,bkhd->bhqk", qh, kh)
    torch.testing.assert_close(scores_meta, scores_hf, atol=1e-3, rtol=1e-4)

    # the layout mix-up: HF-ordered rows fed to Meta's interleaved rotation
    qw, kw = apply_rotary_emb(q2, k2, fc)
    scores_wrong = torch.einsum("bqhd,bkhd->bhqk", qw, kw)
    assert (scores_wrong - scores_meta).abs().max() > 1.0


def test_rotate_half_is_a_90_degree_rotation_of_each_pair():
    x = torch.arange(8.0)
    perm = half_order(8)
    # rotate_half in HF order == multiply each interleaved pair by i
    xc = torch.view_as_complex(x.reshape(-1, 2))
    expected = torch.view_as_real(xc * 1j).flatten()
    assert torch.equal(rotate_half(x[perm]), expected[perm])


def test_rotated_keys_of_the_past_do_not_change_when_tokens_arrive():
    """What makes RoPE cache-friendly: key n's rotation depends on n alone."""
    head_dim, theta = 32, 10000.0
    g = torch.Generator().manual_seed(6)
    k = torch.randn(1, 30, 2, head_dim, generator=g)
    fc = precompute_freqs_cis(head_dim, 30, theta)
    _, short = apply_rotary_emb(k[:, :10], k[:, :10], fc[:10])
    _, long = apply_rotary_emb(k, k, fc)
    assert torch.equal(short, long[:, :10])
    _, step = apply_rotary_emb(k[:, 10:11], k[:, 10:11], fc[10:11])  # one decode step at position 10
    assert torch.equal(step, long[:, 10:11])


def test_shifting_every_position_leaves_a_transformer_unchanged():
    """RoPE is relative: a whole sequence placed at positions 300.. instead of 0.. gives the same
    logits (up to float error)."""
    torch.manual_seed(7)
    args = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=97, multiple_of=16,
                     max_seq_len=64, rope_theta=10000.0)
    model = Transformer(args).eval()
    tokens = torch.randint(0, args.vocab_size, (1, 40))
    with torch.no_grad():
        base = model(tokens)
        original = model.freqs_cis
        try:
            model.freqs_cis = precompute_freqs_cis(args.head_dim, 300 + 128, args.rope_theta)[300:]
            shifted = model(tokens)
            model.freqs_cis = torch.ones_like(original)  # no rotation at all: positions removed
            removed = model(tokens)
        finally:
            model.freqs_cis = original
    torch.testing.assert_close(shifted, base, atol=2e-4, rtol=1e-4)
    assert (removed - base).abs().max() > 1e-2
