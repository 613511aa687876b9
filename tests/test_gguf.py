"""GGUF (llama_lite/gguf.py): the fast reader gives gguf's own fields and tensors, and the torch
dequantizer gives gguf.quants' values, on the embedded SmolLM2 file and on synthetic blocks."""
import numpy as np
import torch


def test_fast_gguf_reader_equals_gguf(smollm2_path):
    from gguf import GGUFReader

    from llama_lite.gguf import open_gguf

    fast, stock = open_gguf(smollm2_path), GGUFReader(str(smollm2_path))
    assert type(fast) is not GGUFReader and isinstance(fast, GGUFReader)
    assert list(fast.fields) == list(stock.fields)
    for key, a in fast.fields.items():
        b = stock.fields[key]
        assert (a.offset, a.types, a.data) == (b.offset, b.types, b.data), key
        assert all(np.array_equal(x, y) and x.dtype == y.dtype for x, y in zip(a.parts, b.parts, strict=True)), key
    assert len(fast.tensors) == len(stock.tensors)
    for a, b in zip(fast.tensors, stock.tensors):
        assert (a.name, a.tensor_type, a.data_offset) == (b.name, b.tensor_type, b.data_offset)
        assert np.array_equal(a.data, b.data) and a.data.shape == b.data.shape


def test_torch_dequantize_equals_gguf_quants(smollm2_path):
    from gguf import GGMLQuantizationType as Q
    from gguf.quants import dequantize

    from llama_lite.gguf import gguf_dequantize, open_gguf

    seen = set()
    for t in open_gguf(smollm2_path).tensors:
        if t.tensor_type in seen:
            continue  # one tensor of each type (the embedded file has F32, Q4_1, Q8_0)
        seen.add(t.tensor_type)
        ours = gguf_dequantize(t.data, t.tensor_type)
        ref = torch.from_numpy(dequantize(t.data, t.tensor_type).copy())
        assert ours.dtype == ref.dtype == torch.float32 and ours.shape == ref.shape
        assert torch.equal(ours, ref), t.name
    assert {Q.Q4_1, Q.Q8_0} <= seen


def test_torch_dequantize_synthetic_blocks():
    """Random blocks, including extreme nibbles and scales, against gguf.quants."""
    from gguf import GGMLQuantizationType as Q
    from gguf.quants import dequantize, quantize

    from llama_lite.gguf import gguf_dequantize

    w = np.random.default_rng(0).standard_normal((6, 128)).astype(np.float32) * 3
    for qtype in (Q.Q4_1, Q.Q8_0):
        raw = quantize(w, qtype)
        assert torch.equal(gguf_dequantize(raw, qtype), torch.from_numpy(dequantize(raw, qtype).copy()))
