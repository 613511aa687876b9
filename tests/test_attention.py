"""llama_lite.attention against references nobody here wrote (transformers' LlamaAttention on the
same weights, MHA, GQA and MQA; torch.repeat_interleave; PyTorch's own grouped-query SDPA), and
against attention written out."""
import math

import pytest
import torch
import torch.nn.functional as F

from conftest import llama_config, random_model
from llama_lite import ModelArgs
from llama_lite.attention import Attention, regroup_kv_weight, repeat_kv, with_kv_heads
from llama_lite.positions import permute_interleaved_to_rotate_half, precompute_freqs_cis

CONFIGS = {"mha": 8, "gqa": 2, "mqa": 1}  # n_kv_heads with 8 query heads


def args_for(n_kv_heads, **kw):
    base = dict(dim=128, n_layers=2, n_heads=8, n_kv_heads=n_kv_heads, vocab_size=97, multiple_of=32,
                rope_theta=10000.0, max_seq_len=64)
    return ModelArgs(**{**base, **kw})


def random_attention(args, seed=0):
    torch.manual_seed(seed)
    return Attention(args).eval()


def causal_mask(seqlen, start_pos=0):
    mask = torch.full((seqlen, seqlen), float("-inf")).triu(1)
    return torch.hstack([torch.zeros(seqlen, start_pos), mask])


def hf_attention(attn, args, permute=True):
    """transformers' LlamaAttention holding attn's weights (W_q/W_k rows in HF's rotate-half order)."""
    from transformers.models.llama.modeling_llama import LlamaAttention

    ref = LlamaAttention(llama_config(args), layer_idx=0).eval()
    wq, wk = attn.wq.weight, attn.wk.weight
    if permute:
        wq = permute_interleaved_to_rotate_half(wq, args.n_heads)
        wk = permute_interleaved_to_rotate_half(wk, args.n_kv_heads)
    ref.load_state_dict({"q_proj.weight": wq.detach().clone(), "k_proj.weight": wk.detach().clone(),
                         "v_proj.weight": attn.wv.weight.detach().clone(), "o_proj.weight": attn.wo.weight.detach().clone()})
    return ref


def hf_forward(ref, args, x, start_pos=0):
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    bsz, seqlen, _ = x.shape
    positions = torch.arange(start_pos, start_pos + seqlen)[None].expand(bsz, -1)
    cos, sin = LlamaRotaryEmbedding(config=llama_config(args))(x, positions)
    mask = causal_mask(seqlen)[None, None].expand(bsz, 1, seqlen, seqlen)
    return ref(x, position_embeddings=(cos, sin), attention_mask=mask)[0]


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("start_pos", [0, 5])
def test_attention_equals_transformers_llama_attention(name, start_pos):
    pytest.importorskip("transformers")
    args = args_for(CONFIGS[name])
    attn = random_attention(args)
    ref = hf_attention(attn, args)
    x = torch.randn(2, 13, args.dim, generator=torch.Generator().manual_seed(1))
    freqs = precompute_freqs_cis(args.head_dim, args.max_seq_len, args.rope_theta)[start_pos:start_pos + 13]
    with torch.no_grad():
        ours = attn(x, start_pos, freqs, causal_mask(13))
        theirs = hf_forward(ref, args, x, start_pos)
    assert ours.shape == theirs.shape == (2, 13, args.dim)
    assert (ours - theirs).abs().max().item() <= 1e-5


def test_attention_comparison_catches_unpermuted_weights():
    # Copying W_q/W_k without the layout permutation must be caught: the comparison above can fail.
    pytest.importorskip("transformers")
    args = args_for(2)
    attn = random_attention(args)
    ref = hf_attention(attn, args, permute=False)
    x = torch.randn(1, 9, args.dim, generator=torch.Generator().manual_seed(2))
    freqs = precompute_freqs_cis(args.head_dim, args.max_seq_len)[:9]
    with torch.no_grad():
        assert (attn(x, 0, freqs, causal_mask(9)) - hf_forward(ref, args, x)).abs().max().item() > 1e-3


