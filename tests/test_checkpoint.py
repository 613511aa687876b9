"""Meta's and Hugging Face's on-disk formats, written here from one set of random weights, load
through Llama.build and give the logits transformers gives; bad checkpoints get clear errors.

The files are written the way their owners write them, not with llama_lite's code:
- Meta: params.json + consolidated.00.pth, consolidated.01.pth, each matrix split along its
  model-parallel dimension (dim 1: tok_embeddings, wo, w2; dim 0: wq, wk, wv, w1, w3, output;
  norms replicated) and a rope.freqs entry, as Meta's llama-2-13b download has them
  (conftest.write_meta).
- Hugging Face: transformers' LlamaForCausalLM.save_pretrained, after the W_q/W_k permutation
  of transformers' convert_llama_weights_to_hf.py (copied below); the reference logits come
  from transformers' own from_pretrained of that folder.
"""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from conftest import run_llama_lite, write_meta
from llama_lite import Llama
from llama_lite.checkpoint import load_checkpoint
from llama_lite.devices import CheckpointError

transformers = pytest.importorskip("transformers")

CONFIGS = {  # head_dim 16; GQA: 2 kv heads, one per model-parallel shard as in Llama-2-70B
    "mha": dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=4, multiple_of=32, norm_eps=1e-5),
    "gqa": dict(dim=64, n_layers=2, n_heads=8, n_kv_heads=2, multiple_of=32, norm_eps=1e-6),
}
VOCAB = 32000  # the real Llama-2 tokenizer's
N_SHARDS = 2
TEXT = "The quick brown fox jumps over the lazy dog. 1234 Über naïve café!"


