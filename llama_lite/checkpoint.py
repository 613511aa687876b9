"""Loading weights into a Transformer: which format a path holds, its ModelArgs, and its tensors
put into a model built on the meta device. Meta's consolidated.*.pth format lives here; GGUF (the
embedded SmolLM2) in gguf.py and Hugging Face's safetensors in hf.py.

The model is built on the meta device (shapes, no memory) and each tensor is read, joined
across shards, cast and moved to its device one at a time, so host RAM never holds a second
copy of the weights. Nothing here unpickles code: .pth files go through
torch.load(weights_only=True, mmap=True), safetensors and GGUF hold only data.
"""
from __future__ import annotations

import functools
import numbers
import pickle
import re
import warnings
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import fields
from pathlib import Path

import torch
from torch import nn

from .config import ModelArgs
from .devices import CheckpointError, resolve_device, resolve_dtype
from .files import read_settings, release_pages
from .gguf import gguf_model_args, gguf_tensors, open_gguf, smollm2_gguf_path
from .hf import hf_model_args, hf_tensors, hf_weight_files
from .matvec import transpose_linears
from .model import Transformer
from .quantize import int8_layer, quantize_model_w8a8, require_w8a8


# -- Meta's consolidated.*.pth ------------------------------------------------------------------
# Model-parallel shards split each matrix along one dimension; norms are replicated.
_META_CAT_DIM = {"tok_embeddings": 1, "wo": 1, "w2": 1, "wq": 0, "wk": 0, "wv": 0, "w1": 0, "w3": 0, "output": 0}


def _meta_cat_dim(name: str) -> int | None:
    return _META_CAT_DIM.get(name.split(".")[-2]) if name.count(".") else None


def _torch_load(path: Path) -> dict[str, torch.Tensor]:
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
            t._llama_lite_mapped = True  # backed by the file's memory map: see files.release_pages
    return state


_SHARD_NAME = re.compile(r"consolidated\.(\d+)\.pth")


def meta_shards(ckpt_dir: Path) -> list[Path]:
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


def meta_model_args_from_params(params: dict, vocab_size: int | None = None) -> ModelArgs:
    """From Meta's params.json. Llama-2 ships vocab_size=-1 there: the tokenizer (or the
    embedding matrix) decides it, so the caller passes it in."""
    known = {f.name for f in fields(ModelArgs)}
    kw = {k: v for k, v in params.items() if k in known}
    if kw.get("vocab_size", -1) in (-1, None):
        if vocab_size is None:
            raise ValueError("params.json has vocab_size=-1 and no vocab_size was given")
        kw["vocab_size"] = vocab_size
    kw.setdefault("max_seq_len", 4096)
    return ModelArgs(**kw)


def meta_model_args(ckpt_dir: Path, shards, **overrides) -> ModelArgs:
    params_path = ckpt_dir / "params.json"
    params = read_settings(params_path, "Meta's checkpoints come with params.json beside the .pth files")
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
        return meta_model_args_from_params({**params, **overrides}, vocab_size=vocab)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{params_path} does not describe a Llama model ({e})") from None


def meta_tensors(shards) -> Iterator[tuple[str, torch.Tensor]]:
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
                release_pages(part)
            yield name, joined


