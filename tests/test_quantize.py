"""Weight-only int8 (notebook 07): checked against PyTorch's own per-channel quantizer."""
import pytest
import torch
import torch.nn.functional as F

from llama_lite import ModelArgs, Transformer
from llama_lite.checkpoint import CheckpointError, materialize
from llama_lite.quantize import Int8Linear, quantize_int8, quantize_model_int8, model_bytes


@pytest.mark.filterwarnings("ignore:torch.quantize_per_tensor:UserWarning")
def test_quantize_int8_equals_torch_per_channel_quantizer():
    torch.manual_seed(0)
    w = torch.randn(64, 96) * torch.rand(64, 1)
    q, scale = quantize_int8(w)
    ref = torch.quantize_per_channel(w, scale.double(), torch.zeros(64, dtype=torch.long), 0, torch.qint8)
    assert torch.equal(q, ref.int_repr())
    assert (q.float() * scale[:, None] - w).abs().max() <= scale.max() / 2 + 1e-6  # half a step at most


def test_int8_linear_is_linear_with_dequantized_weight():
    torch.manual_seed(0)
    w, x = torch.randn(32, 48), torch.randn(5, 48)
    layer = Int8Linear(w, torch.float32)
    q, scale = quantize_int8(w)
    torch.testing.assert_close(layer(x), F.linear(x, q.float() * scale[:, None]), rtol=1e-5, atol=1e-5)


def test_quantize_while_loading_equals_quantize_after():
    torch.manual_seed(0)
    args = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=97, multiple_of=16, max_seq_len=32)
    ref = Transformer(args).eval()
    state = {k: v.clone() for k, v in ref.state_dict().items()}
    loaded = materialize(args, iter(state.items()), "cpu", torch.float32, "test", quantize="int8")
    after = quantize_model_int8(ref)
    tokens = torch.randint(0, 97, (2, 9))
    assert torch.equal(loaded(tokens), after(tokens))
    assert isinstance(loaded.layers[1].feed_forward.w2, Int8Linear)
    assert not isinstance(loaded.output, Int8Linear)  # the logits' projection stays exact
    assert model_bytes(loaded) < model_bytes(Transformer(args)) * 0.45


def test_unknown_quantization_is_refused():
    args = ModelArgs(dim=64, n_layers=1, n_heads=4, vocab_size=97, multiple_of=16)
    with pytest.raises(CheckpointError, match="int4.*not supported"):
        materialize(args, iter([]), "cpu", torch.float32, "test", quantize="int4")


def test_int8_smollm2_keeps_quality(llama):
    import copy

    from llama_lite.evaluate import perplexity, sample_text

    int8 = quantize_model_int8(copy.deepcopy(llama.model))
    tokens = llama.tokenizer.encode(sample_text(), bos=False, eos=False)[:256]
    full, quant = perplexity(llama.model, tokens), perplexity(int8, tokens)
    assert model_bytes(int8) < 0.45 * model_bytes(llama.model)
    assert full < quant < full * 1.05, (full, quant)


def test_model_bytes_counts_meta_models_exactly():
    """Sizes of a 7B are computed on the meta device, where every data_ptr is 0."""
    from llama_lite import count_parameters

    args = ModelArgs.from_name("llama2-7b")
    with torch.device("meta"):
        model = Transformer(args).to(torch.bfloat16)
    assert model_bytes(model) == count_parameters(args) * 2
    linear = sum(m.weight.numel() for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "output")
    scales = sum(m.weight.shape[0] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "output")
    assert model_bytes(quantize_model_int8(model)) == count_parameters(args) * 2 - linear + scales * 2


def test_hf_state_dict_refuses_an_int8_model():
    from llama_lite.checkpoint import hf_state_dict

    args = ModelArgs(dim=64, n_layers=1, n_heads=4, vocab_size=97, multiple_of=16, max_seq_len=32)
    with pytest.raises(ValueError, match="int8"):
        hf_state_dict(quantize_model_int8(Transformer(args)))