@pytest.mark.parametrize("n_rep", [1, 2, 4])
def test_repeat_kv_equals_repeat_interleave(n_rep):
    x = torch.randn(2, 5, 3, 4, generator=torch.Generator().manual_seed(3))
    out = repeat_kv(x, n_rep)
    assert out.shape == (2, 5, 3 * n_rep, 4)
    assert torch.equal(out, torch.repeat_interleave(x, n_rep, dim=2))
    for h in range(3 * n_rep):  # query head h reads kv head h // n_rep
        assert torch.equal(out[:, :, h], x[:, :, h // n_rep])


def written_out(attn, args, x, freqs):
    """softmax(q k^T / sqrt(d) + causal mask) v through W_O, kv head h // n_rep for query head h,
    with repeat_interleave (not our repeat_kv): x (1, n, dim) -> (1, n, dim)."""
    from llama_lite.positions import apply_rotary_emb

    n = x.shape[1]
    q = attn.wq(x).view(1, n, args.n_heads, args.head_dim)
    k = attn.wk(x).view(1, n, args.n_kv_heads, args.head_dim)
    v = attn.wv(x).view(1, n, args.n_kv_heads, args.head_dim)
    q, k = apply_rotary_emb(q, k, freqs)
    group = args.n_heads // args.n_kv_heads
    q, k, v = q.transpose(1, 2), k.transpose(1, 2).repeat_interleave(group, 1), v.transpose(1, 2).repeat_interleave(group, 1)
    scores = q @ k.transpose(-1, -2) / math.sqrt(args.head_dim) + causal_mask(n)
    return attn.wo((torch.softmax(scores, dim=-1) @ v).transpose(1, 2).reshape(1, n, -1))


@pytest.mark.parametrize("name", CONFIGS)
def test_attention_equals_from_scratch_and_torch_gqa_sdpa(name):
    args = args_for(CONFIGS[name])
    attn = random_attention(args)
    x = torch.randn(1, 11, args.dim, generator=torch.Generator().manual_seed(4))
    freqs = precompute_freqs_cis(args.head_dim, args.max_seq_len)[:11]
    from llama_lite.positions import apply_rotary_emb

    with torch.no_grad():
        ours = attn(x, 0, freqs, causal_mask(11))
        q = attn.wq(x).view(1, 11, args.n_heads, args.head_dim)
        k = attn.wk(x).view(1, 11, args.n_kv_heads, args.head_dim)
        v = attn.wv(x).view(1, 11, args.n_kv_heads, args.head_dim)
        q, k = apply_rotary_emb(q, k, freqs)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        # PyTorch's own grouped-query path (no repeat_kv of ours involved)
        torch_out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        torch_final = attn.wo(torch_out.transpose(1, 2).reshape(1, 11, -1))
        assert (written_out(attn, args, x, freqs) - torch_final).abs().max().item() <= 1e-5
    assert (ours - torch_final).abs().max().item() <= 1e-5


def test_expanding_gqa_to_mha_gives_identical_logits():
    model = random_model(args_for(2, tie_embeddings=True))
    mha = with_kv_heads(model, 8)
    assert mha.params.n_kv_heads == 8 and mha.layers[0].attention.wk.weight.shape == (128, 128)
    assert model.params.n_kv_heads == 2 and model.layers[0].attention.wk.weight.shape == (32, 128)
    tokens = torch.randint(0, 97, (2, 20), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        assert (model(tokens) - mha(tokens)).abs().max().item() <= 1e-5
    assert mha.output.weight is mha.tok_embeddings.weight


def test_mean_pooled_mqa_differs_but_is_exact_when_heads_agree():
    model = random_model(args_for(2, tie_embeddings=True))
    mqa = with_kv_heads(model, 1)
    assert mqa.layers[0].attention.wk.weight.shape == (16, 128)
    tokens = torch.randint(0, 97, (1, 20), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        assert (model(tokens) - mqa(tokens)).abs().max().item() > 1e-2
        # If both kv heads of every layer are the same, their mean is that head: MQA is then exact.
        for layer in model.layers:
            for w in (layer.attention.wk.weight, layer.attention.wv.weight):
                w[16:] = w[:16]
        assert (model(tokens) - with_kv_heads(model, 1)(tokens)).abs().max().item() <= 1e-5


def test_regroup_kv_weight_means_and_repeats():
    w = torch.arange(4 * 3 * 2, dtype=torch.float32).view(4 * 3, 2)  # 4 heads of dim 3
    pooled = regroup_kv_weight(w, 4, 2)
    assert torch.equal(pooled, torch.stack([w[0:3] + w[3:6], w[6:9] + w[9:12]]).view(6, 2) / 2)
    assert torch.equal(regroup_kv_weight(w, 4, 8), torch.repeat_interleave(w.view(4, 3, 2), 2, dim=0).view(24, 2))
    assert torch.equal(regroup_kv_weight(w, 4, 4), w)
    with pytest.raises(ValueError, match="equal groups"):
        regroup_kv_weight(w, 4, 3)
    with pytest.raises(ValueError, match="repeated"):
        regroup_kv_weight(w, 4, 6)


@pytest.mark.parametrize("name", CONFIGS)
def test_cpu_decode_step_hands_sdpa_the_shared_kv_heads(name, monkeypatch):
    """A CPU decode step hands SDPA the cache's own n_kv_heads heads (enable_gqa: repeat_kv's
    copy of the cache is not made); a prompt, with its mask, hands it repeat_kv's n_heads
    (kernels that take a mask may refuse enable_gqa). Both equal attention written out."""
    args = args_for(CONFIGS[name])
    attn = random_attention(args)
    seen = []
    sdpa = F.scaled_dot_product_attention

    def spy(q, k, v, **kw):
        seen.append((k.shape[1], kw.get("enable_gqa", False)))
        return sdpa(q, k, v, **kw)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    from llama_lite.kv_cache import KVCache

    attn.cache = KVCache(1, 16, args.n_kv_heads, args.head_dim)
    x = torch.randn(1, 6, args.dim, generator=torch.Generator().manual_seed(6))
    freqs = precompute_freqs_cis(args.head_dim, args.max_seq_len)
    with torch.no_grad():
        prompt = attn(x[:, :5], 0, freqs[:5], causal_mask(5))
        step = attn(x[:, 5:], 5, freqs[5:6], None)
        monkeypatch.undo()
        written = written_out(attn, args, x, freqs[:6])
    sharing = args.n_kv_heads < args.n_heads
    assert seen == [(args.n_heads, False), (args.n_kv_heads if sharing else args.n_heads, sharing)]
    assert (prompt - written[:, :5]).abs().max().item() <= 1e-5
    assert (step - written[:, 5:]).abs().max().item() <= 1e-5
