"""Fixtures and helpers shared by the test files (no test file imports another)."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
LLAMA2_TOKENIZER = ROOT.parent / "shared" / "data" / "llama2-tokenizer.model"

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

# Prompts for the real SmolLM2 weights (its logits and its greedy continuations).
PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village,"]

# Meta's params.json of a tiny model (vocab_size comes from the weights, as Llama-2's -1 says).
TINY_META = dict(dim=32, n_layers=1, n_heads=4, norm_eps=1e-5)
TINY_VOCAB = 64

# The dimension along which Meta's model-parallel shards split each matrix (norms: replicated).
META_SPLIT = {"tok_embeddings": 1, "wo": 1, "w2": 1, "wq": 0, "wk": 0, "wv": 0, "w1": 0, "w3": 0, "output": 0}


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


# -- transformers references ---------------------------------------------------------------------
def llama_config(args, **kw):
    """transformers' LlamaConfig for the same ModelArgs."""
    from transformers import LlamaConfig

    from llama_lite import hf

    return LlamaConfig(**{**hf.hf_config(args), "attn_implementation": "eager", **kw})


def to_hf(model):
    """A transformers LlamaForCausalLM holding the same weights as a llama_lite Transformer."""
    from transformers import LlamaForCausalLM

    from llama_lite.hf import hf_state_dict

    hf = LlamaForCausalLM(llama_config(model.params)).eval()
    sd = {k: v.detach().clone() for k, v in hf_state_dict(model).items()}
    missing, unexpected = hf.load_state_dict(sd, strict=False)
    assert not unexpected and all(k == "lm_head.weight" for k in missing), (missing, unexpected)
    return hf


# -- random models and running them ----------------------------------------------------------------
def random_model(args, seed=0):
    """A Transformer with seeded random weights, in eval mode; the norm gains drawn from [0.5, 1.5]
    (not their init of 1) so that a misplaced or ignored norm weight would show."""
    from llama_lite import Transformer

    torch.manual_seed(seed)
    model = Transformer(args).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    return model


@torch.no_grad()
def cached_logits(model, tokens, prefill):
    """Prefill `prefill` tokens in one call, then feed the rest one at a time from the KV cache;
    the logits of every position."""
    bsz, n = tokens.shape
    model.setup_cache(bsz, n)
    try:
        out = [model(tokens[:, :prefill], 0)]
        for pos in range(prefill, n):
            out.append(model(tokens[:, pos:pos + 1], pos))
    finally:
        model.clear_cache()
    return torch.cat(out, dim=1)


# -- checkpoints in Meta's layout ------------------------------------------------------------------
def write_meta(folder, params, sd, n_shards=1, rope_freqs=False):
    """Meta's layout, written the way Meta's download has it: params.json (vocab_size -1, as
    Llama-2's says) and consolidated.NN.pth, each matrix split along its model-parallel dimension
    (META_SPLIT; norms replicated); rope_freqs adds the rope.freqs entry Meta's files hold."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "params.json").write_text(json.dumps({**params, "vocab_size": -1}))
    for i in range(n_shards):
        shard = {}
        for name, t in sd.items():
            d = META_SPLIT.get(name.split(".")[-2])
            shard[name] = t.clone() if d is None else t.chunk(n_shards, dim=d)[i].clone()
        if rope_freqs:  # in Meta's files; a loader must ignore it
            shard["rope.freqs"] = torch.rand(params["dim"] // params["n_heads"] // 2)
        torch.save(shard, folder / f"consolidated.{i:02d}.pth")


def tiny_meta(folder, params=TINY_META, vocab_size=TINY_VOCAB, dtype=torch.float32, tokenizer=b""):
    """A tiny random model (seed 0) in Meta's layout, one shard. tokenizer: bytes written as
    tokenizer.model (the default b"" is a placeholder nothing opens), a path copied there, or None
    for no tokenizer.model. Returns the state dict written."""
    from llama_lite import Transformer
    from llama_lite.checkpoint import meta_model_args_from_params

    torch.manual_seed(0)
    model = Transformer(meta_model_args_from_params(params, vocab_size=vocab_size))
    sd = {k: v.to(dtype) for k, v in model.state_dict().items()}
    write_meta(folder, params, sd)
    if isinstance(tokenizer, bytes):
        (folder / "tokenizer.model").write_bytes(tokenizer)
    elif tokenizer is not None:
        shutil.copy(tokenizer, folder / "tokenizer.model")
    return sd


# -- the command line --------------------------------------------------------------------------------
def run_llama_lite(*args, timeout=300):
    """`python -m llama_lite ARGS`, as a user runs it."""
    return subprocess.run([sys.executable, "-m", "llama_lite", *args], capture_output=True, text=True, cwd=ROOT,
                          timeout=timeout)
