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

from .dense import check_dim, check_positive_int
from .index import ProductKeyIndex, check_product_keys
from .peer import _bn_single, make_query_norm

__all__ = ["PKM"]


class PKM(nn.Module):
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
    ):
        super().__init__()
        check_positive_int(dim, "dim")
        check_product_keys(num_memories, key_dim, topk, heads, keys_name="num_memories")
        self.dim, self.num_memories, self.heads, self.topk, self.key_dim = dim, num_memories, heads, topk, key_dim
        self.query_norm_kind = query_norm

        self.query_proj = nn.Linear(dim, heads * key_dim, bias=False)
        self.query_norm = make_query_norm(query_norm, heads, key_dim)  # validates query_norm
        self.index = ProductKeyIndex(num_memories, key_dim, groups=heads, name="num_memories")
        self.values = nn.Parameter(torch.empty(num_memories, dim).normal_(0.0, math.sqrt(topk / heads)))
        # memory usage accounting (as PEER's, paper Table 2), off by default
        self.record_usage = False
        self.register_buffer("usage", torch.zeros(0, dtype=torch.float64), persistent=False)

    @property
    def num_experts(self) -> int:
        """The number of memories (named as PEER's for usage/unevenness code)."""
        return self.num_memories

    def expert_parameters(self) -> list[nn.Parameter]:
        """The value table: the optimizer's ``experts`` group (its own lr, as XLM's PKM)."""
        return [self.values]

    def key_parameters(self) -> list[nn.Parameter]:
        """The product sub-keys: the optimizer's ``keys`` group."""
        return [self.index.keys]

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, num_memories={self.num_memories}, heads={self.heads}, topk={self.topk}, "
                f"key_dim={self.key_dim}, query_norm={self.query_norm_kind!r}")

    # ------------------------------------------------------------------ retrieval
    def query(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised queries of every head: [..., heads, key_dim]."""
        lead = x.shape[:-1]
        return self._query(check_dim(x, self.dim, like=self.query_proj.weight)).view(*lead, self.heads, self.key_dim)

    def _query(self, xf: torch.Tensor) -> torch.Tensor:
        q = self.query_proj(xf)  # [T, h*key_dim]
        if self.query_norm_kind == "batchnorm":
            q = _bn_single(self.query_norm, q) if (self.training and q.shape[0] == 1) else self.query_norm(q)
            return q.view(-1, self.heads, self.key_dim)
        return self.query_norm(q.view(-1, self.heads, self.key_dim))

    def retrieve(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Softmax weights and memory ids, each [..., heads, topk], best first."""
        lead = x.shape[:-1]
        w, idx = self._retrieve(check_dim(x, self.dim, like=self.query_proj.weight))
        return w.view(*lead, self.heads, self.topk), idx.view(*lead, self.heads, self.topk)

    def _retrieve(self, xf: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        q = self._query(xf)
        scores, idx = self.index.topk(q.to(torch.promote_types(q.dtype, torch.float32)), self.topk)  # exact top-k per head
        return scores.softmax(dim=-1), idx

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = check_dim(x, self.dim, like=self.query_proj.weight)
        w, idx = self._retrieve(xf)  # [T, h, k]
        if self.record_usage:
            self._accumulate_usage(w, idx)
        # one bag of h*k weighted value rows per token
        y = F.embedding_bag(idx.flatten(1), self.values, per_sample_weights=w.flatten(1).to(self.values.dtype),
                            mode="sum")
        return y.view(*x.shape[:-1], self.dim)

    # ------------------------------------------------------------------ usage (Table 2)
    @torch.no_grad()
    def _accumulate_usage(self, w: torch.Tensor, idx: torch.Tensor) -> None:
        if self.usage.numel() != self.num_memories:
            self.usage = torch.zeros(self.num_memories, dtype=torch.float64, device=w.device)
        self.usage.index_add_(0, idx.flatten(), w.flatten().to(torch.float64))

    def reset_usage(self) -> None:
        self.usage = torch.zeros(self.num_memories, dtype=torch.float64, device=self.values.device)
