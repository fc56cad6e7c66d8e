"""The dense feed-forward block (the paper's dense baseline and every non-sparse block's FFW).

gelu:   y = W2 gelu(W1 x)                 d -> hidden -> d
swiglu: y = W2 (silu(W1 x) * W3 x)        d -> hidden -> d, with a third (gate) matrix W3
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import FeedForward, check_dim, check_positive_int
from .lora import linear

__all__ = ["DenseFFN"]

_ACTS = ("gelu", "swiglu")


class DenseFFN(FeedForward):
    """Two-layer MLP ``d -> hidden -> d`` with a GELU or SwiGLU nonlinearity.

    Args:
        dim: model width d (input and output).
        hidden: inner width (the paper's dense FFW uses 4 d).
        activation: "gelu" (``w2(gelu(w1 x))``) or "swiglu" (``w2(silu(w1 x) * w3 x)``).
        bias: add biases to the linear maps.
        lora_rank, lora_alpha: LoRA on each linear map (:mod:`peer.layers.lora`; rank 0: none).
    """

    def __init__(
        self,
        dim: int,
        hidden: int,
        activation: str = "gelu",
        bias: bool = False,
        lora_rank: int = 0,
        lora_alpha: float = 0.0,
    ) -> None:
        super().__init__()
        check_positive_int(dim, "dim")
        check_positive_int(hidden, "hidden")
        if activation not in _ACTS:
            raise ValueError(f"activation must be one of {', '.join(map(repr, _ACTS))}, got {activation!r}")
        self.dim, self.hidden, self.activation = dim, hidden, activation
        self.w1 = linear(dim, hidden, bias, lora_rank, lora_alpha)
        self.w2 = linear(hidden, dim, bias, lora_rank, lora_alpha)
        self.w3 = linear(dim, hidden, bias, lora_rank, lora_alpha) if activation == "swiglu" else None

    def extra_repr(self) -> str:
        return f"dim={self.dim}, hidden={self.hidden}, activation={self.activation!r}"

    def reset_parameters(self) -> None:
        """nn.Linear's default init of w1, w2 (and w3), in construction order (the LM then applies its own)."""
        for lin in (self.w1, self.w2, self.w3):
            if lin is not None:
                lin.reset_parameters()

    def forward_with_aux(self, x: torch.Tensor) -> tuple[torch.Tensor, None]:
        check_dim(x, self.dim)
        if self.w3 is not None:
            return self.w2(F.silu(self.w1(x)) * self.w3(x)), None
        return self.w2(F.gelu(self.w1(x))), None
