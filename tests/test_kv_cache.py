"""Notebook 03: the KV cache. Its size formula against the tensors really allocated (and against
transformers' own cache), KVCache.update/reorder semantics, and cached decoding against
uncached decoding on random configs and on the real SmolLM2."""
import pytest
import torch

from conftest import cached_logits, llama_config
from llama_lite import ModelArgs, kv_cache_bytes
from llama_lite.kv_cache import KVCache
from llama_lite.model import Transformer
from llama_lite.positions import apply_rotary_emb, precompute_freqs_cis

KiB = 1024

CONFIGS = {
    "mha": ModelArgs(dim=64, n_layers=2, n_heads=4, vocab_size=97, max_seq_len=32),
    "gqa": ModelArgs(dim=96, n_layers=3, n_heads=6, n_kv_heads=2, vocab_size=101, max_seq_len=40),
    "mqa": ModelArgs(dim=64, n_layers=1, n_heads=8, n_kv_heads=1, vocab_size=50, max_seq_len=16),
}


def allocated_cache_bytes(model: Transformer) -> int:
    return sum(c.cache_k.numel() * c.cache_k.element_size() + c.cache_v.numel() * c.cache_v.element_size()
               for c in model.caches)


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("batch,seq", [(1, 7), (3, 16)])
def test_formula_equals_bytes_allocated_by_setup_cache(name, dtype, batch, seq):
    args = CONFIGS[name]
    model = Transformer(args)
    model.setup_cache(batch, seq, dtype)
    assert len(model.caches) == args.n_layers
    assert model.caches[0].cache_k.dtype == dtype
    assert model.caches[0].cache_k.shape == (batch, seq, args.n_kv_heads, args.head_dim)
    assert allocated_cache_bytes(model) == kv_cache_bytes(args, batch, seq, dtype)


@pytest.mark.parametrize("name", ["llama2-7b", "llama2-13b", "llama2-70b", "smollm2-135m"])
def test_formula_equals_setup_cache_for_real_shapes_on_meta(name):
    """The real models' caches, allocated on the meta device (shapes and dtypes, no memory)."""
    args = ModelArgs.from_name(name)
    with torch.device("meta"):
        model = Transformer(args)
    model.setup_cache(2, 4096, torch.float16, "meta")
    assert allocated_cache_bytes(model) == kv_cache_bytes(args, 2, 4096, torch.float16)


@pytest.mark.parametrize("name,kib_per_token", [("llama2-7b", 512), ("llama2-13b", 800), ("llama2-70b", 320)])
def test_llama2_numbers_derived_from_the_config(name, kib_per_token):
    args = ModelArgs.from_name(name)
    fp16 = 2  # bytes
    # Independent derivation: each layer stores one key and one value vector per token, of width
    # dim * n_kv_heads / n_heads (the full model width unless grouped-query attention shrinks it).
    kv_width = args.dim * args.n_kv_heads // args.n_heads
    per_token = 2 * args.n_layers * kv_width * fp16
    assert kv_cache_bytes(args, 1, 1) == per_token
    assert kv_cache_bytes(args, 1, 4096) == 4096 * per_token
    assert kv_cache_bytes(args, 8, 4096) == 8 * 4096 * per_token
    # ... and the published numbers: 7B 512 KiB/token (2 GiB at 4,096), 13B 800 KiB, 70B 320 KiB.
    assert per_token == kib_per_token * KiB
    # without GQA, 70B would need n_heads / n_kv_heads = 8 times more
    mha = args.replace(n_kv_heads=args.n_heads)
    assert kv_cache_bytes(mha, 1, 1) == per_token * args.n_heads // args.n_kv_heads


def test_formula_for_opt30b_is_180_gb():
    # OPT-30B (Zhang et al. 2022, Table 1; facebook/opt-30b config.json): 48 layers, d_model 7168,
    # 56 heads, multi-head attention. Batch 128, 1,024 tokens, fp16.
    opt = ModelArgs(dim=7168, n_layers=48, n_heads=56, vocab_size=50272, max_seq_len=2048)
    b = kv_cache_bytes(opt, 128, 1024, torch.float16)
    assert b == 2 * 48 * 7168 * 128 * 1024 * 2
    assert round(b / 1e9) == 180


