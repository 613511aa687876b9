import os
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
LLAMA2_TOKENIZER = ROOT.parent / "shared" / "data" / "llama2-tokenizer.model"

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def smollm2_path():
    from llama_lite.gguf import smollm2_gguf_path

    return smollm2_gguf_path()


@pytest.fixture(scope="session")
def llama(smollm2_path):
    """The embedded SmolLM2-135M-Instruct, loaded once by llama_lite."""
    from llama_lite import Llama

    return Llama.build()


@pytest.fixture(scope="session")
def hf_smollm2(smollm2_path, tmp_path_factory):
    """The reference: transformers loading the same GGUF file (it dequantizes and un-permutes
    q/k itself, with its own code)."""
    transformers = pytest.importorskip("transformers")
    folder = tmp_path_factory.mktemp("smollm2")
    (folder / smollm2_path.name).symlink_to(smollm2_path)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=smollm2_path.name, dtype=torch.float32)
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=smollm2_path.name)
    return model.eval(), tokenizer


@pytest.fixture(scope="session")
def llama2_tokenizer_path():
    if not LLAMA2_TOKENIZER.is_file():
        pytest.skip(f"{LLAMA2_TOKENIZER} is absent (it sits beside the checkout in CI)")
    return LLAMA2_TOKENIZER


def hf_config(args, **kw):
    """transformers' LlamaConfig for the same ModelArgs."""
    from transformers import LlamaConfig

    from llama_lite import hf

    return LlamaConfig(**{**hf.hf_config(args), "attn_implementation": "eager", **kw})


def to_hf(model):
    """A transformers LlamaForCausalLM holding the same weights as a llama_lite Transformer."""
    from transformers import LlamaForCausalLM

    from llama_lite.hf import hf_state_dict

    hf = LlamaForCausalLM(hf_config(model.params)).eval()
    sd = {k: v.detach().clone() for k, v in hf_state_dict(model).items()}
    missing, unexpected = hf.load_state_dict(sd, strict=False)
    assert not unexpected and all(k == "lm_head.weight" for k in missing), (missing, unexpected)
    return hf
