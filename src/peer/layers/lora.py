"""LoRA: a linear map with a trainable low-rank update (Hu et al., "LoRA: Low-Rank Adaptation of Large
Language Models", arXiv:2106.09685), the dense model's fine-tuning baseline of the knowledge study's
moonshot (issue 29: new facts without forgetting).

    h = W0 x + (alpha / r) B A x                  (LoRA eq. 3, with the paper's scaling alpha / r)

``W0`` [out, in] is the pre-trained weight (named ``weight``, as in ``nn.Linear``, so a checkpoint of a
model without LoRA loads into one with it), ``A`` [r, in] starts random (Kaiming-uniform, as ``nn.Linear``)
and ``B`` [out, r] at zero, so the map starts as ``W0 x`` exactly. ``train.trainable="lora"`` trains
only ``A`` and ``B``; :func:`merged_weight` folds them into ``W0`` (export).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .base import check_positive_int

__all__ = ["LoRALinear", "linear", "merged_weight", "is_lora_param", "LORA_PARAMS"]

LORA_PARAMS = ("lora_a", "lora_b")  # the names of the low-rank factors (a checkpoint without them still loads)


def is_lora_param(name: str) -> bool:
    """Whether the parameter / state-dict key ``name`` is one of LoRA's factors."""
    return name.rpartition(".")[2] in LORA_PARAMS


class LoRALinear(nn.Module):
    """``nn.Linear(in_features, out_features, bias)`` plus the update ``(alpha / rank) B A`` (module docstring)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False, rank: int = 8, alpha: float = 0.0):
        super().__init__()
        for name, v in (("in_features", in_features), ("out_features", out_features), ("rank", rank)):
            check_positive_int(v, name)
        if not alpha >= 0 or not math.isfinite(alpha):
            raise ValueError(f"alpha must be a finite number >= 0 (0: = rank), got {alpha}")
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.scale = (alpha or rank) / rank
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None
        self.lora_a = nn.Parameter(torch.empty(rank, in_features))
        self.lora_b = nn.Parameter(torch.empty(out_features, rank))
        self.reset_parameters()

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, scale={self.scale:g}"
        )

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """``nn.Linear``'s init of ``weight`` and ``bias`` (the same draws), then ``A`` Kaiming-uniform, ``B`` = 0."""
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            bound = 1 / math.sqrt(self.in_features)
            nn.init.uniform_(self.bias, -bound, bound)
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))
        nn.init.zeros_(self.lora_b)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias) + self.scale * F.linear(F.linear(x, self.lora_a), self.lora_b)


def linear(
    in_features: int, out_features: int, bias: bool = False, lora_rank: int = 0, lora_alpha: float = 0.0
) -> nn.Linear | LoRALinear:
    """``nn.Linear``, or :class:`LoRALinear` when ``lora_rank > 0``."""
    if lora_rank:
        return LoRALinear(in_features, out_features, bias, lora_rank, lora_alpha)
    return nn.Linear(in_features, out_features, bias=bias)


@torch.no_grad()
def merged_weight(m: LoRALinear) -> torch.Tensor:
    """``W0 + (alpha / r) B A``: the plain linear map equal to ``m``."""
    return m.weight + m.scale * (m.lora_b @ m.lora_a)
