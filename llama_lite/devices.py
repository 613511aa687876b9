"""Where a model runs and in which dtype, and whether it fits there (notebook 07).

Three decisions, each made before a single weight is read:

* `resolve_device`: a device name becomes a torch.device, or one clear error that names the
  fix (`cuda` without CUDA, `mps` off a Mac, `meta`, a typo).
* `resolve_dtype`: None becomes the policy dtype of the device: bfloat16 only where the GPU
  has it in hardware (CUDA capability 8.0 and newer: A100, L4, H100, RTX 30xx/40xx), float16 on
  older GPUs (T4, V100; `torch.cuda.is_bf16_supported()` says True there too, because its
  default counts bf16 *emulated* in float32), float16 on Apple's `mps`, float32 on a CPU.
* `plan_fit`: a checkpoint's ModelArgs, a wanted context and the device's free memory become a
  `FitPlan` (dtype, int8 or not, context, batch) with an itemised memory estimate; pass it to
  `Llama.build(path, plan=plan)`.

Every device query goes through torch.cuda / torch.backends.mps, so tests drive this module on a
CPU-only machine by patching them (tests/test_devices.py: a T4, an L4, an A100, an H100).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .config import ModelArgs
from .kv_cache import kv_cache_bytes

# float64 is for exact reference computations on a CPU (notebook 06 searches toy models exhaustively in it).
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
          "half": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float64": torch.float64,
          "fp64": torch.float64, "double": torch.float64}
DTYPE_CHOICES = "float32, float16, bfloat16, float64 (or fp32, fp16, half, bf16, fp64, double)"
GiB = 2 ** 30


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded as asked (its files, or the device or dtype it is asked
    onto); the message says what is wrong and what to do."""


# -- devices ----------------------------------------------------------------------------------
def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def mps_available() -> bool:
    mps = getattr(torch.backends, "mps", None)
    return bool(mps is not None and mps.is_available())


def resolve_device(device=None) -> torch.device:
    """None -> cuda if PyTorch sees a GPU, else cpu. Anything else is checked against this
    machine: a device that cannot hold the model raises CheckpointError (a ValueError)."""
    if device is None:
        return default_device()
    try:
        dev = device if isinstance(device, torch.device) else torch.device(str(device).strip())
    except (RuntimeError, ValueError, TypeError):
        raise CheckpointError(f"unknown device {device!r}; choose cpu, cuda, cuda:N or mps") from None
    if dev.type == "cpu":
        return dev
    if dev.type == "meta":
        raise CheckpointError("device 'meta' holds shapes but no values (it is what the loader builds the empty "
                              "model on); load onto cpu, cuda or mps")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            build = "a CPU-only build of torch" if torch.version.cuda is None else f"torch built for CUDA {torch.version.cuda}"
            raise CheckpointError(f"device {str(device)!r} asked for, but PyTorch sees no CUDA GPU here ({build}, "
                                  "no driver or no GPU); use --device cpu, or run where `nvidia-smi` lists a GPU")
        count = torch.cuda.device_count()
        if dev.index is not None and dev.index >= count:
            raise CheckpointError(f"device {str(device)!r} does not exist: PyTorch sees {count} CUDA GPU(s), "
                                  f"cuda:0 to cuda:{count - 1}")
        return dev if dev.index is not None else torch.device("cuda", torch.cuda.current_device())
    if dev.type == "mps":
        if not mps_available():
            raise CheckpointError(f"device {str(device)!r} is Apple's Metal GPU, which exists only on a Mac with "
                                  "Apple silicon (and a torch built with MPS); use --device cpu or cuda")
        return dev
    raise CheckpointError(f"device {str(device)!r} is not supported here; choose cpu, cuda, cuda:N or mps")


def cuda_capability(device) -> tuple:
    return tuple(torch.cuda.get_device_capability(torch.device(device)))


def has_native_bf16(device) -> bool:
    """bfloat16 in hardware: CUDA capability >= 8.0 (Ampere and newer). Not
    torch.cuda.is_bf16_supported(), whose default (including_emulation=True) says True on a T4."""
    device = torch.device(device)
    return device.type == "cuda" and cuda_capability(device) >= (8, 0)


def dtype_for_capability(capability) -> torch.dtype:
    """The policy for a CUDA GPU of this capability: bf16 from 8.0 (A100, L4, H100), else fp16 (T4 7.5, V100 7.0)."""
    return torch.bfloat16 if tuple(capability) >= (8, 0) else torch.float16


def default_dtype(device) -> torch.dtype:
    device = torch.device(device)
    if device.type == "cuda":
        return dtype_for_capability(cuda_capability(device))
    if device.type == "mps":
        return torch.float16  # no CUDA call: bfloat16 on MPS depends on the macOS version
    return torch.float32


