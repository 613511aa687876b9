"""llama_lite.config: ModelArgs, its presets and count_parameters. (Llama-2's presets against
Meta's params.json, their published parameter counts and memory: tests/test_7b_shapes.py.)"""
import pytest
import torch

from llama_lite import ModelArgs, Transformer, count_parameters


@pytest.mark.parametrize("name", ["smollm2-135m"])
def test_count_parameters_equals_the_built_model(name):
    # The formula against the real module tree, built on the meta device (no memory).
    args = ModelArgs.from_name(name)
    with torch.device("meta"):
        model = Transformer(args)
    assert count_parameters(args) == sum(p.numel() for p in model.parameters())


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
