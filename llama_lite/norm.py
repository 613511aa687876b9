"""Notebook 01: LayerNorm and RMSNorm, written out."""
import torch
from torch import nn


def _at_least_float32(x: torch.Tensor) -> torch.Tensor:
    """x in float32, or in float64 if it already is: the precision normalization is done in."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x^2) + eps) * g. Re-scales each row, does not re-center it."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalize in float32 even for half-precision inputs: the mean of squares of
        # bf16 values loses too many bits, which is why Meta's reference does the same.
        # (float64 stays float64: upcast, never downcast.)
        return self._norm(_at_least_float32(x)).type_as(x) * self.weight


class LayerNorm(nn.Module):
    """y = (x - mean(x)) / sqrt(var(x) + eps) * g + b. Re-centers, then re-scales, each row."""

    def __init__(self, dim: int, eps: float = 1e-5, bias: bool = True):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = _at_least_float32(x)
        centered = xf - xf.mean(-1, keepdim=True)
        var = centered.pow(2).mean(-1, keepdim=True)  # biased variance, as torch.nn.LayerNorm
        y = (centered * torch.rsqrt(var + self.eps)).type_as(x) * self.weight
        return y + self.bias if self.bias is not None else y