def resolve_dtype(dtype, device) -> torch.dtype:
    """None -> `default_dtype(device)`; a name or a torch dtype among float32, float16, bfloat16
    and float64 -> that dtype; anything else (int8, "float8", complex) -> CheckpointError naming
    the choices, the same way for a string and for a torch.dtype."""
    if dtype is None:
        return default_dtype(device)
    if isinstance(dtype, torch.dtype):
        if dtype in DTYPES.values():
            return dtype
        kind = "floating-point type the model does not run in" if dtype.is_floating_point else "not a floating-point type"
        raise CheckpointError(f"dtype {dtype} is {kind}; choose one of {DTYPE_CHOICES}")
    key = str(dtype).strip().lower().removeprefix("torch.")
    if key not in DTYPES:
        raise CheckpointError(f"unknown dtype {dtype!r}; choose one of {DTYPE_CHOICES}")
    return DTYPES[key]


def free_memory(device) -> int | None:
    """Bytes the device can still give: CUDA's free memory (what the driver reports, after the
    CUDA context), the host's MemAvailable for a CPU (Linux), None where unknown (mps)."""
    device = torch.device(device)
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    if device.type == "cpu":
        try:
            with open("/proc/meminfo") as f:
                for line in f:
                    if line.startswith("MemAvailable:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            return None
    return None


def total_memory(device) -> int | None:
    device = torch.device(device)
    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).total_memory)
    return None


