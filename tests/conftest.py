import os
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
LLAMA2_TOKENIZER = ROOT.parent / "shared" / "data" / "llama2-tokenizer.model"

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def smollm2_path():
    from llama_lite.checkpoint import smollm2_gguf_path

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

    return LlamaConfig(
        hidden_size=args.dim, intermediate_size=args.ffn_hidden_dim, num_hidden_layers=args.n_layers,
        num_attention_heads=args.n_heads, num_key_value_heads=args.n_kv_heads, vocab_size=args.vocab_size,
        rms_norm_eps=args.norm_eps, rope_theta=args.rope_theta, max_position_embeddings=args.max_seq_len,
        tie_word_embeddings=args.tie_embeddings, attn_implementation="eager", **kw,
    )


def to_hf(model):
    """A transformers LlamaForCausalLM holding the same weights as a llama_lite Transformer.
    W_q/W_k rows go to HF's rotate-half order, as transformers' own converter does."""
    from transformers import LlamaForCausalLM

    from llama_lite.positions import permute_interleaved_to_rotate_half

    args = model.params
    hf = LlamaForCausalLM(hf_config(args)).eval()
    sd = {"model.embed_tokens.weight": model.tok_embeddings.weight, "model.norm.weight": model.norm.weight}
    if not args.tie_embeddings:
        sd["lm_head.weight"] = model.output.weight
    for i, layer in enumerate(model.layers):
        a, f, p = layer.attention, layer.feed_forward, f"model.layers.{i}."
        sd.update({
            p + "self_attn.q_proj.weight": permute_interleaved_to_rotate_half(a.wq.weight, args.n_heads),
            p + "self_attn.k_proj.weight": permute_interleaved_to_rotate_half(a.wk.weight, args.n_kv_heads),
            p + "self_attn.v_proj.weight": a.wv.weight, p + "self_attn.o_proj.weight": a.wo.weight,
            p + "mlp.gate_proj.weight": f.w1.weight, p + "mlp.up_proj.weight": f.w3.weight,
            p + "mlp.down_proj.weight": f.w2.weight,
            p + "input_layernorm.weight": layer.attention_norm.weight,
            p + "post_attention_layernorm.weight": layer.ffn_norm.weight,
        })
    missing, unexpected = hf.load_state_dict({k: v.detach().clone() for k, v in sd.items()}, strict=False)
    assert not unexpected and all(k == "lm_head.weight" for k in missing), (missing, unexpected)
    return hf
