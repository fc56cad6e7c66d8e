"""The product-key router shared by PEER, PKM and the expert-sharded PEER (paper eqs. 1, 2, 4, 5, 7).

    q_h(x) = norm(W_h x)                                 (eq. 7: h query networks, one projection)
    I_h(x) = top-k_i { q_h(x)^T k_i },  k_i = [c_a; c'_b]  (eqs. 1, 4, 5: exact, product keys)
    g_i(x) = softmax (or sigmoid, ReLU) of the k scores   (eq. 2)

:class:`ProductKeyRouter` is the base class of the product-key layers (a
:class:`~peer.layers.base.SparseFeedForward`): its constructor builds ``query_proj``, ``query_norm`` and
``index`` (parameter names stay ``<layer>.query_proj``, ``<layer>.index.keys``), and it gives its
subclasses query, retrieval, ``key_parameters()`` and the usage accounting of the paper's Table 2
(``record_usage``, ``usage``, ``reset_usage()``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from peer import ops

from .base import SparseFeedForward, check_dim, check_positive_int
from .base import check_choice as _choice
from .index import ProductKeyIndex, check_product_keys

__all__ = ["ProductKeyRouter", "QueryBatchNorm", "make_query_norm", "SCORES", "QUERY_NORMS"]

SCORES = ("softmax", "sigmoid", "relu")
QUERY_NORMS = ("batchnorm", "layernorm", "none")


class QueryBatchNorm(nn.BatchNorm1d):
    """``nn.BatchNorm1d`` whose running statistics never take a non-finite value: a training batch
    with a NaN/inf token leaves them as they were (its own output is still NaN, so the loss shows
    it), and later evaluation is not poisoned. Branch-free (``torch.where``), same state dict.

    The batch updates copies of the running statistics (autograd keeps those), which are then
    written back only where finite."""

    running_mean: torch.Tensor  # tracked statistics (track_running_stats=True)
    running_var: torch.Tensor
    num_batches_tracked: torch.Tensor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and self.track_running_stats):
            return super().forward(x)
        mean, var = self.running_mean.clone(), self.running_var.clone()
        if self.momentum is None:  # cumulative moving average, as nn.BatchNorm1d
            factor = 1.0 / float(self.num_batches_tracked.item() + 1)
        else:
            factor = self.momentum
        y = F.batch_norm(x, mean, var, self.weight, self.bias, True, factor, self.eps)
        with torch.no_grad():
            ok = torch.isfinite(mean).all() & torch.isfinite(var).all()
            self.running_mean.copy_(torch.where(ok, mean, self.running_mean))
            self.running_var.copy_(torch.where(ok, var, self.running_var))
            self.num_batches_tracked.add_(ok.long())
        return y


def make_query_norm(
    kind: str, heads: int, key_dim: int, device: torch.device | str | None = None, dtype: torch.dtype | None = None
) -> nn.Module:
    """The query normaliser: BatchNorm over all h*key_dim features (paper), per-head LayerNorm, or identity."""
    _choice(kind, QUERY_NORMS, "query_norm")
    if kind == "batchnorm":
        return QueryBatchNorm(heads * key_dim, device=device, dtype=dtype)
    if kind == "layernorm":
        return nn.LayerNorm(key_dim, device=device, dtype=dtype)
    return nn.Identity()


def _bn_single(bn: nn.BatchNorm1d, q: torch.Tensor) -> torch.Tensor:
    """BatchNorm on a single token in training mode has no batch statistics: use the running ones."""
    return F.batch_norm(q, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps)


class ProductKeyRouter(SparseFeedForward):
    """Query networks + query norm + product-key index + router scores + usage accounting.

    Args:
        dim: model width d (the queries' input).
        num_keys: N, the number of product keys (a perfect square).
        heads: h query networks.
        topk: k keys retrieved per head (at most sqrt(N)).
        key_dim: query/key width (even).
        query_norm: "batchnorm" (paper), "layernorm" or "none".
        key_groups: 1 (every head searches the same keys) or ``heads`` (a key set per head).
        score: "softmax", "sigmoid" or "relu" of the retrieved scores (eq. 2).
        backend: "reference" makes retrieval plain PyTorch; the others take the C++ top-k where it applies.
        keys_name: what N is called in error messages ("num_experts", "num_memories").
    """

    def __init__(
        self,
        dim: int,
        num_keys: int,
        heads: int,
        topk: int,
        key_dim: int,
        query_norm: str = "batchnorm",
        key_groups: int = 1,
        score: str = "softmax",
        backend: str = "auto",
        keys_name: str = "num_experts",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        check_positive_int(dim, "dim")
        check_product_keys(num_keys, key_dim, topk, heads, keys_name=keys_name)
        self.score = _choice(score, SCORES, "score")
        self.backend = _choice(backend, ops.BACKENDS, "backend")
        self.dim, self.heads, self.topk, self.key_dim = dim, heads, topk, key_dim
        self.query_norm_kind = query_norm
        self.query_proj = nn.Linear(dim, heads * key_dim, bias=False, device=device, dtype=dtype)  # eq. 7
        self.query_norm = make_query_norm(query_norm, heads, key_dim, device=device, dtype=dtype)
        self.index = ProductKeyIndex(num_keys, key_dim, key_groups, keys_name, device, dtype)  # eqs. 4-5
        ops.load_kernels(self.backend)  # built/loaded now, not inside a (traced) forward
        self.record_usage = False  # usage accounting (paper Table 2), off by default
        # a frozen query norm normalises with its running statistics in training too, and never updates
        # them (fine-tuning only the expert tables: retrieval must stay what it was)
        self.query_norm_frozen = False
        self.register_buffer("usage", torch.zeros(0, dtype=torch.float64, device=device), persistent=False)

    def _reset_router(self, pool: bool = True) -> None:
        """Re-initialise the query network, its norm and the keys as the constructor did (same draws
        from the generator, same order); ``pool=False`` draws the keys but keeps them (a shared pool)."""
        self.query_proj.reset_parameters()
        if isinstance(self.query_norm, (nn.BatchNorm1d, nn.LayerNorm)):
            self.query_norm.reset_parameters()
        self.index.reset_parameters(write=pool)
        self.usage = torch.zeros(0, dtype=torch.float64, device=self.query_proj.weight.device)

    def key_parameters(self) -> list[nn.Parameter]:
        """The product sub-keys: the optimizer's ``keys`` group."""
        return [self.index.keys]

    def product_keys(self) -> torch.Tensor:
        """All N full keys: [groups, N, key_dim] (groups 1 with shared keys, else heads). Row i = key i."""
        return self.index.full_keys()

    def _flat(self, x: torch.Tensor) -> torch.Tensor:
        return check_dim(x, self.dim, like=self.query_proj.weight)

    def query(self, x: torch.Tensor) -> torch.Tensor:
        """q(x) of eq. 1 for every head, after the query norm: [..., heads, key_dim]."""
        lead = x.shape[:-1]
        return self._query(self._flat(x)).view(*lead, self.heads, self.key_dim)

    def _query(self, xf: torch.Tensor) -> torch.Tensor:
        q = self.query_proj(xf)  # [T, h*key_dim]
        if self.query_norm_kind == "batchnorm":
            # one token in training mode has no batch statistics, and a frozen norm keeps its own: use
            # the running statistics
            bn = self.query_norm
            assert isinstance(bn, nn.BatchNorm1d)
            q = _bn_single(bn, q) if (self.training and (q.shape[0] == 1 or self.query_norm_frozen)) else bn(q)
            return q.view(-1, self.heads, self.key_dim)
        out: torch.Tensor = self.query_norm(q.view(-1, self.heads, self.key_dim))
        return out

    def retrieve(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Router weights g and ids, each [..., heads, topk], best first (eqs. 1, 2, 4, 5)."""
        lead = x.shape[:-1]
        g, idx = self._retrieve(self._flat(x))
        return g.view(*lead, self.heads, self.topk), idx.view(*lead, self.heads, self.topk)

    def _retrieve(self, xf: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        q = self._query(xf)
        # eqs. 1, 4, 5: exact top-k over N keys, in at least float32 (bf16 would pick other experts)
        q = q.to(torch.promote_types(q.dtype, torch.float32))
        scores, idx = self.index.topk(q, self.topk, backend=self.backend)
        if self.score == "softmax":  # eq. 2, per head
            return scores.softmax(dim=-1), idx
        return (scores.sigmoid() if self.score == "sigmoid" else scores.relu()), idx

    @torch.no_grad()
    def _accumulate_usage(self, g: torch.Tensor, idx: torch.Tensor) -> None:
        n = self.index.num_keys
        if self.usage.numel() != n:
            self.usage = torch.zeros(n, dtype=torch.float64, device=g.device)
        self.usage.index_add_(0, idx.flatten(), g.flatten().to(torch.float64))

    def reset_usage(self) -> None:
        self.usage = torch.zeros(self.index.num_keys, dtype=torch.float64, device=self.index.keys.device)
