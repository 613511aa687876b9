"""Notebook 03's faster decode loop: the taught modules, compiled in place.

There is one model: `Transformer.forward` and `Attention.forward` as the notebooks teach them.
`compile_model` compiles each TransformerBlock with torch.compile (nn.Module.compile, in place),
so `Llama.generate`, `beam_search`, the CLI's `--compile` and everything else run the compiled
blocks without another line changing; `Llama.build(compile=True)` does it at load time.

Why each block and not the whole forward: the blocks share one code object, so dynamo traces it
once and the 30 layers reuse its graphs (a handful: a prompt with its mask, a single decode token,
and the like; tests/test_fast.py bounds the count); compiling `Transformer.forward` would trace
all 30 into one graph 30 times the size (measured: 44 s cold against 23 s). Why dynamic=True:
`start_pos` and the cache length change every step; marked dynamic, a graph serves every position
instead of one compile per position. (The sharing needs torch >= 2.5, which inlines nn.Module
calls into one graph by default.)

What it buys: inductor fuses the dozens of small ops of a block (the norms, RoPE, residual adds,
SwiGLU's product) into a few loops, the per-token cost that eager pays in Python and dispatch.
The matmuls stay ATen's (a decode step's float32 products on a CPU call the same embedding_bag
as eager's, llama_lite.matvec): at batch 1 each weight is read once per token, bound by memory
bandwidth either way. Inductor keeps what it compiles in its on-disk caches (FX graph and
AOTAutograd caches, on by default), so a second process with the same torch skips the compile and
only re-traces (`python -m llama_lite generate "..." --compile` measures both).
"""
from __future__ import annotations

import warnings

from torch import nn

from .checkpoint import empty_model
from .matvec import TransposedLinear, transpose_linears
from .model import Transformer
from .quantize import W8A8Linear, is_quantized

# RoPE multiplies complex numbers (Meta's form, notebook 02); inductor runs those few ops as
# ATen calls around its fused code and warns once per graph. The result is exact; the warning
# would only alarm a reader, so compile_model silences this one message (process-wide, as the
# warnings module works).
_COMPLEX_WARNING = "Torchinductor does not support code generation for complex operators"


def compile_model(model: Transformer, **options) -> Transformer:
    """Compile every TransformerBlock of `model` in place (torch.compile options, e.g. mode=,
    may be passed); returns the model. Compilation happens on the first forward, not here.
    A W8A8 model is refused (refuse_compile says why)."""
    if any(isinstance(m, W8A8Linear) for m in model.modules()):
        refuse_compile("w8a8")
    warnings.filterwarnings("ignore", message=_COMPLEX_WARNING)
    for layer in model.layers:
        layer.compile(dynamic=True, **options)
    return model


def refuse_compile(quantize: str | None) -> None:
    """Compiling a W8A8 model is refused: its blocks decoded slower compiled than eager (34 against
    19 ms per step, measured once on an Intel Xeon with only W_2's input rotated, 2026-12-02),
    and the shared call of its projections that read one input keeps Python state that the
    compiler traces again and again. Asked before loading, so that the refusal comes first."""
    if quantize == "w8a8":
        raise ValueError("a W8A8 model (quantize='w8a8') runs eager, not compiled: drop --compile (compile=True) "
                         "for it; compiling does not make its decoding faster")


def is_compiled(model: nn.Module) -> bool:
    return any(getattr(layer, "_compiled_call_impl", None) is not None for layer in model.layers)


def compiled_copy(model: Transformer, **options) -> Transformer:
    """A second Transformer holding the same weight tensors as `model` (nothing is copied), its
    blocks compiled: the eager and the compiled path side by side, as the benchmarks time them."""
    if is_quantized(model):
        raise ValueError("compiled_copy needs a float model; compile an int8 model in place with compile_model")
    twin = empty_model(model.params)
    twin.load_state_dict(model.state_dict(), assign=True)
    if model.params.tie_embeddings:
        twin.output.weight = twin.tok_embeddings.weight
    if any(isinstance(m, TransposedLinear) for m in model.modules()):
        transpose_linears(twin)  # its weights are W^T-stored already: the same tensors, the same decode path
    twin.freqs_cis = model.freqs_cis
    return compile_model(twin.eval().requires_grad_(False), **options)