def test_dtype_sets_bytes_per_element():
    args = CONFIGS["gqa"]
    assert kv_cache_bytes(args, 2, 5, torch.float32) == 2 * kv_cache_bytes(args, 2, 5, torch.float16)
    assert kv_cache_bytes(args, 2, 5, torch.bfloat16) == kv_cache_bytes(args, 2, 5, torch.float16)
    assert kv_cache_bytes(args, 2, 5, torch.int8) * 2 == kv_cache_bytes(args, 2, 5, torch.float16)


def test_formula_equals_transformers_own_cache():
    """transformers' LlamaForCausalLM (its DynamicCache) holds exactly the formula's bytes."""
    pytest.importorskip("transformers")
    from transformers import LlamaForCausalLM

    args = CONFIGS["gqa"]
    torch.manual_seed(0)
    hf = LlamaForCausalLM(llama_config(args)).eval()
    with torch.no_grad():
        out = hf(torch.randint(0, args.vocab_size, (3, 11)), use_cache=True)
    cache = out.past_key_values
    tensors = [t for layer in cache.layers for t in (layer.keys, layer.values)]
    assert len(tensors) == 2 * args.n_layers
    assert sum(t.numel() * t.element_size() for t in tensors) == kv_cache_bytes(args, 3, 11, torch.float32)


# -- KVCache semantics --------------------------------------------------------------------

def test_update_writes_at_start_pos_and_returns_the_prefix():
    torch.manual_seed(0)
    cache = KVCache(2, 10, n_kv_heads=3, head_dim=4)
    assert cache.max_seq_len == 10
    k1, v1 = torch.randn(2, 4, 3, 4), torch.randn(2, 4, 3, 4)
    keys, values = cache.update(0, k1, v1)
    assert keys.shape == (2, 4, 3, 4) and torch.equal(keys, k1) and torch.equal(values, v1)
    k2, v2 = torch.randn(2, 1, 3, 4), torch.randn(2, 1, 3, 4)
    keys, values = cache.update(4, k2, v2)
    assert torch.equal(keys, torch.cat([k1, k2], 1)) and torch.equal(values, torch.cat([v1, v2], 1))
    assert torch.count_nonzero(cache.cache_k[:, 5:]) == 0  # nothing written past the end
    # rewriting a position (e.g. regenerating) overwrites it and keeps the past
    k3 = torch.randn(2, 1, 3, 4)
    keys, _ = cache.update(4, k3, v2)
    assert torch.equal(keys, torch.cat([k1, k3], 1))


def test_update_with_a_smaller_batch_uses_the_first_rows():
    cache = KVCache(4, 6, 1, 2)
    k = torch.ones(2, 3, 1, 2)
    keys, values = cache.update(0, k, 2 * k)
    assert keys.shape == (2, 3, 1, 2) and torch.equal(values, 2 * k)
    assert torch.count_nonzero(cache.cache_k[2:]) == 0


def test_update_refuses_overflow_and_too_large_batches():
    cache = KVCache(2, 5, 1, 2)
    with pytest.raises(ValueError, match="past the KV cache"):
        cache.update(4, torch.zeros(1, 2, 1, 2), torch.zeros(1, 2, 1, 2))
    with pytest.raises(ValueError, match="max_batch_size"):
        cache.update(0, torch.zeros(3, 1, 1, 2), torch.zeros(3, 1, 1, 2))


def test_cache_is_a_non_persistent_buffer_of_the_requested_dtype():
    cache = KVCache(1, 4, 2, 8, dtype=torch.bfloat16)
    assert cache.cache_k.dtype == cache.cache_v.dtype == torch.bfloat16
    assert dict(cache.named_buffers()).keys() == {"cache_k", "cache_v"}
    assert cache.state_dict() == {}  # never saved into a checkpoint


def test_reorder_is_index_select_on_the_batch_rows():
    torch.manual_seed(0)
    cache = KVCache(4, 3, 2, 2)
    k, v = torch.randn(4, 3, 2, 2), torch.randn(4, 3, 2, 2)
    cache.update(0, k, v)
    index = torch.tensor([2, 2, 0, 3])  # beam search: beam 2 survives twice, beam 1 dies
    cache.reorder(index)
    assert torch.equal(cache.cache_k, k[index]) and torch.equal(cache.cache_v, v[index])


