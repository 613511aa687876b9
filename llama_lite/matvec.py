"""A decode step's matrix-vector products, read at the speed of memory on a CPU.

A batch-1 decode step multiplies one row x (1, in) by every weight matrix: each weight is read
once per token for one multiply-add, so the step is as fast as the weights stream from memory
(the bandwidth roofline of benchmarks/decode_cpu.py). nn.Linear computes x W^T with W its
weight, stored (out, in) row-major (W as F.linear names it; notebooks 04 and 05 write the same
product as X W with W (in, out), which is this W^T). PyTorch's CPU kernel for one row reads W at
a fraction of what the memory gives: on a 2-core AMD EPYC, SmolLM2's 211 float32 projections
read 9.0 GB/s that way in benchmarks/decode_cpu.py, whose sum reads 33.9 GB/s (in a scratch
measurement, 9.0 GB/s on one thread and 7.9 on two: no faster with the second core).

The same product read the other way round: x W^T = sum_k x_k W^T[k, :], a weighted sum of the
rows of W^T (in, out). That is what torch's embedding_bag computes (mode="sum", one weight per
row looked up), and its CPU kernel (FBGEMM's, generated for the CPU's vector width) streams the
rows and reads different bags on different cores. So a TransposedLinear keeps its weight's
storage as W^T, row-major: `weight` is still the (out, in) Parameter every reader expects (a
transposed view; state_dict, F.linear for prompts and batches, and copy_ all work on it), and a
one-row float32 input on the CPU is computed as MATVEC_BAGS bags of W^T's rows, one partial
sum each, then added. Measured on the same machine (benchmarks/decode_cpu.py, both layouts side
by side): the 211 projections at 17.1 GB/s against 9.0, SmolLM2's decoding at 23.0 tok/s
against 15.3 (1.56x transformers against 1.04x; 1.63x against 1.00x in another run), the same
256 greedy tokens. The sums are float32 throughout, in another order than the (out, in)
kernel's: the results differ by rounding (4e-5 in a prompt's logits, which reach ~30: a scratch
measurement), as any two float32 kernels' do; so do one row alone and the same row in a batch,
which takes F.linear.

Only where FBGEMM is compiled in (x86 builds of torch): elsewhere embedding_bag's fallback
kernel has not been measured, and transpose_linears leaves the model as it is. The layout has
been measured on one CPU (the AMD EPYC above); LLAMA_LITE_MATVEC=0 in the environment keeps
every model in nn.Linear's own layout, to compare or to opt out.
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn

try:
    from torch.utils._python_dispatch import is_in_torch_dispatch_mode
    _MODE_HELPER = True
except ImportError:  # a private helper; without it FLOP counters would see uncounted embedding_bags: no matvec
    _MODE_HELPER = False

    def is_in_torch_dispatch_mode() -> bool:
        return True  # so a TransposedLinear made anyway computes through F.linear

# Rows of W^T are split into this many bags, each summed on its own (the bags are spread over
# the threads) and the partial sums added. Fixed, not the thread count, so that the result is
# the same on every machine; 4 to 16 read equally fast on 2 cores (measured). It also caps the
# cores one product uses at 8, about what saturates a memory bus.
MATVEC_BAGS = 8

_INDICES: dict = {}  # (in_features, device) -> (row ids, bag starts), int32


def matvec_available() -> bool:
    """Whether this torch's embedding_bag runs FBGEMM's kernel (x86 builds), and the environment
    does not opt out (LLAMA_LITE_MATVEC=0)."""
    # The quantized engines list "fbgemm" where torch was built with FBGEMM and the CPU runs it
    # (AVX2): the same build flag that gives embedding_bag FBGEMM's kernel.
    return ("fbgemm" in torch.backends.quantized.supported_engines and _MODE_HELPER
            and os.environ.get("LLAMA_LITE_MATVEC", "1") != "0")


def _indices(k: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Row ids 0..k-1 and each bag's first row, int32; made once per size, outside inference
    mode (generate runs in it), so that a later call that needs gradients can save them."""
    key = (k, torch.device(device))
    if key not in _INDICES:
        bags = min(MATVEC_BAGS, k)
        with torch.inference_mode(False):
            starts = torch.arange(bags) * (k // bags)  # the last bag takes the rest
            _INDICES[key] = (torch.arange(k, dtype=torch.int32, device=device), starts.to(torch.int32).to(device))
    return _INDICES[key]


def matvec(x: torch.Tensor, wt: torch.Tensor) -> torch.Tensor:
    """x (in,) or any shape holding in values, wt (in, out) contiguous -> x @ wt, (out,)."""
    k = wt.shape[0]
    rows, starts = _indices(k, wt.device)
    partial = F.embedding_bag(rows, wt, starts, mode="sum", per_sample_weights=x.reshape(k))  # (bags, out)
    return partial.sum(0)


class TransposedLinear(nn.Linear):
    """nn.Linear whose weight's storage is W^T (in, out), row-major; `weight` itself is the usual
    (out, in) Parameter, a transposed view. One float32 row on the CPU goes through `matvec`
    (compiled too: inductor calls the same kernel); anything else through F.linear, which takes
    either layout: prompts, batches and beams (at 64 rows and more as fast as the (out, in)
    layout; at 4 to 16 rows MKL was 16-23% slower on it, measured on the AMD EPYC), other dtypes
    and devices, CPU autocast (whose F.linear computes in bfloat16), and anything run under a
    dispatch mode such as FlopCounterMode (which counts a matmul's FLOPs and knows nothing of
    embedding_bag's: the arithmetic is the same, so the count stays right)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        if (x.numel() == self.in_features and x.shape[-1] == self.in_features and x.dtype == torch.float32
                and w.dtype == torch.float32 and x.device.type == "cpu" and w.device.type == "cpu"
                and w.stride() == (1, self.out_features) and not torch.is_autocast_enabled("cpu")
                # dynamo traces with fake tensors, under a dispatch mode of its own: compiled, matvec stays
                and (torch.compiler.is_compiling() or not is_in_torch_dispatch_mode())):
            out = matvec(x, w.t())
            if self.bias is not None:
                out = out + self.bias
            return out.view(*x.shape[:-1], self.out_features)
        return F.linear(x, w, self.bias)


def with_transposed_storage(t: torch.Tensor) -> torch.Tensor:
    """The same (out, in) tensor, its memory laid out as t^T row-major (a view of that; no copy if
    it already is)."""
    return t.t().contiguous().t()


@torch.no_grad()
def transpose_linears(model: nn.Module) -> nn.Module:
    """Every nn.Linear of the model with float32 weights on the CPU becomes a TransposedLinear
    holding the same Parameter (a tied embedding too: its table is then held transposed, and a
    lookup reads one strided column per token), its storage re-laid as W^T, in place. Returns the
    model; where FBGEMM is missing or LLAMA_LITE_MATVEC=0 (see matvec_available), leaves it alone.
    The new module has no hooks: those registered on the old one stay with it."""
    if not matvec_available():
        return model
    done = set()
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            w = getattr(child, "weight", None)
            if type(child) is not nn.Linear or w.dtype != torch.float32 or w.device.type != "cpu":
                continue
            if id(w) not in done:
                w.data = with_transposed_storage(w.data)  # the same Parameter (ties kept), new storage
                done.add(id(w))
            _indices(child.in_features, w.device)
            new = TransposedLinear(child.in_features, child.out_features, bias=False, device="meta")
            new.weight, new.bias = w, child.bias
            new.train(child.training)
            setattr(module, name, new)
    return model
