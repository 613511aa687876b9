"""Weight-only int8: each Linear keeps its weight as int8 plus one scale per output row.

Halves a bf16 model's memory (a quarter of fp32) so that a 7B fits a 16 GB GPU. Activations
stay in floating point; the arithmetic is the same as before up to the rounding of each weight
to 1/127 of its row's largest magnitude.

Decoding reads every weight once per token, so int8 pays only if the matmul reads the int8
bytes themselves. Two paths, chosen per device by `int8_matmul_path` and reported by it:

* "int8pack_mm": PyTorch's weight-only int8 kernel, `torch._weight_int8pack_mm(x, w_int8,
  scales)`, which reads 1 byte per weight. It has a CPU kernel (torch >= 2.4) and an MPS one;
  newer torch builds also register a CUDA one. Registered or not is asked of the dispatcher, so
  whatever torch is installed decides; on CUDA it is also tried once per (GPU, dtype) on a tiny
  input, and the dequantize path runs where it raises. On CUDA it runs for up to INT8PACK_MAX_ROWS rows (decode
  steps, small batches): its CUDA kernel is a matrix-vector kernel, and a long prefill is
  compute-bound anyway, where the dequantize path's extra traffic is a small price.
* "dequantize": convert the weight to the activations' dtype and call F.linear: 1 byte read,
  2 written, 2 read again per weight and call (about 5 bytes against bf16's 2), so on a
  bandwidth-bound decode it is slower than bf16; only the memory saving remains.

On a CPU neither beats float32 at batch 1. W8A8Linear (quantize="w8a8", below) does: it
quantizes the activations to int8 too, and multiplies int8 by int8 with the CPU's dot-product
instructions; it trades some accuracy (measured by tests/test_quantize.py and
benchmarks/decode_cpu.py) for speed, not memory.
"""
import warnings

import torch
import torch.nn.functional as F
from torch import nn


def quantize_int8(w: torch.Tensor):
    """Symmetric per-row int8: w ≈ q * scale. w (out, in) -> q int8 (out, in), scale (out,)."""
    w = w.float().contiguous()  # (a TransposedLinear's weight is a transposed view)
    scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127.0
    q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scale


INT8PACK_MAX_ROWS = 16  # on CUDA, rows (batch x tokens) up to which the int8 kernel runs
_DISPATCH_KEYS = {"cpu": "CPU", "cuda": "CUDA", "mps": "MPS"}
_PATHS: dict = {}  # device type -> path, filled outside forward so that torch.compile sees a constant


def int8_matmul_path(device, dtype=None) -> str:
    """'int8pack_mm' where this torch has a weight-only int8 kernel for the device type, else
    'dequantize' (see the module's docstring). On a CUDA GPU a registered kernel may still refuse
    an activation dtype (float16 on an older GPU such as a T4, sm_75): the first time per
    (device, dtype) it is tried on a tiny input, and where it raises the dequantize path runs
    instead. `dtype` is the activations' dtype (float16 when not given); the answer is the
    path that actually runs."""
    device = torch.device(device)
    kind = device.type
    if kind not in _PATHS:
        op = getattr(torch, "_weight_int8pack_mm", None)
        key = _DISPATCH_KEYS.get(kind)
        has = op is not None and key is not None and torch._C._dispatch_has_kernel_for_dispatch_key(
            "aten::_weight_int8pack_mm", key)
        _PATHS[kind] = "int8pack_mm" if has else "dequantize"
    path = _PATHS[kind]
    if path == "int8pack_mm" and kind == "cuda" and torch.cuda.is_available():
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        if not _cuda_kernel_runs(device, dtype or torch.float16):
            return "dequantize"
    return path


_CUDA_PROBES: dict = {}  # (cuda device, activation dtype) -> whether _weight_int8pack_mm runs there


def _cuda_kernel_runs(device: torch.device, dtype: torch.dtype) -> bool:
    """Try the CUDA int8 kernel once per (device, dtype) on a tiny input; remember the answer."""
    key = (device, dtype)
    if key not in _CUDA_PROBES:
        try:
            x = torch.ones(1, 128, device=device, dtype=dtype)
            w = torch.ones(64, 128, device=device, dtype=torch.int8)
            out = torch._weight_int8pack_mm(x, w, torch.ones(64, device=device, dtype=dtype))
            torch.cuda.synchronize(device)
            _CUDA_PROBES[key] = bool(out.shape == (1, 64) and (out.float() == 128.0).all())
        except (RuntimeError, NotImplementedError):
            _CUDA_PROBES[key] = False
    return _CUDA_PROBES[key]


