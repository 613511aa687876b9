"""llama_lite.matvec: a decode step's products read as weighted sums of W^T's rows."""
import copy
import os
import platform

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from llama_lite import ModelArgs, Transformer
from llama_lite.matvec import TransposedLinear, matvec, matvec_available, transpose_linears

needs_fbgemm = pytest.mark.skipif(not matvec_available(),
                                  reason="embedding_bag runs FBGEMM's kernel on x86 builds only")


def _float32_bound(x, w):
    """How far a float32 sum of x_k w_jk may fall from the exact one: a few units of float32's
    rounding per term, scaled by the terms' sizes (the usual bound, n * eps * sum |x_k w_jk|)."""
    return 4 * x.shape[-1] * torch.finfo(torch.float32).eps * (x.double().abs() @ w.double().abs().T)


@pytest.mark.parametrize("k", [1, 5, 8, 13, 576, 1536])
def test_matvec_is_x_times_w_transposed(k):
    torch.manual_seed(k)
    w = torch.randn(40, k)
    x = torch.randn(k)
    exact = w.double() @ x.double()
    got = matvec(x, w.t().contiguous())
    assert got.shape == (40,) and got.dtype == torch.float32
    assert ((got.double() - exact).abs() <= _float32_bound(x, w)).all()
    if k > 1:  # and the bound is tight enough to catch one row of W^T left out
        assert not ((matvec(x[1:], w[:, 1:].t().contiguous()).double() - exact).abs() <= _float32_bound(x, w)).all()


def test_matvec_gives_the_same_bits_on_any_number_of_threads():
    """The rows are split into a fixed number of bags, not one per thread: the sum's order, and
    so its rounding, is the same on every machine."""
    torch.manual_seed(0)
    wt, x = torch.randn(1536, 576), torch.randn(1536)
    threads = torch.get_num_threads()
    try:
        outs = []
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            outs.append(matvec(x, wt))
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(outs[0], o) for o in outs[1:])


def _linear(k=24, n=40, bias=False, seed=0):
    torch.manual_seed(seed)
    plain = nn.Linear(k, n, bias=bias)
    model = nn.Sequential(copy.deepcopy(plain))
    return plain, transpose_linears(model)[0]


@needs_fbgemm
@pytest.mark.parametrize("bias", [False, True])
def test_transposed_linear_holds_the_same_weight_and_computes_the_same(bias):
    plain, layer = _linear(bias=bias)
    assert type(layer) is TransposedLinear
    assert layer.weight.shape == (40, 24) and torch.equal(layer.weight, plain.weight)
    assert layer.weight.t().is_contiguous() and not layer.weight.is_contiguous()  # W^T's rows in memory
    assert set(layer.state_dict()) == set(plain.state_dict())
    for shape in [(24,), (1, 24), (1, 1, 24), (1, 7, 24), (3, 1, 24)]:
        x = torch.randn(shape)
        with torch.no_grad():
            got, want = layer(x), plain(x)
        assert got.shape == want.shape
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@needs_fbgemm
def test_one_float32_row_takes_matvec_and_everything_else_f_linear(monkeypatch):
    _, layer = _linear()
    calls = []
    real = F.embedding_bag
    monkeypatch.setattr(F, "embedding_bag", lambda *a, **kw: calls.append("matvec") or real(*a, **kw))
    with torch.no_grad():
        layer(torch.randn(1, 1, 24))
        assert calls == ["matvec"]
        layer(torch.randn(1, 2, 24))  # a prompt's rows
        layer(torch.randn(2, 1, 24))  # a batch's
        layer(torch.randn(24))  # one row again
        assert calls == ["matvec"] * 2
        bf = copy.deepcopy(layer).to(torch.bfloat16)
        out = bf(torch.randn(1, 1, 24, dtype=torch.bfloat16))
        assert out.dtype == torch.bfloat16 and calls == ["matvec"] * 2
        # a weight assigned later in the (out, in) layout still computes right, through F.linear
        layer.weight = nn.Parameter(torch.randn(40, 24))
        x = torch.randn(1, 1, 24)
        torch.testing.assert_close(layer(x), F.linear(x, layer.weight))
        assert calls == ["matvec"] * 2


