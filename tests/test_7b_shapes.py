"""Llama-2-7B, 13B and 70B as shapes only (the meta device: no memory): parameter counts, the
tensor shapes Meta's consolidated shards join into, and the memory a GPU needs."""
import pytest
import torch

from llama_lite import ModelArgs, Transformer, count_parameters, kv_cache_bytes
from llama_lite.checkpoint import meta_model_args_from_params
from llama_lite.hf import hf_model_args_from_config

# Meta's params.json files, as downloaded (vocab_size -1: the tokenizer's 32000 decides).
PARAMS_JSON = {
    "llama2-7b": {"dim": 4096, "multiple_of": 256, "n_heads": 32, "n_layers": 32, "norm_eps": 1e-05, "vocab_size": -1},
    "llama2-13b": {"dim": 5120, "multiple_of": 256, "n_heads": 40, "n_layers": 40, "norm_eps": 1e-05, "vocab_size": -1},
    "llama2-70b": {"dim": 8192, "multiple_of": 4096, "ffn_dim_multiplier": 1.3, "n_heads": 64, "n_kv_heads": 8,
                   "n_layers": 80, "norm_eps": 1e-05, "vocab_size": -1},
}
# Published totals (the Hugging Face model cards' exact counts) and Meta's shard counts.
PUBLISHED = {"llama2-7b": 6_738_415_616, "llama2-13b": 13_015_864_320, "llama2-70b": 68_976_648_192}
N_SHARDS = {"llama2-7b": 1, "llama2-13b": 2, "llama2-70b": 8}
# One shard's tensor shapes as they sit in consolidated.00.pth (layer 0), and the dimension
# along which the shards are joined (None: replicated in every shard).
SHARD_SHAPES = {
    "llama2-7b": {"tok_embeddings": (32000, 4096), "wq": (4096, 4096), "wk": (4096, 4096), "wv": (4096, 4096),
                  "wo": (4096, 4096), "w1": (11008, 4096), "w2": (4096, 11008), "w3": (11008, 4096),
                  "output": (32000, 4096), "norm": (4096,)},
    "llama2-13b": {"tok_embeddings": (32000, 2560), "wq": (2560, 5120), "wk": (2560, 5120), "wv": (2560, 5120),
                   "wo": (5120, 2560), "w1": (6912, 5120), "w2": (5120, 6912), "w3": (6912, 5120),
                   "output": (16000, 5120), "norm": (5120,)},
    "llama2-70b": {"tok_embeddings": (32000, 1024), "wq": (1024, 8192), "wk": (128, 8192), "wv": (128, 8192),
                   "wo": (8192, 1024), "w1": (3584, 8192), "w2": (8192, 3584), "w3": (3584, 8192),
                   "output": (4000, 8192), "norm": (8192,)},
}
JOIN_DIM = {"tok_embeddings": 1, "wo": 1, "w2": 1, "wq": 0, "wk": 0, "wv": 0, "w1": 0, "w3": 0, "output": 0, "norm": None}
NAMES = {"tok_embeddings": "tok_embeddings.weight", "output": "output.weight", "norm": "layers.0.attention_norm.weight",
         "wq": "layers.0.attention.wq.weight", "wk": "layers.0.attention.wk.weight", "wv": "layers.0.attention.wv.weight",
         "wo": "layers.0.attention.wo.weight", "w1": "layers.0.feed_forward.w1.weight",
         "w2": "layers.0.feed_forward.w2.weight", "w3": "layers.0.feed_forward.w3.weight"}
MODELS = list(PARAMS_JSON)


def args_of(name):
    return meta_model_args_from_params(PARAMS_JSON[name], vocab_size=32000)


@pytest.fixture(scope="module", params=MODELS)
def built(request):
    with torch.device("meta"):
        model = Transformer(args_of(request.param))
    return request.param, model


def test_params_json_equals_the_preset(built):
    name, _ = built
    preset = ModelArgs.from_name(name)
    args = args_of(name)
    assert (args.dim, args.n_layers, args.n_heads, args.n_kv_heads, args.ffn_hidden_dim, args.vocab_size) == (
        preset.dim, preset.n_layers, preset.n_heads, preset.n_kv_heads, preset.ffn_hidden_dim, preset.vocab_size)


def test_parameter_counts(built):
    name, model = built
    counted = sum(p.numel() for p in model.parameters())
    assert counted == count_parameters(model.params) == PUBLISHED[name]
    assert next(model.parameters()).device.type == "meta"  # shapes only: nothing was allocated


def test_shapes_are_what_metas_shards_join_into(built):
    name, model = built
    sd = model.state_dict()
    for key, shard_shape in SHARD_SHAPES[name].items():
        joined = list(shard_shape)
        if JOIN_DIM[key] is not None:
            joined[JOIN_DIM[key]] *= N_SHARDS[name]
        assert tuple(sd[NAMES[key]].shape) == tuple(joined), (name, key)
    n = model.params.n_layers
    assert len(sd) == 2 + 1 + 9 * n  # embeddings, output, final norm; 9 tensors per layer


def test_transformers_agrees(built):
    transformers = pytest.importorskip("transformers")
    name, model = built
    a = model.params
    config = transformers.LlamaConfig(hidden_size=a.dim, intermediate_size=a.ffn_hidden_dim, num_hidden_layers=a.n_layers,
                                      num_attention_heads=a.n_heads, num_key_value_heads=a.n_kv_heads, vocab_size=32000)
    with torch.device("meta"):
        hf = transformers.LlamaForCausalLM(config)
    assert sum(p.numel() for p in hf.parameters()) == PUBLISHED[name]
    # and an HF config.json of these numbers gives the same ModelArgs shapes
    b = hf_model_args_from_config(config.to_dict())
    assert (b.dim, b.n_layers, b.n_heads, b.n_kv_heads, b.ffn_hidden_dim) == (
        a.dim, a.n_layers, a.n_heads, a.n_kv_heads, a.ffn_hidden_dim)


@pytest.mark.parametrize("name", MODELS)
def test_memory_arithmetic(name):
    """Weights (the published count, 2 bytes each in bf16) plus the KV cache of one 4,096-token
    sequence (the cache's formula and its per-token sizes: tests/test_kv_cache.py)."""
    args = args_of(name)
    kv = kv_cache_bytes(args, batch_size=1, seq_len=4096, dtype=torch.bfloat16)
    weights = PUBLISHED[name] * 2
    total = weights + kv
    print(f"\n{name}: weights {weights / 2**30:.2f} GiB + KV cache (4096 tokens) {kv / 2**30:.2f} GiB "
          f"= {total / 2**30:.2f} GiB in bf16")
    if name == "llama2-7b":
        assert kv == 2 * 2**30  # exactly 2 GiB: 2 * 32 * 32 * 128 * 4096 * 2 bytes
        assert 12 * 2**30 < weights < 13 * 2**30 and total < 16 * 2**30  # fits a 16 GB card, barely
    if name == "llama2-70b":
        assert total > 80 * 2**30  # does not fit one 80 GB GPU in bf16