class Int8Linear(nn.Module):
    def __init__(self, weight: torch.Tensor, dtype: torch.dtype):
        super().__init__()
        q, scale = quantize_int8(weight)
        self.register_buffer("weight", q.contiguous())
        self.register_buffer("scale", scale.to(dtype))
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]
        int8_matmul_path(q.device, dtype)  # decided here, outside forward (on CUDA: probed per dtype)

    def path(self, x: torch.Tensor) -> str:
        """The path forward takes for this input."""
        path = _PATHS.get(x.device.type) or int8_matmul_path(x.device)
        if path == "int8pack_mm" and x.device.type == "cuda":
            if x.numel() // self.in_features > INT8PACK_MAX_ROWS:
                return "dequantize"
            if not _CUDA_PROBES.get((x.device, x.dtype)) and not _cuda_kernel_runs(x.device, x.dtype):
                return "dequantize"  # this GPU's kernel refuses this dtype (tried once, remembered)
        return path

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.path(x) == "int8pack_mm":
            # (rows, in) x (out, in)^T, each output row times its scale; the int8 bytes are read as they are
            scale = self.scale if self.scale.dtype == x.dtype else self.scale.to(x.dtype)
            out = torch._weight_int8pack_mm(x.reshape(-1, self.in_features).contiguous(), self.weight, scale)
            return out.reshape(*x.shape[:-1], self.out_features)
        # (x W_q^T) * scale == x (W_q * scale)^T: scale the output rows, not the whole matrix.
        return F.linear(x, self.weight.to(x.dtype)) * self.scale

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8"


INT8_FLOAT = ("output",)  # module names quantize_model_int8 leaves in floating point


def quantize_model_int8(model: nn.Module, skip: tuple[str, ...] = INT8_FLOAT) -> nn.Module:
    """Replace every nn.Linear in the model (but those named in skip, by default the output
    projection, whose errors go straight into the logits) with an Int8Linear, in place."""
    _check_names(skip)
    return _replace_linears(model, lambda name, w: int8_layer(name, w, w.dtype, skip=skip))


def int8_layer(name: str, weight: torch.Tensor, dtype: torch.dtype, device=None,
               skip: tuple[str, ...] = INT8_FLOAT) -> nn.Module | None:
    """What the Linear `name` becomes under weight-only int8: None (stays float) if skip names it,
    else an Int8Linear of `weight` (moved to `device` first, if given) with `dtype` scales."""
    if named(name, skip):
        return None
    return Int8Linear(weight if device is None else weight.to(device), dtype)


def named(name: str, names: tuple[str, ...]) -> bool:
    """Whether module `name` is one of `names`: its full name, or its ending after a dot
    ("feed_forward.w2" names every layer's W_2)."""
    return any(name == k or name.endswith("." + k) for k in names)


def _check_names(names) -> None:
    if isinstance(names, str) or not all(isinstance(k, str) for k in names):
        raise TypeError(f"layers are named by a tuple of module names, e.g. ('feed_forward.w2',); got {names!r}")


def _replace_linears(model: nn.Module, make) -> nn.Module:
    """Each nn.Linear becomes make(its full name, its weight), in place; None keeps it. Only names
    are held while walking the model, so each replaced Linear's float weight can be freed as soon
    as it is replaced (a 7B's float32 copy is not held twice over)."""
    for name in [n for n, _ in model.named_modules()]:
        module = model.get_submodule(name)
        for child_name in [n for n, c in module.named_children() if isinstance(c, nn.Linear)]:
            new = make(f"{name}.{child_name}" if name else child_name, getattr(module, child_name).weight.data)
            if new is not None:
                setattr(module, child_name, new)
    return model