@needs_fbgemm
def test_loading_a_state_dict_keeps_the_layout_and_reaches_the_decode_path():
    plain, layer = _linear()
    new = {"weight": torch.randn(40, 24)}
    layer.load_state_dict(new)
    assert layer.weight.t().is_contiguous()
    x = torch.randn(1, 1, 24)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), F.linear(x, new["weight"]), rtol=1e-5, atol=1e-5)


def _tiny(tie: bool):
    args = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=96, multiple_of=32, max_seq_len=64,
                     tie_embeddings=tie)
    torch.manual_seed(0)
    return Transformer(args).eval()


@needs_fbgemm
@pytest.mark.parametrize("tie", [False, True])
def test_a_transposed_model_decodes_what_the_plain_one_does(tie):
    plain = _tiny(tie)
    model = transpose_linears(copy.deepcopy(plain))
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert len(linears) == 2 * 7 + 1 and all(type(m) is TransposedLinear for m in linears)
    assert (model.output.weight is model.tok_embeddings.weight) == tie
    for name, t in plain.state_dict().items():
        assert torch.equal(model.state_dict()[name], t), name
    tokens = torch.tensor([[3, 17, 42, 5, 60]])
    calls = []
    real = F.embedding_bag
    with torch.inference_mode(), pytest.MonkeyPatch.context() as mp:
        mp.setattr(F, "embedding_bag", lambda *a, **kw: calls.append(1) or real(*a, **kw))
        torch.testing.assert_close(model(tokens), plain(tokens), rtol=1e-5, atol=1e-5)  # a prompt
        assert not calls  # its rows go through F.linear
        for m in (plain, model):
            m.setup_cache(1, 16)
        a, b = plain(tokens), model(tokens)
        for pos in range(5, 12):  # decode steps, greedy, each model feeding itself
            na, nb = a[:, -1].argmax(-1, keepdim=True), b[:, -1].argmax(-1, keepdim=True)
            assert torch.equal(na, nb)
            calls.clear()
            a, b = plain(na, pos), model(nb, pos)
            assert len(calls) == len(linears)  # every product of the step took matvec
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64") or os.environ.get("LLAMA_LITE_MATVEC") == "0"
                    or torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"),
                    reason="x86 builds of torch on a CPU with AVX2 (FBGEMM's minimum) only, and not opted out")
def test_x86_torch_has_the_fast_path():
    """On x86 a torch without FBGEMM's embedding_bag (or one that stopped listing it) would lose
    the decode speed silently, every test above skipped: here it fails instead."""
    assert matvec_available()


@pytest.mark.parametrize("how", ["no FBGEMM", "LLAMA_LITE_MATVEC=0"])
def test_models_elsewhere_are_left_alone(monkeypatch, how):
    import llama_lite.matvec

    if how == "no FBGEMM":  # a torch for ARM
        monkeypatch.setattr(llama_lite.matvec, "matvec_available", lambda: False)
    else:
        monkeypatch.setenv("LLAMA_LITE_MATVEC", "0")
    model = transpose_linears(_tiny(True))
    assert not any(isinstance(m, TransposedLinear) for m in model.modules())
    assert all(m.weight.is_contiguous() for m in model.modules() if isinstance(m, nn.Linear))


@needs_fbgemm
def test_only_float32_cpu_linears_are_transposed():
    model = _tiny(False)
    model.layers[0].attention.wq.to(torch.bfloat16)
    transpose_linears(model)
    assert type(model.layers[0].attention.wq) is nn.Linear and model.layers[0].attention.wq.weight.is_contiguous()
    assert type(model.layers[0].attention.wk) is TransposedLinear


@needs_fbgemm
def test_the_loaded_float32_model_is_transposed_and_others_are_not(llama, tmp_path):
    from conftest import tiny_meta

    from llama_lite.checkpoint import load_checkpoint

    assert all(type(m) is TransposedLinear for m in llama.model.modules() if isinstance(m, nn.Linear))
    assert llama.model.output.weight is llama.model.tok_embeddings.weight  # still tied
    tiny_meta(tmp_path)
    fp32, _ = load_checkpoint(tmp_path, device="cpu", dtype="float32")
    assert all(type(m) is TransposedLinear for m in fp32.modules() if isinstance(m, nn.Linear))
    for kw in (dict(dtype="bfloat16"), dict(dtype="float32", quantize="int8")):
        model, _ = load_checkpoint(tmp_path, device="cpu", **kw)
        assert not any(isinstance(m, TransposedLinear) for m in model.modules()), kw
        assert all(t.is_contiguous() for t in model.state_dict().values()), kw


