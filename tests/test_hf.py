"""Hugging Face's format (llama_lite/hf.py): config.json <-> ModelArgs, and the export's refusals.
Loading HF folders against transformers is tests/test_checkpoint.py's."""
import pytest

from llama_lite import ModelArgs, Transformer
from llama_lite.hf import hf_config, hf_model_args_from_config, hf_state_dict
from llama_lite.quantize import quantize_model_int8


@pytest.mark.parametrize("name", ["llama2-7b", "llama2-70b"])
def test_hf_config_round_trips_and_matches_transformers(name):
    """hf_config is the inverse of hf_model_args_from_config, and transformers' LlamaConfig
    built from it has the model's shapes."""
    transformers = pytest.importorskip("transformers")
    a = ModelArgs.from_name(name)
    back = hf_model_args_from_config(transformers.LlamaConfig(**hf_config(a)).to_dict())
    for field in ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "ffn_hidden_dim", "norm_eps",
                  "rope_theta", "max_seq_len", "tie_embeddings", "head_dim"):
        assert getattr(back, field) == getattr(a, field), field


def test_hf_state_dict_refuses_an_int8_model():
    args = ModelArgs(dim=64, n_layers=1, n_heads=4, vocab_size=97, multiple_of=16, max_seq_len=32)
    with pytest.raises(ValueError, match="int8"):
        hf_state_dict(quantize_model_int8(Transformer(args)))