# -- W8A8 on the CPU: int8 weights *and* int8 activations -------------------------------------
#
# Weight-only int8 saves memory, but no PyTorch CPU kernel makes it faster than float32 at
# batch 1. FBGEMM's dynamic quantized linear does: it quantizes its input to 8 bits in C++ and
# multiplies int8 by int8 into int32 with the CPU's dot-product instructions. Quantizing
# activations costs accuracy where they have outliers: a few channels of a token far larger
# than the rest set the 8-bit step for all of them. Three things keep that cost small:
#
# * Smoothing (SmoothQuant, Xiao et al. 2023): x W^T == (x / s)(W * s)^T for any per-channel s,
#   and s can be folded into the weights, free at run time: into the RMSNorm before W_Q, W_K,
#   W_V and before W_1, W_3. s_j = max|x_j|^a / max|W_j|^(1-a), a = 0.5, moves half of each
#   channel's outlier into the weights, which int8 rounds per output row and so tolerates
#   better. max|x_j| is measured on a forward over calibration tokens (by default random ones:
#   on SmolLM2 they gave about the KL of a text or of the model's own generations, so the
#   outlier channels belong to the model more than to the text).
# * Rotation (as in QuaRot, Ashkboos et al. 2024) for W_2, whose input silu(x W_1) * (x W_3)
#   is heavy-tailed in every channel (a token's largest value about ten times its RMS), which
#   no per-channel s can move, and which has no norm to fold into: x W^T == (x H)(W H)^T for an
#   orthonormal H. With H a Hadamard matrix (entries +-1/sqrt(b), per block of b = 128
#   channels) each rotated channel is a sum of 128 channels with random-looking signs, so one
#   large value is spread over 128 and the 8-bit step shrinks. W H is rotated once; x H costs
#   one small matmul per call. Measured on SmolLM2, W_2 alone in int8 (the others float), as
#   the KL divergence from float32's next-token distributions: 0.042 plain, 0.011 rotated
#   (decode_cpu.py prints each projection's; tests/test_quantize.py asserts the margin).
#   The smoothed inputs of W_Q, W_K, W_V and of W_1, W_3 are rotated too (blocks of 64, the
#   largest power of two dividing SmolLM2's 576): smoothing shrinks their outlier channels, the
#   rotation spreads what is left, and the one shared call (below) rotates once for its members.
#   Measured on SmolLM2, the whole W8A8 model: KL 0.037 with only W_2 rotated, 0.025 with these
#   too, for one more small matmul per call (11%, 8% and 8% of W8A8's decode speed in three runs
#   of the benchmark, 8% in an A/B of decode steps). With W_O's input rotated as well the KL was
#   0.025 against 0.023 without (on the same text with a BOS token; a float simulation of the
#   rounding gave 0.022 against 0.023): no gain to pay a third rotation for, so W_O and the
#   output projection are left alone.
# * Per-token activation scales (W8A8Linear): a token with large activations coarsens only
#   its own row.
#
# And one call where the model makes several: each FBGEMM call has a fixed cost (about 15 us
# on an Intel Xeon, as much as a 576x576 layer's arithmetic), so the projections that read the
# same input (W_Q, W_K, W_V; W_1, W_3) share one call (_SharedInput), 4 calls per layer, not 7.
# F16Linear (float16 weights, float32 activations) is there for layers a user keeps out of
# int8 (keep_float).

PROJECTIONS = ("attention.wq", "attention.wk", "attention.wv", "attention.wo", "feed_forward.w1",
               "feed_forward.w2", "feed_forward.w3", "output")  # every Linear of a Transformer, by name
W8A8_FLOAT = ()  # module names quantize_model_w8a8 keeps in floating point (F16Linear): none by default
W8A8_ROTATE = ("attention.wq", "attention.wk", "attention.wv", "feed_forward.w1", "feed_forward.w2",
               "feed_forward.w3")  # module names whose input W8A8Linear rotates (Hadamard) before quantizing
HADAMARD_BLOCK = 128  # channels per Hadamard block (or the largest power of two dividing in_features, if smaller)
SMOOTH_ALPHA = 0.5  # how much of each activation outlier smoothing moves into the weights (SmoothQuant's a)
CALIBRATION_TOKENS = 256  # random tokens whose activations set the smoothing (as sequences of up to 128)
_W8A8: dict = {}  # "ok" -> bool, "why" -> str: probed once per process


def w8a8_available() -> tuple[bool, str]:
    """(whether W8A8Linear and F16Linear run correctly here, why not). They need FBGEMM,
    PyTorch's x86 int8 engine, and int8 kernels that add u8 x s8 products exactly: without
    AVX512-VNNI they add pairs in 16 bits and saturate (255 * 127 * 2 > 32767). Each int8 kernel
    is tried once per process on the input that saturates, and the float16 one on a small input,
    so a CPU that would give wrong answers is refused, not used."""
    if not _W8A8:
        engine = torch.backends.quantized.engine
        if engine not in ("x86", "fbgemm"):
            _W8A8.update(ok=False, why=f"it uses FBGEMM, PyTorch's x86 int8 engine; this torch's is {engine!r}")
            return False, _W8A8["why"]
        try:
            layer = W8A8Linear(torch.ones(8, 64, device="cpu"), _probe=False)
            ones = torch.ones(1, 64, device="cpu")  # every activation 255, every weight 127: the answer is 64
            one, several = layer(ones)[0, 0].item(), layer(ones.expand(3, 64))[0, 0].item()
            ok = abs(one - 64) < 0.1 and abs(several - 64) < 0.1
            _W8A8.update(ok=ok, why="" if ok else
                         f"this CPU's int8 kernels saturate (64.0 came out as {one:.1f} for one token, "
                         f"{several:.1f} for several): they add u8 x s8 products in 16 bits without AVX512-VNNI")
        except (RuntimeError, AttributeError, NotImplementedError) as e:  # a torch without these kernels
            _W8A8.update(ok=False, why=f"this torch has no CPU int8 x int8 kernel ({type(e).__name__}: {e})")
        if _W8A8["ok"]:
            try:
                half = F16Linear(torch.ones(8, 64, device="cpu"), _probe=False)(ones)[0, 0].item()
                if half != 64:
                    _W8A8.update(ok=False, why=f"this CPU's float16 kernel gives {half} for 64")
            except (RuntimeError, AttributeError, NotImplementedError) as e:
                _W8A8.update(ok=False, why=f"this torch has no CPU float16 linear kernel ({type(e).__name__}: {e})")
    return _W8A8["ok"], _W8A8["why"]


