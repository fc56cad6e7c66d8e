"""The contract between a feed-forward layer and everything that uses it (the model, the optimizer's
parameter groups, initialisation, evaluation, sharding).

    FeedForward                 every FFW a block holds: DenseFFN, and the sparse layers below
    └── SparseFeedForward       a layer that replaces (or sits beside) a block's FFW: MoE, and
        └── ProductKeyRouter    the product-key layers (peer.layers.router): PEER, PKM and the
                                expert-sharded PEER (peer.distributed), which also keep usage accounts

What a caller may rely on, and nothing else (no attribute probing):

- ``layer(x)`` -> y shaped like x; ``layer(x, return_aux=True)`` -> ``(y, aux)``, aux the layer's
  weighted auxiliary loss (a scalar tensor) or None. Subclasses implement :meth:`forward_with_aux`;
  calling the module (not the method) runs hooks (FSDP2's, profilers').
- :meth:`reset_parameters` initialises every parameter again with the constructor's draws, in its
  order (meta-device init replays it); a sparse layer's ``pool=False`` draws its expert pool but does
  not write it (a pool shared with an earlier layer).
- :meth:`expert_parameters` / :meth:`key_parameters`: the optimizer's ``experts`` and ``keys`` groups.
- :meth:`residual_table`: the sparse layer's residual output table, which the LM scales by
  1/sqrt(2 n_layers) at init (None: left as the layer made it).
- ``supports_sparse_grad`` / ``sparse_grad``: whether the layer can hand its expert tables sparse row
  gradients, and whether it does (the trainer sets it from ``optim.sparse_experts``).
- :meth:`share_pool`: point this layer's expert pool at another layer's (``model.share_experts``).
- :meth:`causal`: whether, in evaluation, a token's output depends on that token alone (then the LM's
  perplexity is a causal LM perplexity); False for MoE routings that rank the flattened batch.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, ClassVar, TypeVar

import torch
from torch import nn

__all__ = [
    "FeedForward",
    "SparseFeedForward",
    "check_dim",
    "check_choice",
    "check_positive_int",
    "check_positive_number",
]


def check_dim(x: torch.Tensor, dim: int, like: torch.Tensor | None = None) -> torch.Tensor:
    """Return ``x`` flattened to [T, dim]; ValueError when its last dimension is not ``dim`` or, given
    ``like`` (a parameter of the layer), when its dtype or device differs from it (dtypes may
    differ under autocast)."""
    if not isinstance(x, torch.Tensor) or x.dim() == 0 or x.shape[-1] != dim:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"input must have shape [..., dim={dim}], got {shape}")
    if like is not None:
        if x.device != like.device:
            raise ValueError(
                f"input is on {x.device}, the layer on {like.device}: move one (layer.to(...) or x.to(...))"
            )
        if x.dtype != like.dtype and not torch.is_autocast_enabled(x.device.type):
            raise ValueError(
                f"input dtype {x.dtype} differs from the layer's {like.dtype}: cast one "
                f"(layer.to({x.dtype}) or x.to({like.dtype})), or run under torch.autocast"
            )
    return x.reshape(-1, dim)


T = TypeVar("T")


def check_choice(value: T, allowed: Sequence[object], name: str) -> T:
    """``value`` if it is one of ``allowed``, else a ValueError naming ``name`` and the allowed values."""
    if value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, allowed))}, got {value!r}")
    return value


def check_positive_int(value: object, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


def check_positive_number(value: object, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a positive number, got {value!r}")
    return float(value)


class FeedForward(nn.Module):
    """Base class of every feed-forward layer ``R^dim -> R^dim``; see the module docstring."""

    dim: int

    def forward(self, x: torch.Tensor, return_aux: bool = False) -> Any:
        y, aux = self.forward_with_aux(x)
        return (y, aux) if return_aux else y

    def forward_with_aux(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(output shaped like ``x``, weighted auxiliary loss or None)."""
        raise NotImplementedError(f"{type(self).__name__} must implement forward_with_aux")

    def reset_parameters(self) -> None:
        raise NotImplementedError(f"{type(self).__name__} must implement reset_parameters")

    def expert_parameters(self) -> list[nn.Parameter]:
        """The expert tables (optimizer group ``experts``); none for a dense layer."""
        return []

    def key_parameters(self) -> list[nn.Parameter]:
        """The product keys (optimizer group ``keys``); none unless the layer retrieves by key."""
        return []

    def causal(self) -> bool:
        """True when, in evaluation, each token's output depends on that token's input alone (no other
        position, no other sequence of the batch): the LM's perplexity is then causal
        (tests/test_causality.py measures it for every layer)."""
        return True


class SparseFeedForward(FeedForward):
    """A layer the model puts in ``cfg.sparse_block_ids()``: PEER, PKM, MoE (and the sharded PEER)."""

    supports_sparse_grad: ClassVar[bool] = False
    sparse_grad: bool = False

    def reset_parameters(self, pool: bool = True) -> None:
        raise NotImplementedError(f"{type(self).__name__} must implement reset_parameters")

    def residual_table(self) -> torch.Tensor | None:
        """The residual output table the LM scales at init (PEER ``v``, PKM values); None: left alone."""
        return None

    def pool_names(self) -> tuple[str, ...]:
        """Names of the submodules/parameters that make up the expert pool (what :meth:`share_pool` shares)."""
        return ()

    def share_pool(self, owner: SparseFeedForward) -> None:
        """Use ``owner``'s expert pool (same Parameter objects, stepped once) instead of this layer's own."""
        names = self.pool_names()
        if not names or type(owner) is not type(self):
            raise ValueError(f"{type(self).__name__} cannot share an expert pool with {type(owner).__name__}")
        for name in names:
            setattr(self, name, getattr(owner, name))