@needs_fbgemm
def test_quantizing_a_transposed_model_gives_the_plain_model_s_layers():
    from llama_lite.quantize import Int8Linear, quantize_model_int8

    plain = quantize_model_int8(_tiny(False))
    model = quantize_model_int8(transpose_linears(_tiny(False)))
    for (name, a), (_, b) in zip(plain.named_modules(), model.named_modules()):
        if isinstance(a, Int8Linear):
            assert b.weight.is_contiguous() and torch.equal(a.weight, b.weight) and torch.equal(a.scale, b.scale), name


@needs_fbgemm
def test_flop_counter_sees_the_decode_step_s_products():
    """Under a dispatch mode (FlopCounterMode here) the product runs as F.linear, whose FLOPs the
    counter knows: notebooks 01 and 03 count a decode step's 2 x parameters FLOPs."""
    from torch.utils.flop_counter import FlopCounterMode

    _, layer = _linear()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        layer(torch.randn(1, 1, 24))
    assert counter.get_total_flops() == 2 * 24 * 40


@needs_fbgemm
def test_compiled_one_row_runs_the_same_kernel():
    """torch.compile keeps the decode step's matvec (inductor calls the same embedding_bag), so a
    compiled TransposedLinear gives eager's bits, not those of a matmul."""
    torch.manual_seed(0)
    layer = transpose_linears(nn.Sequential(nn.Linear(576, 192, bias=False)))[0]
    x = torch.randn(1, 1, 576)
    with torch.no_grad():
        eager = layer(x)
        compiled = torch.compile(layer, dynamic=True)(x)
        as_matmul = F.linear(x, layer.weight.contiguous())
    assert torch.equal(compiled, eager)
    assert not torch.equal(as_matmul, eager)  # which the check above could tell apart


@needs_fbgemm
def test_a_row_with_gradients_after_inference_mode():
    """generate runs under inference_mode; the index tensors made there must still serve a later
    call that saves them for backward."""
    import llama_lite.matvec

    plain, layer = _linear(k=37)
    llama_lite.matvec._INDICES.pop((37, torch.device("cpu")))
    with torch.inference_mode():
        layer(torch.randn(1, 1, 37))  # makes the indices again, inside inference mode
    x = torch.randn(1, 1, 37, requires_grad=True)
    layer(x).sum().backward()
    torch.testing.assert_close(x.grad.view(-1), plain.weight.sum(0), rtol=1e-5, atol=1e-6)
    assert layer.weight.grad is not None and layer.weight.grad.shape == (40, 37)


@needs_fbgemm
def test_autocast_gives_what_nn_linear_gives():
    plain, layer = _linear()
    x = torch.randn(1, 1, 24)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        got, want = layer(x), plain(x)
    assert got.dtype == want.dtype == torch.bfloat16
    torch.testing.assert_close(got, want)


@needs_fbgemm
def test_a_transposed_model_exports_to_safetensors(tmp_path):
    from safetensors.torch import load_file, save_file

    from llama_lite.hf import hf_state_dict

    plain = _tiny(True)
    model = transpose_linears(copy.deepcopy(plain))
    save_file(hf_state_dict(model), str(tmp_path / "model.safetensors"))  # refuses non-contiguous tensors
    saved = load_file(str(tmp_path / "model.safetensors"))
    assert saved.keys() == hf_state_dict(plain).keys()
    assert all(torch.equal(saved[k], v) for k, v in hf_state_dict(plain).items())


def test_without_the_dispatch_mode_helper_a_transposed_layer_still_computes(monkeypatch):
    """A torch that moved the private helper: no model is transposed, and a TransposedLinear made
    anyway computes through F.linear instead of failing."""
    import llama_lite.matvec

    monkeypatch.setattr(llama_lite.matvec, "_MODE_HELPER", False)
    monkeypatch.setattr(llama_lite.matvec, "is_in_torch_dispatch_mode", lambda: True)
    assert not matvec_available()
    layer = TransposedLinear(24, 40, bias=False)
    with torch.no_grad():
        layer.weight.data = layer.weight.data.t().contiguous().t()
        x = torch.randn(1, 1, 24)
        torch.testing.assert_close(layer(x), F.linear(x, layer.weight))