def require_w8a8() -> None:
    ok, why = w8a8_available()
    if not ok:
        raise RuntimeError(f"W8A8 int8 is not available: {why}; use float32 (leave quantize unset) for speed, "
                           "or quantize='int8' to save memory")


class _PackedLinear(nn.Module):
    """A CPU inference Linear whose weight FBGEMM keeps in a packed copy of its own (not a buffer:
    it follows the buffers through load_state_dict, and refuses moves off the CPU and casts that
    would lose what it was packed from)."""

    keeps = ""  # what a move or a cast would break, for the refusal

    def __init__(self, weight: torch.Tensor, _probe: bool):
        super().__init__()
        if _probe:
            require_w8a8()
        if weight.device.type != "cpu":
            raise ValueError(f"{type(self).__name__} runs on the CPU; this weight is on {weight.device}")
        self.out_features, self.in_features = weight.shape

    def _pack(self) -> None:
        raise NotImplementedError

    def _refuse(self) -> None:
        raise ValueError(f"a {type(self).__name__} stays on the CPU with {self.keeps} (FBGEMM's packed copy is "
                         "made from them); quantize the float model again instead of moving or casting this one")

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self._pack()  # new weights: FBGEMM's copy follows them

    def _apply(self, fn, recurse=True):
        before = {k: t for k, t in self._buffers.items() if t is not None}
        out = super()._apply(fn, recurse)
        if any(self._buffers[k].data_ptr() != t.data_ptr() for k, t in before.items()):
            try:
                self._pack()  # new tensors: repacked, or refused if moved off the CPU or cast
            except ValueError:
                self._buffers.update(before)  # refused: the layer stays as it was, and usable
                raise
        return out

    def _check_input(self, x: torch.Tensor) -> None:
        if x.device.type != "cpu" or x.dim() == 0 or x.shape[-1] != self.in_features:
            raise ValueError(f"{type(self).__name__} takes CPU inputs of {self.in_features} features; got "
                             f"{tuple(x.shape)} on {x.device}")


