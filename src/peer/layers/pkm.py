"""Product key memory (Lample et al. 2019), the paper's PKM baseline: 1024^2 memories, h=8, k=32.

    I_h(x) = top-k_i { q_h(x)^T k_{h,i} }        product keys, one key set per head
    w_h(x) = softmax over the k scores of head h
    y(x)   = sum_h sum_{i in I_h(x)} w_{h,i}(x) v_i   values shared by all heads (EmbeddingBag reads)

Unlike PEER a memory is a value vector v_i, not a neuron: there is no input projection u_i.

Initialisation: the query network and keys as in PEER (BatchNorm makes the query unit-variance,
sub-keys ~ N(0, 1/key_dim)). Values ~ N(0, k / h): each output coordinate is a sum of h*k terms
w_j v_j with sum_j w_j^2 ~ 1/k per head (softmax over near-equal top scores), so Var[y] ~ 1 at
init, the same scale as PEER's output. (Lample et al. use N(0, 1/d), i.e. unit-norm value rows,
which gives a smaller output, Var[y] ~ h/(k d).)
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .base import check_positive_number
from .router import ProductKeyRouter

__all__ = ["PKM"]


class PKM(ProductKeyRouter):
    """A product-key memory layer ``R^d -> R^d`` with ``num_memories`` value vectors.

    Args:
        dim: model width d (input and output; values are d-dimensional).
        num_memories: N, a perfect square.
        heads: h query networks, each with its own product keys, reading one shared value table.
        topk: k memories per head; at most sqrt(N).
        key_dim: query/key width (even).
        query_norm: "batchnorm" (paper), "layernorm" or "none".
    """

    def __init__(
        self,
        dim: int,
        num_memories: int = 1024**2,
        heads: int = 8,
        topk: int = 32,
        key_dim: int = 256,
        query_norm: str = "batchnorm",
        value_init_scale: float = 1.0,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        check_positive_number(value_init_scale, "value_init_scale")
        # queries, their norm, one set of product keys per head, softmax scores, usage (peer.layers.router)
        super().__init__(
            dim,
            num_memories,
            heads,
            topk,
            key_dim,
            query_norm,
            heads,
            "softmax",
            keys_name="num_memories",
            device=device,
            dtype=dtype,
        )
        self.value_init_scale = float(value_init_scale)
        self.num_memories = num_memories
        self.values = nn.Parameter(torch.empty(num_memories, dim, device=device, dtype=dtype))
        self._reset_values()

    def _reset_values(self, write: bool = True) -> None:
        with torch.no_grad():
            std = self.value_init_scale * math.sqrt(self.topk / self.heads)
            (self.values if write else torch.empty_like(self.values)).normal_(0.0, std)

    def reset_parameters(self, pool: bool = True) -> None:
        """Initialise again as the constructor did (same draws, same order); ``pool=False`` draws but keeps
        the keys and values (a pool shared with an earlier layer)."""
        self._reset_router(pool)
        self._reset_values(pool)

    @property
    def num_experts(self) -> int:
        """The number of memories (named as PEER's for usage/unevenness code)."""
        return self.num_memories

    def expert_parameters(self) -> list[nn.Parameter]:
        """The value table: the optimizer's ``experts`` group (its own lr, as XLM's PKM)."""
        return [self.values]

    def residual_table(self) -> torch.Tensor:
        """The value table: the LM scales it by 1/sqrt(2 n_layers) at init."""
        return self.values

    def pool_names(self) -> tuple[str, ...]:
        return ("index", "values")

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, num_memories={self.num_memories}, heads={self.heads}, topk={self.topk}, "
            f"key_dim={self.key_dim}, query_norm={self.query_norm_kind!r}"
        )

    def forward_with_aux(self, x: torch.Tensor) -> tuple[torch.Tensor, None]:
        """y(x) of the module docstring; PKM has no auxiliary loss."""
        xf = self._flat(x)
        w, idx = self._retrieve(xf)  # [T, h, k]
        if self.record_usage:
            self._accumulate_usage(w, idx)
        # one bag of h*k weighted value rows per token
        y = F.embedding_bag(
            idx.flatten(1), self.values, per_sample_weights=w.flatten(1).to(self.values.dtype), mode="sum"
        )
        return y.view(*x.shape[:-1], self.dim), None
