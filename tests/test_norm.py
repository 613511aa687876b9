"""llama_lite.norm against references nobody here wrote: torch.nn.RMSNorm, torch.nn.LayerNorm,
transformers' LlamaRMSNorm; the invariances each normalization promises; dtype behaviour."""
import pytest
import torch
from torch import nn

from llama_lite.model import Transformer, TransformerBlock
from llama_lite.config import ModelArgs
from llama_lite.norm import LayerNorm, RMSNorm

DIM = 48


def _randomize(module, seed=0):
    """Give gain (and bias) values far from their 1/0 init, so a test sees them used."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5 + 1.0)
    return module


def _x(*shape, seed=1, dtype=torch.float32, scale=3.0, shift=2.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * scale + shift).to(dtype)


# -- parity with the references ----------------------------------------------------------------

@pytest.mark.parametrize("eps", [1e-6, 1e-5, 1e-2])
def test_rmsnorm_matches_torch_rmsnorm(eps):
    ours = _randomize(RMSNorm(DIM, eps=eps))
    ref = nn.RMSNorm(DIM, eps=eps)
    ref.weight.data.copy_(ours.weight.data)
    x = _x(2, 5, DIM)
    torch.testing.assert_close(ours(x), ref(x), rtol=1e-5, atol=1e-6)


def test_rmsnorm_matches_transformers_llamarmsnorm():
    llama = pytest.importorskip("transformers.models.llama.modeling_llama")
    ours = _randomize(RMSNorm(DIM, eps=1e-5))
    ref = llama.LlamaRMSNorm(DIM, eps=1e-5)
    ref.weight.data.copy_(ours.weight.data)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        x = _x(3, 7, DIM, dtype=dtype)
        # Same recipe (normalize in float32, cast back, multiply by the gain): bit-identical.
        assert torch.equal(ours(x), ref(x)), dtype


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("eps", [1e-5, 1e-2])
def test_layernorm_matches_torch_layernorm(bias, eps):
    ours = _randomize(LayerNorm(DIM, eps=eps, bias=bias))
    ref = nn.LayerNorm(DIM, eps=eps, bias=bias)
    ref.load_state_dict(ours.state_dict())
    x = _x(2, 5, DIM)
    torch.testing.assert_close(ours(x), ref(x), rtol=1e-5, atol=1e-5)


def test_state_dict_names_match_the_references():
    """Checkpoints say `weight` (and `bias`): our modules load theirs without renaming."""
    assert RMSNorm(DIM).state_dict().keys() == nn.RMSNorm(DIM).state_dict().keys()
    assert LayerNorm(DIM).state_dict().keys() == nn.LayerNorm(DIM).state_dict().keys()
    assert LayerNorm(DIM, bias=False).state_dict().keys() == nn.LayerNorm(DIM, bias=False).state_dict().keys()


def test_default_eps_and_init():
    r, ln = RMSNorm(DIM), LayerNorm(DIM)
    assert r.eps == 1e-6 and ln.eps == nn.LayerNorm(DIM).eps == 1e-5  # Meta's 1e-6; torch's LN 1e-5
    assert torch.equal(r.weight, torch.ones(DIM)) and torch.equal(ln.weight, torch.ones(DIM))
    assert torch.equal(ln.bias, torch.zeros(DIM))


def test_normalizes_the_last_dimension_only():
    """Each row (token) is normalized on its own: permuting the batch permutes the output."""
    norm = _randomize(RMSNorm(DIM))
    x = _x(6, DIM)
    perm = torch.randperm(6, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(norm(x[perm]), norm(x)[perm])
    # And at unit gain the output rows have root mean square 1 (LayerNorm: mean 0, std 1).
    y = RMSNorm(DIM)(x)
    torch.testing.assert_close(y.pow(2).mean(-1), torch.ones(6), rtol=1e-5, atol=1e-5)
    z = LayerNorm(DIM)(x)
    torch.testing.assert_close(z.mean(-1), torch.zeros(6), rtol=0, atol=1e-5)
    torch.testing.assert_close(z.var(-1, unbiased=False), torch.ones(6), rtol=1e-4, atol=1e-4)


def test_gradients_match_the_references():
    ours, ref = _randomize(RMSNorm(DIM)), nn.RMSNorm(DIM, eps=1e-6)
    ref.weight.data.copy_(ours.weight.data)
    x1 = _x(4, DIM).requires_grad_()
    x2 = x1.detach().clone().requires_grad_()
    w = _x(4, DIM, seed=5)
    (ours(x1) * w).sum().backward()
    (ref(x2) * w).sum().backward()
    torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(ours.weight.grad, ref.weight.grad, rtol=1e-4, atol=1e-5)

    ours, ref = _randomize(LayerNorm(DIM)), nn.LayerNorm(DIM)
    ref.load_state_dict(ours.state_dict())
    x1 = _x(4, DIM).requires_grad_()
    x2 = x1.detach().clone().requires_grad_()
    (ours(x1) * w).sum().backward()
    (ref(x2) * w).sum().backward()
    torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(ours.bias.grad, ref.bias.grad, rtol=1e-4, atol=1e-5)


# -- invariances (Zhang & Sennrich 2019, table 1) -----------------------------------------------

@pytest.mark.parametrize("norm_cls", [RMSNorm, LayerNorm])
@pytest.mark.parametrize("scale", [0.01, 7.0, 1e3])
def test_input_rescaling_invariance(norm_cls, scale):
    norm = _randomize(norm_cls(DIM, eps=1e-12))
    x = _x(4, DIM)
    torch.testing.assert_close(norm(scale * x), norm(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("norm_cls", [RMSNorm, LayerNorm])
def test_weight_matrix_rescaling_invariance(norm_cls):
    """norm(x W^T * delta) == norm(x W^T): the scale of the weight feeding a norm cannot matter."""
    norm = _randomize(norm_cls(DIM, eps=1e-12))
    lin = nn.Linear(32, DIM, bias=False)
    x = _x(4, 32)
    before = norm(lin(x))
    with torch.no_grad():
        lin.weight.mul_(13.0)
    torch.testing.assert_close(norm(lin(x)), before, rtol=1e-5, atol=1e-5)


def test_layernorm_recentering_invariance_and_rmsnorm_lack_of_it():
    ln, rms = _randomize(LayerNorm(DIM)), _randomize(RMSNorm(DIM))
    x = _x(4, DIM)
    shifted = x + 5.0  # the same constant added to every feature of a row
    torch.testing.assert_close(ln(shifted), ln(x), rtol=1e-4, atol=1e-4)
    assert (rms(shifted) - rms(x)).abs().max() > 0.1  # RMSNorm does not forget a shift


def test_layernorm_weight_matrix_recentering_invariance_and_rmsnorm_lack_of_it():
    """Adding the same vector to every row of W shifts each output row by a constant: LayerNorm
    removes it, RMSNorm does not."""
    ln, rms = _randomize(LayerNorm(DIM)), _randomize(RMSNorm(DIM))
    lin = nn.Linear(32, DIM, bias=False)
    x = _x(4, 32)
    ln_before, rms_before = ln(lin(x)), rms(lin(x))
    with torch.no_grad():
        lin.weight.add_(torch.randn(1, 32, generator=torch.Generator().manual_seed(3)))
    torch.testing.assert_close(ln(lin(x)), ln_before, rtol=1e-4, atol=1e-4)
    assert (rms(lin(x)) - rms_before).abs().max() > 0.1


def test_eps_breaks_invariance_for_tiny_inputs_and_guards_zero():
    norm = RMSNorm(DIM, eps=1e-6)
    x = _x(4, DIM)
    tiny = 1e-5 * x  # mean square ~1e-9, far below eps: eps dominates and shrinks the output
    assert norm(tiny).pow(2).mean() < 0.01
    zero = torch.zeros(2, DIM)
    assert torch.equal(norm(zero), zero) and torch.equal(LayerNorm(DIM)(zero), zero)
    assert torch.isnan(RMSNorm(DIM, eps=0.0)(zero)).all()  # why eps exists


# -- dtypes ------------------------------------------------------------------------------------

@pytest.mark.parametrize("norm_cls", [RMSNorm, LayerNorm])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_is_normalized_in_float32(norm_cls, dtype):
    """Output dtype is the input's (when the module is cast too), and the error against a float64
    computation is no more than one rounding to the half type."""
    norm = _randomize(norm_cls(DIM))
    x = _x(3, 5, DIM, dtype=dtype)
    ref = norm.double()(x.double())
    half = norm.to(dtype)
    y = half(x)
    assert y.dtype == dtype
    ulp = torch.finfo(dtype).eps
    err = ((y.double() - ref).abs() / ref.abs().clamp_min(1.0)).max().item()
    assert err <= 4 * ulp, err  # one rounding of the normalized value, one of the gain product


def test_float32_upcast_beats_naive_bfloat16():
    """Computing the mean of squares in bf16 (what the float() upcast avoids) is less accurate."""
    x = _x(64, 4096, dtype=torch.bfloat16)
    ref = RMSNorm(4096).double()(x.double())
    ours = RMSNorm(4096).to(torch.bfloat16)(x)
    naive = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)  # all in bf16
    err_ours = (ours.double() - ref).abs().mean().item()
    err_naive = (naive.double() - ref).abs().mean().item()
    assert err_ours < err_naive


def test_float32_weight_with_half_input_promotes_like_meta_and_transformers():
    """Meta's and transformers' RMSNorm return float32 when the gain is float32 and x is bf16."""
    x = _x(2, DIM, dtype=torch.bfloat16)
    assert RMSNorm(DIM)(x).dtype == torch.float32
    assert LayerNorm(DIM)(x).dtype == torch.float32


def test_float64_stays_float64():
    x = _x(2, DIM, dtype=torch.float64)
    ours = RMSNorm(DIM).double()(x)
    assert ours.dtype == torch.float64
    ref = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12)
    ln = LayerNorm(DIM).double()(x)
    assert ln.dtype == torch.float64
    torch.testing.assert_close(ln, nn.LayerNorm(DIM).double()(x), rtol=1e-12, atol=1e-12)


# -- where the model uses it -------------------------------------------------------------------

def test_model_uses_llama_lite_rmsnorm_in_pre_norm_position():
    args = ModelArgs(dim=32, n_layers=2, n_heads=4, vocab_size=64, multiple_of=16, max_seq_len=16)
    model = Transformer(args)
    norms = [m for m in model.modules() if isinstance(m, (RMSNorm, nn.RMSNorm, nn.LayerNorm, LayerNorm))]
    assert len(norms) == 2 * args.n_layers + 1 and all(type(m) is RMSNorm for m in norms)
    block: TransformerBlock = _randomize(model.layers[0])
    x = _x(1, 5, 32)
    freqs = model.freqs_cis[:5]
    mask = torch.full((5, 5), float("-inf")).triu(1)
    h = x + block.attention(block.attention_norm(x), 0, freqs, mask)
    expected = h + block.feed_forward(block.ffn_norm(h))  # pre-norm: the residual stream is never normalized
    torch.testing.assert_close(block(x, 0, freqs, mask), expected)