class W8A8Linear(_PackedLinear):
    """y = x W^T with W as int8 (quantize_int8: one scale per output row) and each row of x
    (each token) quantized to 8 bits on every call, the products summed exactly in int32, then
    scaled back. CPU only; float32 inside (other float dtypes are converted); inference only.

    Each row's range, widened to include 0, is mapped onto 0..255 with a zero point, as FBGEMM's
    dynamic linear does. One row (a batch-1 decode step): FBGEMM's own kernel,
    torch.ops.quantized.linear_dynamic. Several rows (a prompt, a batch, beams): the same
    integers through torch._int_mm (int8 x int8 -> int32), because FBGEMM's op would give the
    whole block one scale, and one token with large activations (the first, often) would
    coarsen every other token's. So a row's result does not depend on the rows beside it."""

    keeps = "float32 scales"

    def __init__(self, weight: torch.Tensor, _probe: bool = True, _int8=None, rotate: bool = False):
        super().__init__(weight, _probe)
        if rotate and _int8 is not None:
            raise ValueError("rotate=True rotates a float weight before rounding it; _int8 is already rounded")
        self._shared = None  # the _SharedInput whose one call computes this layer's rows, if any
        # x W^T == (x H)(W H)^T: W H is what is quantized, x H is computed per call. H (b, b) is
        # in the state_dict, so that a rotated layer's weights do not load into a plain one.
        self.register_buffer("hadamard", hadamard(_block(self.in_features)) if rotate else None)
        if rotate:
            weight = _rotate(weight.float(), self.hadamard)
        q, scale = quantize_int8(weight) if _int8 is None else _int8  # _int8: (q, scale), already rounded
        self.register_buffer("weight", q)  # (out, in) int8
        self.register_buffer("scale", scale)  # (out,) float32
        self._pack()

    def _pack(self) -> None:
        """FBGEMM's copy of the weight, and the row sums the several-row path needs."""
        if self.weight.device.type != "cpu" or self.scale.dtype != torch.float32 or (
                self.hadamard is not None and self.hadamard.dtype != torch.float32):
            self._refuse()
        # the packed copy: 1 byte per weight, and per row a scale, a zero point, a column offset
        # (about); a member of a _SharedInput counts its rows of the shared copy
        self.nbytes = self.weight.numel() + 12 * self.out_features
        if self._shared is not None:
            self._shared.pack()  # its rows live in the shared call's packed copy
            return
        with warnings.catch_warnings():
            # FBGEMM's packing takes a quantized tensor, a type torch has deprecated (torchao, a
            # separate install, replaces it); w8a8_available() notices if a torch removes it.
            warnings.simplefilter("ignore")
            qw = torch._make_per_channel_quantized_tensor(
                self.weight, self.scale.double(), torch.zeros(self.out_features, dtype=torch.long), 0)
            self._packed = torch.ops.quantized.linear_prepack(qw, None)
        self._row_sums = self.weight.sum(dim=1, dtype=torch.int32)  # (out,)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._shared is not None:
            return self._shared.output(self, x)
        self._check_input(x)
        if self.hadamard is not None:  # rotated in float32, as the rest computes; back to x's dtype
            return self._plain(_rotate(x.float(), self.hadamard)).to(x.dtype)
        return self._plain(x)

    def _plain(self, x: torch.Tensor) -> torch.Tensor:
        if x.numel() == self.in_features and x.dim() >= 2 and x.dtype == torch.float32 and not x.requires_grad:
            # One row: a batch-1 decode step, the hot path, straight to FBGEMM (which flattens
            # and restores the leading dims, given at least two).
            return self._one_row(x)
        with torch.no_grad():  # inference only: rounding has no useful gradient, so none flows back
            return self._forward(x)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        if (prefix + "hadamard" in state_dict) != (self.hadamard is not None):
            # checked before anything is copied: a rotated layer's int8 rows are W H, wrong for a
            # plain layer (and the other way round), whether or not the load is strict
            kinds = ("a plain", "a rotated") if self.hadamard is not None else ("a rotated", "a plain")
            error_msgs.append(f"{prefix or 'W8A8Linear'}: {kinds[0]} W8A8Linear's weights do not load into "
                              f"{kinds[1]} one (rotate= must match)")
            return
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def _one_row(self, x: torch.Tensor) -> torch.Tensor:
        # reduce_range=False: all 8 bits for the activation, not the 7 that keep a CPU without
        # VNNI from saturating; w8a8_available() refuses such a CPU instead.
        return torch.ops.quantized.linear_dynamic(x, self._packed, False)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype, lead = x.dtype, x.shape[:-1]
        flat = x.float().reshape(-1, self.in_features)  # (rows, in)
        if flat.shape[0] == 1:
            out = self._one_row(flat)
        else:
            lo = flat.amin(dim=1, keepdim=True).clamp(max=0)  # (rows, 1)
            hi = flat.amax(dim=1, keepdim=True).clamp(min=0)
            x_scale = (hi - lo) / 255
            x_scale = torch.where(x_scale > 0, x_scale, torch.ones_like(x_scale))  # an all-zero row
            zero = torch.round(-lo / x_scale).clamp(0, 255)
            x_u8 = (torch.round(flat / x_scale) + zero).clamp(0, 255)  # the integers FBGEMM would use
            # _int_mm takes int8: shift 0..255 to -128..127 and add the shift back through the
            # weights' row sums: sum_k (u_k - z) w_nk = sum_k (u_k - 128) w_nk + (128 - z) sum_k w_nk
            acc = torch._int_mm((x_u8 - 128).to(torch.int8), self.weight.t())  # (rows, out) int32
            acc = acc + (128 - zero).to(torch.int32) * self._row_sums
            out = acc.float() * x_scale * self.scale
        return out.reshape(*lead, self.out_features).to(dtype)

    def extra_repr(self) -> str:
        rotated = f", input rotated (Hadamard, blocks of {self.hadamard.shape[0]})" if self.hadamard is not None else ""
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 weights and activations{rotated}"


def hadamard(b: int) -> torch.Tensor:
    """The b x b Hadamard matrix (Sylvester's: b a power of two), scaled to be orthonormal:
    entries +-1/sqrt(b), H H^T = I, and H = H^T."""
    if b < 1 or b & (b - 1):
        raise ValueError(f"a Sylvester Hadamard matrix has a power-of-two size, not {b}")
    h = torch.ones(1, 1)
    while h.shape[0] < b:
        h = torch.cat([torch.cat([h, h], dim=1), torch.cat([h, -h], dim=1)])
    return h / b ** 0.5


