"""The dense feed-forward block (the paper's dense baseline and every non-sparse block's FFW).

    gelu:   y = W2 gelu(W1 x)                 d -> hidden -> d
    swiglu: y = W2 (silu(W1 x) * W3 x)        d -> hidden -> d, with a third (gate) matrix W3
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["DenseFFN", "check_dim"]

_ACTS = ("gelu", "swiglu")


def check_dim(x: torch.Tensor, dim: int, like: torch.Tensor | None = None) -> torch.Tensor:
    """Return ``x`` flattened to [T, dim]; ValueError when its last dimension is not ``dim`` or, given
    ``like`` (a parameter of the layer), when its dtype or device differs from it (dtypes may
    differ under autocast)."""
    if not isinstance(x, torch.Tensor) or x.dim() == 0 or x.shape[-1] != dim:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"input must have shape [..., dim={dim}], got {shape}")
    if like is not None:
        if x.device != like.device:
            raise ValueError(f"input is on {x.device}, the layer on {like.device}: move one (layer.to(...) or x.to(...))")
        if x.dtype != like.dtype and not torch.is_autocast_enabled(x.device.type):
            raise ValueError(f"input dtype {x.dtype} differs from the layer's {like.dtype}: cast one "
                             f"(layer.to({x.dtype}) or x.to({like.dtype})), or run under torch.autocast")
    return x.reshape(-1, dim)


def check_choice(value, allowed, name: str):
    """``value`` if it is one of ``allowed``, else a ValueError naming ``name`` and the allowed values."""
    if value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, allowed))}, got {value!r}")
    return value


def check_positive_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


class DenseFFN(nn.Module):
    """Two-layer MLP ``d -> hidden -> d`` with a GELU or SwiGLU nonlinearity.

    Args:
        dim: model width d (input and output).
        hidden: inner width (the paper's dense FFW uses 4 d).
        activation: "gelu" (``w2(gelu(w1 x))``) or "swiglu" (``w2(silu(w1 x) * w3 x)``).
        bias: add biases to the linear maps.
    """

    def __init__(self, dim: int, hidden: int, activation: str = "gelu", bias: bool = False):
        super().__init__()
        check_positive_int(dim, "dim")
        check_positive_int(hidden, "hidden")
        if activation not in _ACTS:
            raise ValueError(f"activation must be one of {', '.join(map(repr, _ACTS))}, got {activation!r}")
        self.dim, self.hidden, self.activation = dim, hidden, activation
        self.w1 = nn.Linear(dim, hidden, bias=bias)
        self.w2 = nn.Linear(hidden, dim, bias=bias)
        self.w3 = nn.Linear(dim, hidden, bias=bias) if activation == "swiglu" else None

    def extra_repr(self) -> str:
        return f"dim={self.dim}, hidden={self.hidden}, activation={self.activation!r}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_dim(x, self.dim)
        if self.w3 is not None:
            return self.w2(F.silu(self.w1(x)) * self.w3(x))
        return self.w2(F.gelu(self.w1(x)))
