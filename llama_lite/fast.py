"""Notebook 03's faster decode loop: the taught modules, compiled in place.

There is one model: `Transformer.forward` and `Attention.forward` as the notebooks teach them.
`compile_model` compiles each TransformerBlock with torch.compile (nn.Module.compile, in place),
so `Llama.generate`, `beam_search`, the CLI's `--compile` and everything else run the compiled
blocks without another line changing; `Llama.build(compile=True)` does it at load time.

Why each block and not the whole forward: the blocks share one code object, so dynamo traces it
once and the 30 layers reuse one compiled graph (two: one for a prompt, with its mask, one for a
single decode token); compiling `Transformer.forward` would trace all 30 into a graph 30 times
the size. Why dynamic=True: `start_pos` and the cache length change every step; marked dynamic,
one graph serves every position instead of one compile per position.

What it buys: inductor fuses the dozens of small ops of a block (the norms, RoPE, residual adds,
SwiGLU's product) into a few loops, the per-token cost that eager pays in Python and dispatch.
The matmuls stay ATen's: at batch 1 each weight is read once per token, bound by memory
bandwidth either way. Inductor keeps what it compiles in its on-disk caches (FX graph and
AOTAutograd caches, on by default), so a second process with the same torch skips the compile and
only re-traces: seconds, not the first process's tens of seconds (benchmarks/decode_cpu.py).
"""
from __future__ import annotations

import warnings

import torch
from torch import nn

from .model import Transformer

# RoPE multiplies complex numbers (Meta's form, notebook 02); inductor runs those few ops as
# ATen calls around its fused code and warns once per graph. The result is exact; the warning
# would only alarm a reader, so it is silenced for these graphs' compiles.
_COMPLEX_WARNING = "Torchinductor does not support code generation for complex operators"


def compile_model(model: Transformer, **options) -> Transformer:
    """Compile every TransformerBlock of `model` in place (torch.compile options, e.g. mode=,
    may be passed); returns the model. Compilation happens on the first forward, not here."""
    warnings.filterwarnings("ignore", message=_COMPLEX_WARNING)
    for layer in model.layers:
        layer.compile(dynamic=True, **options)
    return model


def is_compiled(model: nn.Module) -> bool:
    return any(getattr(layer, "_compiled_call_impl", None) is not None for layer in model.layers)


def compiled_copy(model: Transformer, **options) -> Transformer:
    """A second Transformer holding the same weight tensors as `model` (nothing is copied), its
    blocks compiled: the eager and the compiled path side by side, as the benchmarks time them."""
    with torch.device("meta"):
        twin = Transformer(model.params)
    twin.load_state_dict(model.state_dict(), assign=True)
    if model.params.tie_embeddings:
        twin.output.weight = twin.tok_embeddings.weight
    twin.freqs_cis = model.freqs_cis
    return compile_model(twin.eval(), **options)