def _block(n: int) -> int:
    """HADAMARD_BLOCK, or the largest power of two that divides n if smaller."""
    return min(HADAMARD_BLOCK, n & -n)


def _rotate(x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """x (..., n) times the block-diagonal matrix of n / b copies of h (b, b): each block of b
    channels rotated on its own."""
    b = h.shape[0]
    return (x.reshape(-1, x.shape[-1] // b, b) @ h).reshape(x.shape)  # (rows, blocks, b) -> (..., n)


class _SharedInput:
    """Several W8A8Linear that read the same input (one attention's W_Q, W_K, W_V; one
    feed-forward's W_1, W_3) computed by one call: their int8 rows and scales stacked into one
    W8A8Linear (each member's buffers are views of its rows, so the int8 weights are held once).
    Each input row is quantized the same whatever the weight, so a member's slice of the stacked
    output is bitwise what it computes alone. The members are called one after another on the
    same tensor: the first call computes every member's rows, each later member takes its slice,
    and once all have, nothing is held. A member called again, or on another tensor, computes
    afresh; so does one whose input was changed in place since, except for an inference tensor
    (torch.inference_mode, as generate runs), which keeps no version counter to tell: llama_lite's
    Attention and FeedForward never change their input in place. Members rotated alike (each
    holds W H) share one call too: it rotates the input once for all of them."""

    def __init__(self, members: list[W8A8Linear]):
        if len({_rotation(m) for m in members}) > 1:  # checked before any member is changed
            raise ValueError("layers that share one call see one input: all rotate it alike, or none does")
        self.members = members
        for i, m in enumerate(members):
            m._shared, m._shared_index, m._packed, m._row_sums = self, i, None, None
        self.pack()

    def pack(self) -> None:
        """Stack the members' rows again (a member loaded new weights)."""
        q = torch.cat([m.weight for m in self.members])  # (sum of outs, in) int8
        scale = torch.cat([m.scale for m in self.members])
        self.whole = W8A8Linear(q, _probe=False, _int8=(q, scale))
        # rotated members hold W H already: the one call rotates the input once, for all of them
        self.whole.hadamard = self.members[0].hadamard
        ends = torch.tensor([m.out_features for m in self.members]).cumsum(0).tolist()
        self.slices = [slice(end - m.out_features, end) for end, m in zip(ends, self.members)]
        for m, rows in zip(self.members, self.slices):
            m._buffers["weight"], m._buffers["scale"] = q[rows], scale[rows]  # views: one copy of the weights
        self._memo = None  # (input, its version, output, members still to take their rows)

    def output(self, member: W8A8Linear, x: torch.Tensor) -> torch.Tensor:
        i = member._shared_index
        version = None if x.is_inference() else x._version  # inference tensors keep no version
        memo = self._memo  # read once: another thread's call replaces it, never changes it under this one
        if memo is None or memo[0] is not x or memo[1] != version or i not in memo[3]:
            memo = (x, version, self.whole(x), set(range(len(self.members))))  # every member's rows at once
            self._memo = memo
        memo[3].discard(i)
        if not memo[3] and self._memo is memo:
            self._memo = None  # every member has its rows: hold no tensor
        return memo[2][..., self.slices[i]]


class F16Linear(_PackedLinear):
    """y = x W^T with W stored as float16 and everything else float32: FBGEMM's fp16 kernel
    reads 2 bytes per weight and widens them in registers, so the only error is each weight's
    rounding to float16 (11 significant bits). The layers a W8A8 model keeps in floating point
    (keep_float): half of float32's bytes read per step, none of int8's activation rounding. (In
    memory, its float16 buffer and FBGEMM's packed copy together take float32's 4 bytes.)
    CPU only; inference only."""

    keeps = "float16 weights"

    def __init__(self, weight: torch.Tensor, _probe: bool = True):
        super().__init__(weight, _probe)
        w = weight.float()
        big = w.abs().max().item() if w.numel() else 0.0
        if big > torch.finfo(torch.float16).max:
            raise ValueError(f"a weight of magnitude {big:.3g} does not fit float16 (max 65504); "
                             "this model needs quantize=None")
        self.register_buffer("weight", w.half().contiguous())  # (out, in) float16
        self._pack()

    def _pack(self) -> None:
        if self.weight.device.type != "cpu" or self.weight.dtype not in (torch.float16, torch.float32, torch.float64):
            self._refuse()  # moved, or cast to a narrower type (bfloat16) that has lost bits
        if self.weight.dtype != torch.float16:
            # widened (a model.float(), or float32 weights loaded with assign=True): back to
            # float16, exact for the former, the rounding any F16Linear does for the latter
            self._buffers["weight"] = self.weight.half()
        self._packed = torch.ops.quantized.linear_prepack_fp16(self.weight.float(), None)
        self.nbytes = 2 * self.weight.numel()  # the packed copy: float16 (about: FBGEMM pads its blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        if x.dim() >= 2 and x.dtype == torch.float32 and not x.requires_grad:
            return torch.ops.quantized.linear_dynamic_fp16(x, self._packed)  # float32 in: any number of rows
        with torch.no_grad():  # inference only, as W8A8Linear
            flat = x.float().reshape(-1, self.in_features)  # (rows, in): FBGEMM wants two dims at least
            out = torch.ops.quantized.linear_dynamic_fp16(flat, self._packed)
            return out.reshape(*x.shape[:-1], self.out_features).to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, float16 weights"


def quantize_model_w8a8(model: nn.Module, keep_float: tuple[str, ...] = W8A8_FLOAT, smooth: bool = True,
                        rotate: tuple[str, ...] = W8A8_ROTATE, calibration: torch.Tensor | None = None) -> nn.Module:
    """Replace every nn.Linear of a CPU model by a W8A8Linear, in place, but those named in
    keep_float (see `named`; none by default), which become F16Linear. The output projection is
    included: it is the largest matrix (a fifth of SmolLM2's bytes). Those named in `rotate` (by
    default all but W_O and the output: W8A8_ROTATE) rotate their input first. A Transformer is
    first smoothed (`smooth_for_int8`, on `calibration` tokens, by default random ones;
    smooth=False skips it), and its projections that read the same input share one call
    (_SharedInput)."""
    _check_names(keep_float)
    _check_names(rotate)
    require_w8a8()
    if smooth:
        smooth_for_int8(model, lambda name: not named(name, keep_float), calibration)
    _replace_linears(model, lambda name, w: w8a8_layer(name, w, keep_float, rotate))
    return _share_inputs(model)


def w8a8_only(model: nn.Module, names: tuple[str, ...], smooth: bool = True,
              rotate: tuple[str, ...] = W8A8_ROTATE) -> nn.Module:
    """Only the Linears named in `names` become W8A8Linear (smoothed and rotated as
    quantize_model_w8a8 does), in place, the rest stay as they are: what one projection's int8
    costs alone."""
    _check_names(names)
    _check_names(rotate)
    require_w8a8()
    if smooth:
        smooth_for_int8(model, lambda name: named(name, names))
    return _replace_linears(model, lambda name, w: w8a8_layer(name, w, (), rotate) if named(name, names) else None)


def w8a8_layer(name: str, weight: torch.Tensor, keep_float: tuple[str, ...] = W8A8_FLOAT,
               rotate: tuple[str, ...] = W8A8_ROTATE) -> nn.Module:
    """What the Linear `name` becomes under W8A8: F16Linear if keep_float names it, else a
    W8A8Linear, its input rotated if `rotate` names it (by default all but W_O and the output:
    W8A8_ROTATE)."""
    if named(name, keep_float):
        return F16Linear(weight)
    return W8A8Linear(weight, rotate=named(name, rotate))


SHARED_INPUTS = (("wq", "wk", "wv"), ("w1", "w3"))  # an Attention's and a FeedForward's Linears that read one input


def _share_inputs(model: nn.Module) -> nn.Module:
    """Give each Attention's and FeedForward's W8A8Linear that read one input (SHARED_INPUTS,
    those rotated alike, or those not rotated) one _SharedInput, in place."""
    from .attention import Attention  # (they import this module)
    from .feedforward import FeedForward

    for module in model.modules():
        if isinstance(module, (Attention, FeedForward)):
            for names in SHARED_INPUTS:
                layers = [getattr(module, n) for n in names if isinstance(getattr(module, n, None), W8A8Linear)]
                # one call only for layers that see one input: rotated alike, or not rotated
                for rotation in {_rotation(m) for m in layers}:
                    members = [m for m in layers if _rotation(m) == rotation]
                    if len(members) > 1 and all(m._shared is None for m in members):
                        _SharedInput(members)
    return model


def _rotation(layer: W8A8Linear) -> tuple | None:
    """The Hadamard block's shape a W8A8Linear rotates its input by, or None."""
    return None if layer.hadamard is None else tuple(layer.hadamard.shape)


def calibration_tokens(vocab_size: int, max_seq_len: int, n: int = CALIBRATION_TOKENS, seed: int = 0) -> torch.Tensor:
    """Random token ids, (rows, seq) with seq = min(128, max_seq_len) and rows = max(1, n // seq):
    for a given seed the same ids on every machine, cut into the sequences max_seq_len allows."""
    seq = min(128, max_seq_len)
    rows = max(1, n // seq)
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (max(n, rows * seq),), generator=g)[: rows * seq].view(rows, seq)


@torch.no_grad()
def activation_ranges(model: nn.Module, calibration: torch.Tensor) -> dict[str, torch.Tensor]:
    """max |x_j| of each input channel j of every Linear over a forward of `calibration`
    (token ids, (batch, seq)), by the Linear's module name."""
    ranges, hooks = {}, []

    def record(name):
        def hook(module, args, out):
            x = args[0].detach().abs().reshape(-1, args[0].shape[-1]).amax(dim=0).float()  # (in,)
            ranges[name] = torch.maximum(ranges[name], x) if name in ranges else x
        return hook

    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            hooks.append(module.register_forward_hook(record(name)))
    try:
        model(calibration)
    finally:
        for h in hooks:
            h.remove()
    return ranges


@torch.no_grad()
def smooth_for_int8(model: nn.Module, is_int8, calibration: torch.Tensor | None = None,
                    alpha: float = SMOOTH_ALPHA) -> nn.Module:
    """SmoothQuant, folded into the weights of a float Transformer, in place (the comment above
    W8A8Linear says why): for each group of projections after an RMSNorm that will have int8
    activations (is_int8(name) says which: W_Q, W_K, W_V; W_1, W_3), each input channel j is
    divided by s_j = max|x_j|^alpha / max|W_j|^(1 - alpha) in the RMSNorm's weight and the
    projections' columns multiplied by it. In float the model computes the same function (to
    rounding). New tensors, never the old ones changed: a weight shared with another model
    stays as it was. Anything but a llama_lite Transformer is left alone (no norms to fold into).
    calibration: token ids, (batch, seq); by default calibration_tokens()."""
    from .model import Transformer  # (it imports this module)

    if not isinstance(model, Transformer):
        return model
    if is_quantized(model):
        raise ValueError("smoothing folds scales into float weights, and this model already has quantized layers; "
                         "quantize the float model (load it again without quantize)")
    p = model.params
    if calibration is None:
        calibration = calibration_tokens(p.vocab_size, p.max_seq_len)
    caches = [block.attention.cache for block in model.layers]
    model.clear_cache()  # the calibration forward is a prompt of its own, not the next tokens of a cached one
    try:
        ranges = activation_ranges(model, calibration.to(model.tok_embeddings.weight.device))
    finally:
        for block, cache in zip(model.layers, caches):
            block.attention.cache = cache
    for i, block in enumerate(model.layers):
        att, ffn = block.attention, block.feed_forward
        prefix = f"layers.{i}."
        if any(is_int8(prefix + "attention." + n) for n in ("wq", "wk", "wv")):
            _smooth(ranges[prefix + "attention.wq"], block.attention_norm, (att.wq, att.wk, att.wv), alpha)
        if any(is_int8(prefix + "feed_forward." + n) for n in ("w1", "w3")):
            _smooth(ranges[prefix + "feed_forward.w1"], block.ffn_norm, (ffn.w1, ffn.w3), alpha)
    return model


def _smooth(x_max: torch.Tensor, before: nn.Module, after: tuple[nn.Module, ...], alpha: float) -> None:
    """Divide the channels `before` (an RMSNorm) makes by s, multiply the columns of the Linears
    `after` by s."""
    w_max = torch.cat([m.weight for m in after]).abs().amax(dim=0).float()  # (channels,)
    s = x_max.clamp(min=1e-5).pow(alpha) / w_max.clamp(min=1e-5).pow(1 - alpha)  # (channels,)
    w = before.weight
    before.weight = nn.Parameter((w.float() / s).to(w.dtype), requires_grad=w.requires_grad)
    for m in after:
        m.weight = nn.Parameter((m.weight.float() * s).to(m.weight.dtype), requires_grad=m.weight.requires_grad)


def is_quantized(model: nn.Module) -> bool:
    """Whether any Linear of the model is a quantized one (Int8Linear, W8A8Linear, F16Linear)."""
    return any(isinstance(m, (Int8Linear, _PackedLinear)) for m in model.modules())


def model_bytes(model: nn.Module) -> int:
    """Bytes of all parameters and buffers, each shared tensor counted once, and of FBGEMM's
    packed copies (W8A8Linear, F16Linear)."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        key = id(t) if t.is_meta else t.data_ptr()  # meta tensors have no memory: every data_ptr is 0
        if key not in seen:
            seen.add(key)
            total += t.numel() * t.element_size()
    return total + sum(m.nbytes for m in model.modules() if isinstance(m, _PackedLinear))
