import pytest
import torch

from llama_lite import ModelArgs, Transformer, count_parameters, kv_cache_bytes


@pytest.mark.parametrize("name", ["llama2-7b", "llama2-13b", "llama2-70b", "smollm2-135m"])
def test_count_parameters_equals_the_built_model(name):
    # The formula against the real module tree, built on the meta device (no memory).
    args = ModelArgs.from_name(name)
    with torch.device("meta"):
        model = Transformer(args)
    assert count_parameters(args) == sum(p.numel() for p in model.parameters())


def test_published_llama2_sizes():
    # Published figures (e.g. the sizes Hugging Face lists for the converted checkpoints).
    assert count_parameters(ModelArgs.from_name("llama2-7b")) == 6_738_415_616
    assert count_parameters(ModelArgs.from_name("llama2-13b")) == 13_015_864_320
    assert count_parameters(ModelArgs.from_name("llama2-70b")) == 68_976_648_192


def test_kv_cache_bytes_llama2_7b():
    assert kv_cache_bytes(ModelArgs.from_name("llama2-7b"), 1, 4096, torch.float16) == 2_147_483_648


def test_kv_cache_bytes_equals_allocated_cache():
    args = ModelArgs(dim=64, n_layers=3, n_heads=8, n_kv_heads=2, vocab_size=100, max_seq_len=32)
    model = Transformer(args)
    for dtype in (torch.float32, torch.bfloat16):
        model.setup_cache(max_batch_size=3, max_seq_len=32, dtype=dtype)
        measured = sum(c.cache_k.nbytes + c.cache_v.nbytes for c in model.caches)
        assert measured == kv_cache_bytes(args, 3, 32, dtype)


def test_smollm2_preset_matches_the_gguf(smollm2_path):
    from llama_lite.gguf import gguf_model_args, open_gguf

    # The preset is typed from SmolLM2's config.json; the GGUF file states the same shape.
    from_file = gguf_model_args(open_gguf(smollm2_path))
    preset = ModelArgs.from_name("smollm2-135m")
    assert from_file.ffn_hidden_dim == preset.ffn_hidden_dim
    assert from_file.norm_eps == pytest.approx(preset.norm_eps)  # the file stores it as float32
    assert from_file.replace(hidden_dim=None, norm_eps=preset.norm_eps) == preset


@pytest.mark.parametrize("kw, message", [
    (dict(dim=100, n_heads=3), "not divisible by n_heads"),
    (dict(dim=64, n_heads=8, n_kv_heads=3), "not a multiple of n_kv_heads"),
    (dict(dim=24, n_heads=8), "must be even"),
    (dict(n_layers=0), "n_layers must be >= 1"),
])
def test_bad_args_are_named(kw, message):
    with pytest.raises(ValueError, match=message):
        ModelArgs(**kw)


def test_unknown_preset_lists_the_known_ones():
    with pytest.raises(ValueError, match="llama2-7b"):
        ModelArgs.from_name("llama2-8b")
