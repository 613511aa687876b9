"""Hugging Face's format: config.json <-> ModelArgs, the safetensors weights under this package's
names (W_q, W_k permuted back to Meta's RoPE layout), and the export the other way
(`hf_state_dict`, with which tests and benchmarks build their transformers reference).
"""
from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch import nn

from .config import ModelArgs
from .devices import CheckpointError
from .files import read_settings, release_pages
from .positions import permute_interleaved_to_rotate_half, permute_rotate_half_to_interleaved
from .quantize import is_quantized


# -- config.json ----------------------------------------------------------------------------------
def hf_model_args_from_config(config: dict) -> ModelArgs:
    """From a Hugging Face config.json of model_type 'llama'."""
    if config.get("model_type", "llama") != "llama":
        raise ValueError(f"config.json has model_type={config.get('model_type')!r}; only 'llama' is supported")
    rope = config.get("rope_parameters") or {}
    if (config.get("rope_scaling") or rope.get("rope_type", "default")) not in (None, "default"):
        raise ValueError("RoPE scaling (Llama-3.1 style) is not supported: Llama-2 uses plain RoPE")
    dim, n_heads = config["hidden_size"], config["num_attention_heads"]
    if config.get("head_dim") not in (None, dim // n_heads):
        raise ValueError(f"head_dim={config['head_dim']} differs from hidden_size/num_attention_heads")
    return ModelArgs(
        dim=dim,
        n_layers=config["num_hidden_layers"],
        n_heads=n_heads,
        n_kv_heads=config.get("num_key_value_heads") or n_heads,
        vocab_size=config["vocab_size"],
        hidden_dim=config["intermediate_size"],
        norm_eps=config.get("rms_norm_eps", 1e-5),
        rope_theta=config.get("rope_theta", rope.get("rope_theta", 10000.0)),
        max_seq_len=config.get("max_position_embeddings", 4096),
        tie_embeddings=bool(config.get("tie_word_embeddings", False)),
    )


def hf_config(args: ModelArgs) -> dict:
    """The inverse of hf_model_args_from_config: the fields of a config.json for these args (the
    transformers reference in tests and benchmarks, and the checkpoints they write)."""
    return dict(model_type="llama", architectures=["LlamaForCausalLM"], hidden_act="silu",
                hidden_size=args.dim, intermediate_size=args.ffn_hidden_dim, num_hidden_layers=args.n_layers,
                num_attention_heads=args.n_heads, num_key_value_heads=args.n_kv_heads,
                vocab_size=args.vocab_size, rms_norm_eps=args.norm_eps, rope_theta=args.rope_theta,
                max_position_embeddings=args.max_seq_len, tie_word_embeddings=args.tie_embeddings)


def hf_model_args(ckpt_dir: Path, **overrides) -> ModelArgs:
    config_path = ckpt_dir / "config.json"
    config = read_settings(config_path, "Hugging Face checkpoints come with config.json")
    try:
        return hf_model_args_from_config(config).replace(**overrides)
    except KeyError as e:
        raise CheckpointError(f"{config_path} has no {e} entry; is it a Llama config.json?") from None
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{config_path} does not describe a supported Llama model ({e})") from None


# -- safetensors ----------------------------------------------------------------------------------
_HF_BLOCK = {
    "self_attn.q_proj": "attention.wq", "self_attn.k_proj": "attention.wk", "self_attn.v_proj": "attention.wv",
    "self_attn.o_proj": "attention.wo", "mlp.gate_proj": "feed_forward.w1", "mlp.down_proj": "feed_forward.w2",
    "mlp.up_proj": "feed_forward.w3", "input_layernorm": "attention_norm", "post_attention_layernorm": "ffn_norm",
}


def _hf_name(name: str) -> str | None:
    if name == "model.embed_tokens.weight":
        return "tok_embeddings.weight"
    if name == "model.norm.weight":
        return "norm.weight"
    if name == "lm_head.weight":
        return "output.weight"
    m = re.fullmatch(r"model\.layers\.(\d+)\.(\w+\.\w+|\w+)\.weight", name)
    if m and m.group(2) in _HF_BLOCK:
        return f"layers.{m.group(1)}.{_HF_BLOCK[m.group(2)]}.weight"
    return None


def hf_weight_files(ckpt_dir: Path) -> list[Path]:
    index = ckpt_dir / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            files = sorted(set(weight_map.values()))
            if not files or not all(isinstance(f, str) for f in files):
                raise ValueError("its weight_map names no files")
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            what = "has no 'weight_map'" if isinstance(e, KeyError) else f"is not a valid index ({e})"
            raise CheckpointError(f"{index} {what}; download it again (or delete it if model.safetensors is "
                                  "a single file)") from None
        missing = [f for f in files if not (ckpt_dir / f).is_file()]
        if missing:
            raise CheckpointError(f"{', '.join(missing)} listed in {index.name} but missing from {ckpt_dir}; download the whole set")
        return [ckpt_dir / f for f in files]
    single = ckpt_dir / "model.safetensors"
    if single.is_file():
        return [single]
    raise CheckpointError(f"no model.safetensors (or model.safetensors.index.json with its shards) in {ckpt_dir}")


def hf_tensors(files, args: ModelArgs) -> Iterator[tuple[str, torch.Tensor]]:
    from safetensors import SafetensorError, safe_open

    for path in files:
        try:
            f = safe_open(str(path), framework="pt", device="cpu")
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{path} is unreadable ({e}); it is probably truncated: download it again") from None
        with f:
            for key in f.keys():
                name = _hf_name(key)
                if name is None:
                    continue
                try:
                    t = f.get_tensor(key)
                except (SafetensorError, OSError) as e:
                    raise CheckpointError(f"{path}: tensor {key} is unreadable ({e}); download the file again") from None
                t._llama_lite_mapped = True  # safetensors maps the file: see files.release_pages
                # HF's converter permuted W_q, W_k rows for rotate-half RoPE; undo it.
                n_heads = args.n_heads if name.endswith("attention.wq.weight") else args.n_kv_heads
                if name.endswith(("attention.wq.weight", "attention.wk.weight")):
                    if t.ndim != 2 or t.shape[0] % n_heads or (t.shape[0] // n_heads) % 2:
                        raise CheckpointError(
                            f"{path}: {key} has shape {tuple(t.shape)}, which does not split into {n_heads} heads "
                            "of even size; config.json does not match the weights"
                        )
                    source, t = t, permute_rotate_half_to_interleaved(t, n_heads)
                    release_pages(source)
                yield name, t


def hf_slice_reader(path: Path, args: ModelArgs) -> Callable:
    """read(name, shape, dim, start, stop) for parallel.load_sharded: the [start, stop) slice
    along dim of tensor `name` (all of it when dim is None), read through safetensors' get_slice
    from the memory-mapped file, so a rank reads only its slice."""
    from safetensors import safe_open

    where = {}
    for file in hf_weight_files(path):
        f = safe_open(str(file), framework="pt", device="cpu")
        for key in f.keys():
            name = _hf_name(key)
            if name is not None:
                where[name] = (f, key)
    if args.tie_embeddings and "output.weight" not in where:
        where["output.weight"] = where.get("tok_embeddings.weight")

    def read(name, shape, dim, start, stop):
        if name not in where:
            raise ValueError(f"{path}: tensor {name} is missing; is the download complete?")
        f, key = where[name]
        sl = f.get_slice(key)
        t = sl[:] if dim is None else (sl[start:stop] if dim == 0 else sl[:, start:stop])
        if name.endswith(("attention.wq.weight", "attention.wk.weight")):
            # HF permuted the rows within each head for rotate-half RoPE; the slice holds whole heads
            t = permute_rotate_half_to_interleaved(t, t.shape[0] // args.head_dim)
        return t

    return read


# -- export ---------------------------------------------------------------------------------------
def hf_state_dict(model_or_state, args: ModelArgs | None = None) -> dict[str, torch.Tensor]:
    """The inverse of `hf_tensors`: weights under transformers' LlamaForCausalLM names, W_q and
    W_k rows permuted to its rotate-half layout (as its converter does); the other tensors are
    the given ones, not copies, but for weights held transposed (matvec.TransposedLinear), which
    are copied row-major, as a safetensors file stores them. Takes a float Transformer, or a
    state dict under this package's names with its ModelArgs. Tests and benchmarks build their
    transformers reference, and write Hugging Face checkpoints, with it."""
    if isinstance(model_or_state, nn.Module):
        if is_quantized(model_or_state):
            raise ValueError("hf_state_dict needs a float model; this one has int8 weights (quantize=None when loading)")
        args, state = model_or_state.params, dict(model_or_state.named_parameters(remove_duplicate=False))
    else:
        state = model_or_state
    to_hf = {v: k for k, v in _HF_BLOCK.items()}
    top = {"tok_embeddings.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
           "output.weight": "lm_head.weight"}
    sd = {}
    for name, t in state.items():
        if name == "output.weight" and args.tie_embeddings:
            continue  # transformers ties lm_head to embed_tokens itself
        t = t.contiguous()
        if name in top:
            sd[top[name]] = t
            continue
        i, module = re.fullmatch(r"layers\.(\d+)\.(.+)\.weight", name).groups()
        if module in ("attention.wq", "attention.wk"):
            t = permute_interleaved_to_rotate_half(t, args.n_heads if module == "attention.wq" else args.n_kv_heads)
        sd[f"model.layers.{i}.{to_hf[module]}.weight"] = t
    return sd