# -- will it fit? -------------------------------------------------------------------------------
def _element(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def weight_bytes(args: ModelArgs, dtype: torch.dtype, quantize: str | None = None) -> int:
    """Exact bytes of the loaded weights. int8 (llama_lite.quantize): each Linear but the output
    keeps 1 byte per weight plus one scale per output row in `dtype`; embeddings, norms and the
    output projection stay in `dtype` (tests check this against model_bytes of a built model)."""
    from .config import count_parameters

    if quantize not in (None, "int8"):  # w8a8 is a CPU speed option, not one the memory plan makes
        raise ValueError(f"weight_bytes knows quantize=None or 'int8', not {quantize!r}")
    e = _element(dtype)
    total = count_parameters(args) * e
    if quantize == "int8":
        kv, h, d = args.n_kv_heads * args.head_dim, args.ffn_hidden_dim, args.dim
        q = args.n_heads * args.head_dim
        linear = args.n_layers * (d * q + 2 * d * kv + q * d + 3 * d * h)
        rows = args.n_layers * (q + 2 * kv + d + 2 * h + d)
        total += linear * (1 - e) + rows * e
    return total


def prefill_activation_bytes(args: ModelArgs, batch: int, seq: int, dtype: torch.dtype,
                             quantize: str | None = None) -> int:
    """The largest transient of a prefill of `seq` tokens, besides the logits: the residual
    stream, a normed copy, q/k/v and attention's output (dim wide each), the SwiGLU block's three
    hidden-wide tensors, and the causal mask (seq x seq, built in float32 then cast).
    Attention scores are not counted: on a GPU scaled_dot_product_attention with a mask runs the
    memory-efficient kernel, which never holds the (heads, seq, seq) matrix. With int8 weights a
    prefill converts one weight at a time to `dtype` (quantize.py's dequantize path): the
    largest one is counted too."""
    e = _element(dtype)
    tokens = batch * seq
    hidden = tokens * (6 * args.dim + 3 * args.ffn_hidden_dim) * e
    mask = seq * seq * (4 + e)
    dequantized = args.dim * max(args.ffn_hidden_dim, args.n_heads * args.head_dim) * e if quantize == "int8" else 0
    return hidden + mask + dequantized


def logits_bytes(args: ModelArgs, batch: int, seq: int, dtype: torch.dtype) -> int:
    """Transformer.forward returns float32 logits for every prompt position, cast from the
    output projection's result in the model's dtype: both exist for a moment."""
    return batch * seq * args.vocab_size * (4 + _element(dtype))


def workspace_bytes(total: int | None) -> int:
    """Headroom for cuBLAS workspaces, the caching allocator's rounding and fragmentation, and
    the sampler's temporaries: 5% of the card, at least 0.5 GiB."""
    return max(GiB // 2, int(0.05 * total)) if total else GiB // 2


@dataclass(frozen=True)
class FitPlan:
    """What to load, and what it will take. `build_kwargs()` feeds Llama.build / load_checkpoint."""
    device: torch.device
    dtype: torch.dtype
    quantize: str | None
    max_seq_len: int
    batch_size: int
    wanted_seq_len: int
    free_bytes: int | None
    weights: int
    kv_cache: int
    activations: int
    logits: int
    workspace: int
    reason: str

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache + self.activations + self.logits + self.workspace

    @property
    def fits(self) -> bool:
        return self.free_bytes is None or self.total <= self.free_bytes

    def build_kwargs(self) -> dict:
        return dict(device=self.device, dtype=self.dtype, quantize=self.quantize, max_seq_len=self.max_seq_len)

    def describe(self) -> str:
        name = str(self.dtype).removeprefix("torch.") + (" weights, int8 linears" if self.quantize else "")
        rows = [("weights", self.weights), (f"KV cache ({self.batch_size} x {self.max_seq_len:,} tokens)", self.kv_cache),
                ("prefill activations", self.activations), ("float32 logits of a full prefill", self.logits),
                ("workspace margin", self.workspace), ("total estimate", self.total)]
        lines = [f"plan: {self.device.type}, {name}, context {self.max_seq_len:,} tokens, batch {self.batch_size}"]
        lines += [f"  {label:<36} {nbytes / GiB:7.2f} GiB" for label, nbytes in rows]
        free = "unknown" if self.free_bytes is None else f"{self.free_bytes / GiB:.2f} GiB"
        lines.append(f"  {'free on the device':<36} {free:>11}")
        lines.append(f"  why: {self.reason}")
        return "\n".join(lines)


def estimate(args: ModelArgs, device, dtype: torch.dtype, quantize: str | None, seq: int, batch: int = 1,
             free_bytes: int | None = None, total: int | None = None, wanted: int | None = None,
             reason: str = "") -> FitPlan:
    return FitPlan(torch.device(device), dtype, quantize, seq, batch, wanted or seq, free_bytes,
                   weight_bytes(args, dtype, quantize), kv_cache_bytes(args, batch, seq, dtype),
                   prefill_activation_bytes(args, batch, seq, dtype, quantize), logits_bytes(args, batch, seq, dtype),
                   workspace_bytes(total), reason)


def plan_fit(args: ModelArgs, device=None, free_bytes: int | None = None, max_seq_len: int | None = None,
             batch_size: int = 1, dtype=None, quantize="auto") -> FitPlan:
    """The plan for loading a model of shape `args` on `device` with `max_seq_len` tokens of
    context (default: the model's own): first the policy dtype at that context; if it does not
    fit, int8 weights at that context; if that does not fit either, the longest context that fits
    with int8 (a multiple of 256, at least 256 tokens). Raises CheckpointError if nothing fits.

    free_bytes: default the device's free memory now (`free_memory`); None on a device that does
    not say (mps) means the plan cannot check, and says so. dtype: None is the device policy.
    quantize: "auto" (decide), "int8" (always), None (never)."""
    device = resolve_device(device)
    dtype = resolve_dtype(dtype, device)
    free = free_memory(device) if free_bytes is None else int(free_bytes)
    return choose_plan(args, device, dtype, free, total_memory(device), max_seq_len or args.max_seq_len,
                       batch_size, quantize)


def choose_plan(args: ModelArgs, device, dtype: torch.dtype, free: int | None, total: int | None,
                wanted: int, batch_size: int = 1, quantize="auto") -> FitPlan:
    """plan_fit's rule, with the device's numbers given instead of asked: a GPU that is not here
    (a T4's specification) can be planned for too."""
    if quantize not in ("auto", "int8", None):
        raise CheckpointError(f"quantize={quantize!r} is not supported; use 'auto', 'int8' or None")
    device = torch.device(device)
    dname = str(dtype).removeprefix("torch.")
    plan = lambda q, seq, why: estimate(args, device, dtype, q, seq, batch_size, free, total, wanted, why)  # noqa: E731

    if free is None:
        return plan("int8" if quantize == "int8" else None, wanted, "free memory not known (or not asked): not checked")
    options = [None, "int8"] if quantize == "auto" else [quantize]
    for q in options:
        if plan(q, wanted, "").fits:
            if q is None:
                why = f"{dname} weights and a {wanted:,}-token cache fit"
            elif quantize == "int8":
                why = "int8 asked for"
            else:
                why = f"{dname} would need {plan(None, wanted, '').total / GiB:.2f} GiB at {wanted:,} tokens; int8 fits"
            return plan(q, wanted, why)
    q = options[-1]
    seq = (wanted - 1) // 256 * 256
    while seq >= 256:
        if plan(q, seq, "").fits:
            return plan(q, seq, f"not even int8 fits {wanted:,} tokens; the longest context that fits" if q
                        else f"{dname} does not fit {wanted:,} tokens; the longest context that fits")
        seq -= 256
    least = plan(q, min(256, wanted), "")
    raise CheckpointError(
        f"the model does not fit on {device}: even {'int8' if q else dname} weights with a {least.max_seq_len}-token "
        f"context need {least.total / GiB:.2f} GiB and {free / GiB:.2f} GiB is free; use a larger GPU, or free its memory")


__all__ = ["CheckpointError", "DTYPES", "default_device", "resolve_device", "resolve_dtype", "default_dtype",
           "has_native_bf16", "dtype_for_capability", "free_memory", "total_memory", "weight_bytes", "prefill_activation_bytes",
           "logits_bytes", "workspace_bytes", "FitPlan", "estimate", "plan_fit", "choose_plan"]