def hidden_dim(dim, multiple_of):  # Meta's rule, from llama/model.py FeedForward
    h = int(2 * (4 * dim) / 3)
    return multiple_of * ((h + multiple_of - 1) // multiple_of)


def permute(w, n_heads, dim1, dim2):
    """transformers' convert_llama_weights_to_hf.py, verbatim: Meta's rows -> HF's rotate-half."""
    return w.view(n_heads, dim1 // n_heads // 2, 2, dim2).transpose(1, 2).reshape(dim1, dim2)


def meta_weights(p, seed):
    """Random weights under Meta's names and in Meta's layout."""
    g = torch.Generator().manual_seed(seed)
    dim, hd, kv = p["dim"], p["dim"] // p["n_heads"], p["n_kv_heads"] * (p["dim"] // p["n_heads"])
    h = hidden_dim(dim, p["multiple_of"])
    r = lambda *shape: torch.randn(*shape, generator=g) * 0.1  # noqa: E731
    sd = {"tok_embeddings.weight": r(VOCAB, dim), "norm.weight": 1 + r(dim), "output.weight": r(VOCAB, dim)}
    for i in range(p["n_layers"]):
        sd.update({
            f"layers.{i}.attention.wq.weight": r(dim, dim), f"layers.{i}.attention.wk.weight": r(kv, dim),
            f"layers.{i}.attention.wv.weight": r(kv, dim), f"layers.{i}.attention.wo.weight": r(dim, dim),
            f"layers.{i}.feed_forward.w1.weight": r(h, dim), f"layers.{i}.feed_forward.w2.weight": r(dim, h),
            f"layers.{i}.feed_forward.w3.weight": r(h, dim),
            f"layers.{i}.attention_norm.weight": 1 + r(dim), f"layers.{i}.ffn_norm.weight": 1 + r(dim),
        })
    assert hd % 2 == 0
    return sd


def hf_model(sd, p):
    """transformers' LlamaForCausalLM holding the same weights (q/k rows permuted as HF's converter does)."""
    dim, n_heads, n_kv = p["dim"], p["n_heads"], p["n_kv_heads"]
    config = transformers.LlamaConfig(
        hidden_size=dim, intermediate_size=hidden_dim(dim, p["multiple_of"]), num_hidden_layers=p["n_layers"],
        num_attention_heads=n_heads, num_key_value_heads=n_kv, vocab_size=VOCAB, rms_norm_eps=p["norm_eps"],
        max_position_embeddings=4096, tie_word_embeddings=False, attn_implementation="eager")
    model = transformers.LlamaForCausalLM(config).eval()
    hf = {"model.embed_tokens.weight": sd["tok_embeddings.weight"], "model.norm.weight": sd["norm.weight"],
          "lm_head.weight": sd["output.weight"]}
    kv_dim = n_kv * dim // n_heads
    for i in range(p["n_layers"]):
        m, x = f"layers.{i}.", f"model.layers.{i}."
        hf.update({
            x + "self_attn.q_proj.weight": permute(sd[m + "attention.wq.weight"], n_heads, dim, dim),
            x + "self_attn.k_proj.weight": permute(sd[m + "attention.wk.weight"], n_kv, kv_dim, dim),
            x + "self_attn.v_proj.weight": sd[m + "attention.wv.weight"],
            x + "self_attn.o_proj.weight": sd[m + "attention.wo.weight"],
            x + "mlp.gate_proj.weight": sd[m + "feed_forward.w1.weight"],
            x + "mlp.down_proj.weight": sd[m + "feed_forward.w2.weight"],
            x + "mlp.up_proj.weight": sd[m + "feed_forward.w3.weight"],
            x + "input_layernorm.weight": sd[m + "attention_norm.weight"],
            x + "post_attention_layernorm.weight": sd[m + "ffn_norm.weight"],
        })
    missing, unexpected = model.load_state_dict({k: v.contiguous() for k, v in hf.items()}, strict=False)
    assert not missing and not unexpected, (missing, unexpected)
    return model


@pytest.fixture(scope="module", params=list(CONFIGS))
def checkpoints(request, tmp_path_factory, llama2_tokenizer_path):
    """{'meta': folder, 'hf': folder, 'reference': transformers' model loaded from the HF folder}."""
    name = request.param
    p = CONFIGS[name]
    root = tmp_path_factory.mktemp(name)
    sd = meta_weights(p, seed=len(name))
    # Meta's download: llama-2-13b/{params.json, consolidated.*.pth}, tokenizer.model one folder up
    write_meta(root / "llama-2-13b", p, sd, n_shards=N_SHARDS, rope_freqs=True)
    (root / "tokenizer.model").symlink_to(llama2_tokenizer_path)
    # HF's download: one folder with config.json, safetensors, tokenizer.model. GQA: sharded.
    hf_dir = root / "Llama-2-13b-hf"
    shard_size = "1MB" if name == "gqa" else "1GB"
    hf_model(sd, p).save_pretrained(hf_dir, max_shard_size=shard_size)
    (hf_dir / "tokenizer.model").symlink_to(llama2_tokenizer_path)
    reference = transformers.LlamaForCausalLM.from_pretrained(hf_dir, dtype=torch.float32,
                                                              attn_implementation="eager").eval()
    return {"name": name, "meta": root / "llama-2-13b", "hf": hf_dir, "reference": reference,
            "tokenizer": llama2_tokenizer_path}


def test_files_are_in_the_real_layouts(checkpoints):
    meta, hf = checkpoints["meta"], checkpoints["hf"]
    assert sorted(f.name for f in meta.glob("*.pth")) == ["consolidated.00.pth", "consolidated.01.pth"]
    shard = torch.load(meta / "consolidated.01.pth", weights_only=True)
    p = CONFIGS[checkpoints["name"]]
    assert "rope.freqs" in shard
    assert shard["tok_embeddings.weight"].shape == (VOCAB, p["dim"] // 2)
    assert shard["output.weight"].shape == (VOCAB // 2, p["dim"])
    assert shard["layers.0.attention.wk.weight"].shape[0] == p["n_kv_heads"] * p["dim"] // p["n_heads"] // 2
    if checkpoints["name"] == "gqa":  # max_shard_size split it: several files and an index
        assert (hf / "model.safetensors.index.json").is_file() and len(list(hf.glob("model-*.safetensors"))) > 1
    else:
        assert (hf / "model.safetensors").is_file()


@pytest.mark.parametrize("fmt", ["meta", "hf"])
def test_logits_equal_transformers(checkpoints, fmt):
    # No tokenizer_path: Llama.build finds tokenizer.model where each download keeps it.
    llama = Llama.build(checkpoints[fmt], device="cpu", dtype=torch.float32)
    assert llama.tokenizer.n_words == VOCAB and llama.model.params.n_kv_heads == CONFIGS[checkpoints["name"]]["n_kv_heads"]
    ids = llama.tokenizer.encode(TEXT, bos=True, eos=False)
    tokens = torch.tensor([ids, ids[::-1]])
    with torch.no_grad():
        ours = llama.model(tokens)
        ref = checkpoints["reference"](tokens).logits
    diff = (ours - ref).abs().max().item()
    print(f"\n{checkpoints['name']} {fmt}: max |logits - transformers| = {diff:.2e} (logit scale {ref.abs().max():.2f})")
    assert diff <= 1e-4
    assert ref.abs().max() > 0.1  # not a degenerate comparison of near-zero logits


def test_meta_and_hf_load_the_same_weights(checkpoints):
    a, _ = load_checkpoint(checkpoints["meta"], device="cpu", dtype="float32")
    b, _ = load_checkpoint(checkpoints["hf"], device="cpu", dtype="float32")
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:  # exact: joining shards and un-permuting q/k move numbers, never change them
        assert torch.equal(sa[k], sb[k]), k


def test_hf_state_dict_equals_transformers_converter(checkpoints):
    """hf_state_dict (used to build every transformers reference in tests and benchmarks) gives
    exactly the tensors that transformers' own converter permutation put in the HF folder."""
    from llama_lite.hf import hf_state_dict

    model, _ = load_checkpoint(checkpoints["meta"], device="cpu", dtype=torch.float32)
    ours = hf_state_dict(model)
    ref = checkpoints["reference"].state_dict()
    assert set(ours) == set(ref)
    for k, v in ours.items():
        assert torch.equal(v, ref[k]), k


def test_dtype_and_the_model_owns_its_memory(checkpoints):
    model, _ = load_checkpoint(checkpoints["meta"], device="cpu", dtype="bfloat16")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    # In float32 (the files' dtype) nothing needs a cast, yet every parameter must be a copy, not
    # a view of the files' memory maps: a file replaced later must not change a loaded model.
    models = [load_checkpoint(checkpoints[fmt], device="cpu", dtype="float32")[0] for fmt in ("meta", "hf")]
    if not os.path.exists("/proc/self/maps"):
        pytest.skip("needs Linux's /proc/self/maps")
    mapped = []
    for line in open("/proc/self/maps"):
        fields = line.split()
        if fields[-1].endswith((".pth", ".safetensors")):
            lo, hi = (int(x, 16) for x in fields[0].split("-"))
            mapped.append((lo, hi))
    # (a parameter that were a view of a file would keep that file's map alive, and be found in it)
    for model in models:
        for name, p in model.named_parameters():
            assert not any(lo <= p.data_ptr() < hi for lo, hi in mapped), f"{name} is a view of a checkpoint file"


# -- refusing code and bad files ---------------------------------------------------------------
class Payload:
    """Unpickling this calls open(path, 'w'): a file appears if the loader ran the pickle's code."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (str(self.path), "w"))


@pytest.fixture(scope="module")
def meta_dir(tmp_path_factory):
    p = CONFIGS["gqa"]
    folder = tmp_path_factory.mktemp("bad") / "src"
    write_meta(folder, p, meta_weights(p, seed=3), n_shards=N_SHARDS, rope_freqs=True)
    (folder / "tokenizer.model").write_bytes(b"")  # a placeholder: Llama.build finds it first; never read here
    return folder


def copy(src, tmp_path, name="ckpt"):
    dst = tmp_path / name
    shutil.copytree(src, dst)
    return dst


@pytest.mark.parametrize("how", ["torch.save", "pickle.dump"])
def test_pickle_payload_is_refused_and_never_runs(meta_dir, tmp_path, how):
    import pickle

    folder = copy(meta_dir, tmp_path)
    marker = tmp_path / "payload_ran"
    state = torch.load(folder / "consolidated.00.pth", weights_only=True)
    state["evil"] = Payload(marker)
    with open(folder / "consolidated.00.pth", "wb") as f:
        torch.save(state, f) if how == "torch.save" else pickle.dump(state, f)
    message = "would run code" if how == "torch.save" else "old-style pickle file, which could run code"
    with pytest.raises(CheckpointError, match=message) as e:
        load_checkpoint(folder, device="cpu")
    assert "weights_only` set to `False`" not in str(e.value)  # never advise the unsafe way out
    assert not marker.exists()
    with pytest.raises(Exception):  # the payload is real: an unsafe loader would have run it
        torch.load(folder / "consolidated.00.pth", weights_only=True)
    if how == "torch.save":  # and the payload is live: the unsafe load runs it
        torch.load(folder / "consolidated.00.pth", weights_only=False)
        assert marker.exists()


def test_missing_params_json(meta_dir, tmp_path):
    folder = copy(meta_dir, tmp_path)
    (folder / "params.json").unlink()
    with pytest.raises(CheckpointError, match="params.json is missing"):
        load_checkpoint(folder, device="cpu")


def test_missing_config_json(checkpoints, tmp_path):
    folder = copy(checkpoints["hf"], tmp_path)
    (folder / "config.json").unlink()
    with pytest.raises(CheckpointError, match="config.json is missing"):
        Llama.build(folder, device="cpu")


@pytest.mark.parametrize("shard", ["consolidated.00.pth", "consolidated.01.pth"])
def test_missing_meta_shard(meta_dir, tmp_path, shard):
    folder = copy(meta_dir, tmp_path)
    (folder / shard).unlink()
    # the first leaves a gap in the numbering; the last is found from params.json's dim
    with pytest.raises(CheckpointError, match="missing"):
        load_checkpoint(folder, device="cpu")


def test_missing_hf_shard(checkpoints, tmp_path):
    if checkpoints["name"] != "gqa":
        pytest.skip("the sharded HF checkpoint is the GQA one")
    folder = copy(checkpoints["hf"], tmp_path)
    victim = sorted(folder.glob("model-*.safetensors"))[-1]
    victim.unlink()
    with pytest.raises(CheckpointError, match=f"{victim.name} listed in model.safetensors.index.json but missing"):
        load_checkpoint(folder, device="cpu")


def test_truncated_meta_shard(meta_dir, tmp_path):
    folder = copy(meta_dir, tmp_path)
    shard = folder / "consolidated.01.pth"
    os.truncate(shard, shard.stat().st_size * 2 // 3)
    with pytest.raises(CheckpointError, match="consolidated.01.pth.*truncated"):
        load_checkpoint(folder, device="cpu")


def test_truncated_safetensors(checkpoints, tmp_path):
    folder = copy(checkpoints["hf"], tmp_path)
    victim = sorted(folder.glob("*.safetensors"))[-1]
    os.truncate(victim, victim.stat().st_size * 2 // 3)
    with pytest.raises(CheckpointError, match=f"{victim.name} is unreadable.*truncated"):
        load_checkpoint(folder, device="cpu")


def test_meta_shapes_that_do_not_match_params_json(meta_dir, tmp_path):
    folder = copy(meta_dir, tmp_path)
    params = json.loads((folder / "params.json").read_text())
    (folder / "params.json").write_text(json.dumps({**params, "multiple_of": 256}))  # another FFN width
    with pytest.raises(CheckpointError, match=r"feed_forward.w1.weight has shape \(192, 64\) but the config gives \(256, 64\)"):
        load_checkpoint(folder, device="cpu")


def test_hf_shapes_that_do_not_match_config_json(checkpoints, tmp_path):
    folder = copy(checkpoints["hf"], tmp_path)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "intermediate_size": 100}))
    with pytest.raises(CheckpointError, match=r"has shape \(\d+, \d+\) but the config gives .*100"):
        load_checkpoint(folder, device="cpu")


def test_integer_dtype(meta_dir):
    # (an unknown dtype name such as "float8": tests/test_devices.py, refused before any file is read)
    with pytest.raises(CheckpointError, match="not a floating-point type"):
        Llama.build(meta_dir, device="cpu", dtype=torch.int8)


def test_cli_runs_the_meta_checkpoint(checkpoints):
    if checkpoints["name"] != "mha":
        pytest.skip("one format, one config is enough for the command line")
    folder, tok = checkpoints["meta"], checkpoints["tokenizer"]
    r = run_llama_lite("generate", "Once upon a time", "--checkpoint", str(folder), "--tokenizer", str(tok),
                       "--device", "cpu", "--max-new-tokens", "6", timeout=120)
    assert r.returncode == 0, r.stderr
    llama = Llama.build(folder, tok, device="cpu")
    (expected,), _ = llama.generate([llama.tokenizer.encode("Once upon a time", bos=True, eos=False)], 6, temperature=0)
    assert len(expected) == 6
    assert r.stdout == llama.tokenizer.decode(expected) + "\n"


def test_loading_does_not_import_the_compiler(smollm2_path):
    """Building the empty model on the meta device used to run nn.init and the RoPE table
    through PyTorch's reference implementations, whose first use imports torch._dynamo: about
    1.5 s of every process's first load. Loading must not need the compiler."""
    code = ("import sys; from llama_lite import Llama; Llama.build(); "
            "print('torch._dynamo' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False", out.stdout + out.stderr