def meta_slice_reader(path: Path, rank: int, world_size: int) -> Callable:
    """read(name, shape, dim, start, stop) for parallel.load_sharded: the [start, stop) slice
    along dim of tensor `name` (all of it when dim is None), read through torch.load's memory map
    from only the shards that hold it; read.files_read names the shard files opened. Meta's
    N-shard checkpoint on N ranks: rank r reads the weights of consolidated.r.pth only, whose
    tensors are exactly its slices (parallel's split dimensions are Meta's); every rank also reads
    params.json and the tensor shapes in shard 0's header (read_model_args)."""
    shards = meta_shards(path)
    files_read = set()

    @functools.lru_cache(maxsize=None)
    def opened(i):  # mmap: a shard is opened only when one of its slices is needed
        files_read.add(shards[i].name)
        return _torch_load(shards[i])

    n = len(shards)

    def read(name, shape, dim, start, stop):
        cat = _meta_cat_dim(name)
        if cat is None:  # replicated in every shard: read the file that holds this rank's first slices
            return opened(rank * n // world_size)[name]
        per = shape[cat] // n  # each shard holds an equal block along its split dimension
        if dim is None:  # not split here but split in the files: join (not used by this plan)
            return torch.cat([opened(i)[name] for i in range(n)], dim=cat)
        if dim == cat:  # the shards that overlap [start, stop), each narrowed to the overlap
            parts = []
            for i in range(start // per, -(-stop // per)):
                lo, hi = max(start, i * per), min(stop, (i + 1) * per)
                parts.append(opened(i)[name].narrow(cat, lo - i * per, hi - lo))
            return parts[0] if len(parts) == 1 else torch.cat(parts, dim=cat)
        return torch.cat([opened(i)[name].narrow(dim, start, stop - start) for i in range(n)], dim=cat)

    read.files_read = files_read
    return read


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


def check_quantize(quantize: str | None, device, dtype: torch.dtype | None) -> None:
    """quantize is None, "int8" (weight-only, any device) or "w8a8" (int8 weights and
    activations: CPU, float32, a CPU whose int8 kernel is exact; see quantize.py)."""
    if quantize not in (None, "int8", "w8a8"):
        raise CheckpointError(f"quantize={quantize!r} is not supported; use None, 'int8' or 'w8a8'")
    if quantize != "w8a8":
        return
    if torch.device(device).type != "cpu":
        raise CheckpointError(f"quantize='w8a8' runs on the CPU, not {device}: pass device='cpu' (--device cpu), "
                              "or on a GPU use quantize='int8'")
    if dtype not in (None, torch.float32):
        raise CheckpointError(f"quantize='w8a8' computes in float32, not {dtype}; leave dtype unset or use float32")
    try:
        require_w8a8()
    except RuntimeError as e:
        raise CheckpointError(f"quantize='w8a8': {e}") from None


def empty_model(args: ModelArgs) -> Transformer:
    """The model on the meta device: its shapes, no memory, no random initialisation."""
    with torch.device("meta"), _SkipInit():
        return Transformer(args)


def materialize(args: ModelArgs, tensors: Iterator[tuple[str, torch.Tensor]], device, dtype: torch.dtype,
                source: str, progress: bool = False, total: int | None = None,
                quantize: str | None = None) -> Transformer:
    """Build the model on the meta device, then fill it one tensor at a time. quantize="int8"
    turns each Linear but the output into an Int8Linear as its weight arrives, so the full
    precision model never exists on the device (a 7B then fits a 16 GB GPU). quantize="w8a8"
    (CPU) loads the float32 model, then quantize_model_w8a8 turns it into int8 that decodes
    faster (its smoothing needs a float forward first: while loading, memory peaks at about
    float32's size, 4 bytes per parameter, as each Linear's float weight is freed once it is
    replaced). quantize=None: float32 Linears on a CPU are then held transposed
    (matvec.transpose_linears, one weight copied at a time), for faster decode steps."""
    check_quantize(quantize, device, dtype)
    if quantize == "w8a8":
        dtype = torch.float32  # what W8A8 computes in, whatever the checkpoint stores
    make = {  # the layer a Linear `name` becomes, None to stay an nn.Linear
        "int8": lambda name, t: int8_layer(name, t, dtype, device),
    }.get(quantize, lambda name, t: None)
    model = empty_model(args)
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
        layer = make(module_name, t) if isinstance(module, nn.Linear) else None
        if layer is not None:
            parent_name, _, child = module_name.rpartition(".")
            setattr(model.get_submodule(parent_name), child, layer)
        else:
            value = t.to(device=device, dtype=dtype)
            if mapped and value is t:
                value = t.clone()  # the model owns its memory, not a map of a file that may change
            setattr(module, attr, nn.Parameter(value, requires_grad=False))
        if mapped:
            release_pages(t)  # copied: its pages of the file can go
        seen.add(name)
    missing = sorted(set(expected) - seen)
    if missing:
        raise CheckpointError(f"{source}: {len(missing)} tensor(s) missing, e.g. {missing[:3]}; is the download complete?")
    if args.tie_embeddings:
        model.output.weight = model.tok_embeddings.weight
    if quantize == "w8a8":  # a tied output gets its int8 copy; the embedding table stays float for lookups
        quantize_model_w8a8(model)
    elif quantize is None:
        transpose_linears(model)  # float32 on a CPU: decode steps read W^T's rows (matvec.py says why)
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


def load_checkpoint(path=None, device=None, dtype=None, max_seq_len: int | None = None, progress: bool = False,
                    quantize: str | None = None) -> tuple[Transformer, Path]:
    """Load any supported checkpoint; returns the model and the file/folder it came from.
    path=None is the embedded SmolLM2-135M-Instruct."""
    device = resolve_device(device)  # a device or dtype this machine cannot give fails here, before any file is read
    dtype = resolve_dtype(dtype, device)
    check_quantize(quantize, device, dtype)
    path = smollm2_gguf_path() if path is None else Path(path)
    overrides = check_overrides(max_seq_len=max_seq_len)
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


__all__ = ["load_checkpoint", "read_model_args", "detect_format", "check_overrides", "check_quantize",
           "materialize", "empty_model", "meta_shards", "meta_model_args", "meta_model_args_from_params",
           "meta_tensors", "meta_slice_reader"]