def test_reorder_with_fewer_rows_keeps_the_rest():
    torch.manual_seed(1)
    cache = KVCache(3, 2, 1, 2)
    k = torch.randn(3, 2, 1, 2)
    cache.update(0, k, k)
    cache.reorder(torch.tensor([2, 1]))
    assert torch.equal(cache.cache_k[0], k[2]) and torch.equal(cache.cache_k[1], k[1])
    assert torch.equal(cache.cache_k[2], k[2])


# -- cached decoding equals uncached ------------------------------------------------------

@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("prefill", [1, 5])
def test_cached_decode_equals_uncached_on_random_configs(name, prefill):
    args = CONFIGS[name]
    torch.manual_seed(0)
    model = Transformer(args).eval()
    tokens = torch.randint(0, args.vocab_size, (2, 12))
    with torch.no_grad():
        full = model(tokens)  # no cache: every position recomputed from scratch
    cached = cached_logits(model, tokens, prefill)
    assert cached.shape == full.shape
    torch.testing.assert_close(cached, full, rtol=1e-5, atol=1e-5)


def test_chunked_prefill_equals_one_prefill():
    args = CONFIGS["gqa"]
    torch.manual_seed(2)
    model = Transformer(args).eval()
    tokens = torch.randint(0, args.vocab_size, (1, 15))
    with torch.no_grad():
        full = model(tokens)
        model.setup_cache(1, 15)
        parts = [model(tokens[:, :6], 0), model(tokens[:, 6:11], 6), model(tokens[:, 11:], 11)]
        model.clear_cache()
    torch.testing.assert_close(torch.cat(parts, 1), full, rtol=1e-5, atol=1e-5)


def test_cache_holds_the_rotated_keys_and_the_values_of_the_uncached_forward():
    """What every layer's cache holds after a prefill and decode steps: the values an uncached
    forward computes, and its keys rotated by RoPE at their own positions. The expected keys and
    values come from that forward's wk/wv outputs, rotated here with a RoPE table of their own."""
    args = CONFIGS["gqa"]
    torch.manual_seed(3)
    model = Transformer(args).eval()
    n = 9
    tokens = torch.randint(0, args.vocab_size, (1, n))
    seen = {}
    hooks = [proj.register_forward_hook(lambda m, i, o, key=(layer, kind): seen.setdefault(key, o))
             for layer, block in enumerate(model.layers)
             for kind, proj in (("k", block.attention.wk), ("v", block.attention.wv))]
    with torch.no_grad():
        model(tokens)  # uncached: every position at once
    for hook in hooks:
        hook.remove()
    freqs = precompute_freqs_cis(args.head_dim, n, args.rope_theta)
    with torch.no_grad():
        model.setup_cache(1, n)
        try:
            model(tokens[:, :4], 0)
            for pos in range(4, n):
                model(tokens[:, pos:pos + 1], pos)
            for layer, block in enumerate(model.layers):
                k = seen[(layer, "k")].view(1, n, args.n_kv_heads, args.head_dim)
                v = seen[(layer, "v")].view(1, n, args.n_kv_heads, args.head_dim)
                _, k_rotated = apply_rotary_emb(k, k, freqs)
                cache = block.attention.cache
                torch.testing.assert_close(cache.cache_k[:, :n], k_rotated, rtol=1e-5, atol=1e-5,
                                           msg=lambda m: f"keys, layer {layer}: {m}")
                torch.testing.assert_close(cache.cache_v[:, :n], v, rtol=1e-5, atol=1e-5,
                                           msg=lambda m: f"values, layer {layer}: {m}")
        finally:
            model.clear_cache()


def test_smollm2_cached_decode_equals_uncached(llama):
    model, tok = llama.model, llama.tokenizer
    prompt = tok.encode("The KV cache stores", bos=tok.add_bos, eos=False)
    # a greedy continuation (that generate gives the same tokens without the cache:
    # tests/test_generation.py) ...
    (continuation,), _ = llama.generate([prompt], max_gen_len=12, temperature=0, use_cache=True)
    assert len(continuation) > 0
    # ... and its logits: one uncached forward over the whole sequence vs step-by-step from the cache
    tokens = torch.tensor([prompt + continuation])
    with torch.no_grad():
        full = model(tokens)
    step = cached_logits(model, tokens, len(prompt))
    torch.testing.assert_close(step, full, rtol=1e-4, atol=1e-4)
    assert torch.equal(step.argmax(-1), full.argmax(-1))
