"""Notebook 05: the SwiGLU feed-forward block against transformers' LlamaMLP, and Meta's hidden-size
rule against the published configs and the real SmolLM2 weights."""
import pytest
import torch
import torch.nn.functional as F

from llama_lite import ModelArgs
from llama_lite.feedforward import FeedForward, ffn_hidden_dim

# intermediate_size in the published Hugging Face config.json of each model (and, for SmolLM2,
# the shape of its ffn_gate/up/down tensors); the inputs are Meta's params.json numbers.
PUBLISHED = {
    "llama2-7b": (dict(dim=4096, multiple_of=256, ffn_dim_multiplier=None), 11008),
    "llama2-13b": (dict(dim=5120, multiple_of=256, ffn_dim_multiplier=None), 13824),
    "llama2-70b": (dict(dim=8192, multiple_of=4096, ffn_dim_multiplier=1.3), 28672),
    "smollm2-135m": (dict(dim=576, multiple_of=256, ffn_dim_multiplier=None), 1536),
}


def _llama_mlp(dim, hidden, act="silu"):
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaMLP

    return LlamaMLP(LlamaConfig(hidden_size=dim, intermediate_size=hidden, hidden_act=act, num_attention_heads=1)).eval()


def _copy_into(ffn, mlp):
    with torch.no_grad():
        mlp.gate_proj.weight.copy_(ffn.w1.weight)
        mlp.up_proj.weight.copy_(ffn.w3.weight)
        mlp.down_proj.weight.copy_(ffn.w2.weight)
    return mlp


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_ffn_hidden_dim_matches_published_configs(name):
    kw, published = PUBLISHED[name]
    assert ffn_hidden_dim(**kw) == published
    # The presets carry no hidden_dim override: their ffn_hidden_dim comes from the rule too.
    args = ModelArgs.from_name(name)
    assert args.hidden_dim is None and args.ffn_hidden_dim == published


def test_ffn_hidden_dim_agrees_with_transformers_default_llama_config():
    from transformers import LlamaConfig

    c = LlamaConfig()  # transformers' default is Llama-2-7B's shape
    assert ffn_hidden_dim(c.hidden_size, 256) == c.intermediate_size


@pytest.mark.parametrize("dim", [48, 64, 100, 576, 777, 4096])
@pytest.mark.parametrize("multiple_of", [1, 32, 256])
def test_ffn_hidden_dim_is_two_thirds_of_4d_rounded_up(dim, multiple_of):
    h = ffn_hidden_dim(dim, multiple_of)
    exact = 8 * dim / 3  # three dim x h matrices hold as many numbers as two dim x 4dim ones
    assert h % multiple_of == 0
    assert exact - 1 < h < exact + multiple_of  # the smallest multiple at or above int(exact)
    assert h - multiple_of < int(exact)
    if multiple_of == 1:
        assert abs(3 * dim * h - 2 * dim * 4 * dim) <= 3 * dim  # parameters equal up to one row


def test_ffn_dim_multiplier_scales_before_rounding():
    assert ffn_hidden_dim(8192, 1, 1.3) == int(1.3 * int(8 * 8192 / 3))
    assert ffn_hidden_dim(8192, 4096, 1.3) % 4096 == 0
    assert ffn_hidden_dim(8192, 4096, 1.3) > ffn_hidden_dim(8192, 4096)


@pytest.mark.parametrize("dim,hidden", [(8, 16), (48, 128), (576, 1536)])
def test_feedforward_matches_transformers_llama_mlp(dim, hidden):
    torch.manual_seed(0)
    ffn = FeedForward(dim, hidden).eval()
    mlp = _copy_into(ffn, _llama_mlp(dim, hidden))
    x = torch.randn(2, 5, dim)
    torch.testing.assert_close(ffn(x), mlp(x), rtol=1e-5, atol=1e-6)


def test_feedforward_gradients_match_transformers():
    torch.manual_seed(1)
    ffn = FeedForward(16, 48)
    mlp = _copy_into(ffn, _llama_mlp(16, 48)).train()
    x = torch.randn(3, 16)
    ffn(x).pow(2).sum().backward()
    mlp(x).pow(2).sum().backward()
    for a, b in [(ffn.w1, mlp.gate_proj), (ffn.w3, mlp.up_proj), (ffn.w2, mlp.down_proj)]:
        torch.testing.assert_close(a.weight.grad, b.weight.grad, rtol=1e-5, atol=1e-6)


def test_feedforward_is_w2_of_silu_gate_times_up():
    torch.manual_seed(2)
    ffn = FeedForward(12, 32)
    x = torch.randn(4, 12)
    w1, w2, w3 = ffn.w1.weight, ffn.w2.weight, ffn.w3.weight
    gate = x @ w1.T
    expected = (gate * torch.sigmoid(gate) * (x @ w3.T)) @ w2.T  # Swish with beta = 1, written out
    torch.testing.assert_close(ffn(x), expected, rtol=1e-5, atol=1e-6)
    # A GLU: swapping the roles of gate and up changes the result (the gate is not symmetric).
    assert not torch.allclose(ffn(x), (F.silu(x @ w3.T) * (x @ w1.T)) @ w2.T, atol=1e-4)


def test_feedforward_has_three_bias_free_matrices():
    ffn = FeedForward(10, 24)
    shapes = {n: tuple(p.shape) for n, p in ffn.named_parameters()}
    assert shapes == {"w1.weight": (24, 10), "w2.weight": (10, 24), "w3.weight": (24, 10)}


def test_smollm2_weights_have_the_rule_s_shapes(llama):
    """The real checkpoint's feed-forward tensors have the shapes the rule gives from SmolLM2's
    dim and multiple_of (the loader takes the shapes from the file, not from the rule)."""
    model = llama.model
    preset = ModelArgs.from_name("smollm2-135m")
    h = ffn_hidden_dim(preset.dim, preset.multiple_of, preset.ffn_dim_multiplier)
    assert model.params.ffn_hidden_dim == h
    for layer in model.layers:
        f = layer.feed_forward
        assert tuple(f.w1.weight.shape) == (h, preset.dim)
        assert tuple(f.w3.weight.shape) == (h, preset.dim)
        assert tuple(f.w2.weight.shape) == (preset.dim, h)


def test_smollm2_layer_matches_transformers_mlp_on_real_weights(llama):
    ffn = llama.model.layers[5].feed_forward
    dim, hidden = ffn.w1.in_features, ffn.w1.out_features
    mlp = _copy_into(ffn, _llama_mlp(dim, hidden))
    torch.manual_seed(3)
    for x in (torch.randn(1, 7, dim), torch.randn(1, 1, dim)):  # a prompt's rows (F.linear), a decode step (matvec)
        with torch.no_grad():
            expected = mlp(x)
            # Layer 5's outputs reach ~540: two float32 kernels summing 1,536 products in different
            # orders part by ~1e-6 of that (measured 1.9e-4), so the bound scales with the output.
            torch.testing.assert_close(ffn(x), expected, rtol=1e-4, atol=1e-5 * expected.abs().max().item())
