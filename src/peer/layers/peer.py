"""PEER: Parameter Efficient Expert Retrieval (He, 2024, arXiv:2407.04153), eqs. 1-7.

    f(x) = sum_{heads h} sum_{i in I_h(x)} g_i(x) e_i(x)                        (eqs. 3, 7)
    I_h(x) = top-k_i { q_h(x)^T k_i },  k_i = [c_a; c'_b]  (product keys)      (eqs. 1, 4, 5)
    g_i(x) = softmax or sigmoid of q_h(x)^T k_i over the k retrieved i          (eq. 2)
             (or ReLU, as Csordas et al. 2023 found better for PKM: g_i = max(0, q^T k_i))
    e_i(x) = act(u_i^T x) v_i                                                    (eq. 6)

Initialisation (keeps Var[y] ~ Var[x] ~ 1 at init for any N, h, k):
- query network: PyTorch's Linear default; BatchNorm then makes each query unit-variance;
- sub-keys ~ N(0, 1/key_dim), so a unit query scores ~N(0, 1) against a full key;
- u_i ~ N(0, 1/d): u_i . x ~ N(0, 1) for unit-variance x (and so does a GLU gate);
- v_i ~ N(0, 1/(h * S * E[act(z)^2])), z ~ N(0, 1), where S = sum_j g_j^2 over a head's top-k
  (1/k for softmax over near-equal top scores, k for sigmoid or ReLU of the top scores): each output
  coordinate is a sum of h*k terms g_j act_j v_j, whose variance is then ~1. ``value_init_scale``
  multiplies that std (the LM further scales v by 1/sqrt(2 n_layers); see peer.model).
"""

from __future__ import annotations

import itertools
import math
from typing import Any

import torch
from torch import nn

from peer.ops import expert_mix
from peer.ops.workspace import advise_hugepages

from .base import check_choice as _choice
from .base import check_positive_number
from .router import ProductKeyRouter

__all__ = ["PEER", "TABLES", "normal_rows_", "reset_expert_tables"]

TABLES = ("u", "v", "gate")  # the expert tables, in the order they are initialised

_ACTS = ("gelu", "relu")
_DTYPES = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    torch.float32: torch.float32,
    torch.bfloat16: torch.bfloat16,
}
# E[act(z)^2] for z ~ N(0, 1)
_ACT_SECOND_MOMENT = {"relu": 0.5, "gelu": 0.4252}


class PEER(ProductKeyRouter):
    """A PEER layer: ``num_experts`` single-neuron experts, retrieved ``topk`` per head by ``heads`` heads.

    Args:
        dim: model width d (input and output).
        num_experts: N, a perfect square (product keys need sqrt(N) sub-keys per half).
        heads: h query networks sharing one pool of experts (eq. 7).
        topk: k experts per head; at most sqrt(N).
        key_dim: query/key width (even: it splits in two halves).
        activation: "gelu" or "relu" (sigma of eq. 6).
        score: "softmax" (paper default), "sigmoid" or "relu" router scores over each head's top-k (eq. 2).
        query_norm: "batchnorm" (paper), "layernorm" or "none".
        shared_keys: one set of product keys for all heads (paper); False gives each head its own.
        glu: GLU experts: ``act(w_i . x) * (u_i . x) * v_i`` with an extra gate table w.
        backend: "auto", "reference", "fused" or "triton"; see :mod:`peer.ops` (the expert mix and top-k).
        table_dtype: storage dtype of u, v (and gate): float32 or bfloat16 (accumulation stays fp32).
        value_init_scale: multiplies the init std of the output table v (default 1).
        sparse_grad: the tables' gradients are sparse COO rows (only the retrieved ones), as
            ``nn.Embedding(sparse=True)``; for a row-wise optimizer such as
            :class:`peer.train.sparse_optim.SparseRowAdamW`. Fused and triton backends only.
        rows: (lo, hi): the layer holds rows [lo, hi) of its expert tables, initialised as the full
            layer's (an expert-parallel rank: :class:`peer.distributed.ExpertShardedPEER`); default all.
    """

    supports_sparse_grad = True

    def __init__(
        self,
        dim: int,
        num_experts: int = 1024**2,
        heads: int = 8,
        topk: int = 16,
        key_dim: int = 128,
        activation: str = "gelu",
        score: str = "softmax",
        query_norm: str = "batchnorm",
        shared_keys: bool = True,
        glu: bool = False,
        backend: str = "auto",
        table_dtype: str | torch.dtype = "float32",
        value_init_scale: float = 1.0,
        sparse_grad: bool = False,
        rows: tuple[int, int] | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        _choice(activation, _ACTS, "activation")
        if table_dtype not in _DTYPES:
            raise ValueError(f"table_dtype must be one of 'float32', 'bfloat16', got {table_dtype!r}")
        check_positive_number(value_init_scale, "value_init_scale")
        lo, hi = (0, num_experts) if rows is None else rows
        if not (isinstance(lo, int) and isinstance(hi, int) and 0 <= lo <= hi <= num_experts):
            raise ValueError(
                f"rows must be a range (lo, hi) with 0 <= lo <= hi <= num_experts={num_experts}, got {rows!r}"
            )
        # eqs. 1, 2, 4, 5, 7: h query networks, their norm, product keys shared by all heads (or one
        # set per head), router scores, usage accounting (peer.layers.router)
        super().__init__(
            dim,
            num_experts,
            heads,
            topk,
            key_dim,
            query_norm,
            1 if shared_keys else heads,
            score,
            backend,
            device=device,
            dtype=dtype,
        )
        self.activation = activation
        self.num_experts = num_experts
        self.shared_keys, self.glu = bool(shared_keys), bool(glu)
        self.sparse_grad = bool(sparse_grad)
        self.value_init_scale = float(value_init_scale)
        self.rows = (lo, hi)  # the rows of the expert tables this layer holds (all, unless expert-sharded)
        tdtype = _DTYPES[table_dtype]
        # eq. 6: expert i is the neuron (u_i, v_i); GLU adds a gate vector per expert
        s = (1.0 / topk) if score == "softmax" else float(topk)
        v_std = value_init_scale / math.sqrt(heads * s * _ACT_SECOND_MOMENT[activation])
        self.table_stds = {"u": 1.0 / math.sqrt(dim), "v": v_std, "gate": 1.0 / math.sqrt(dim)}  # init std of each
        self.u = nn.Parameter(_table(hi - lo, dim, tdtype, device))
        self.v = nn.Parameter(_table(hi - lo, dim, tdtype, device))
        self.gate = nn.Parameter(_table(hi - lo, dim, tdtype, device)) if glu else None
        reset_expert_tables(self, start=lo)

    # ------------------------------------------------------------------ public API
    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, num_experts={self.num_experts}, heads={self.heads}, topk={self.topk}, "
            f"key_dim={self.key_dim}, activation={self.activation!r}, score={self.score!r}, "
            f"query_norm={self.query_norm_kind!r}, shared_keys={self.shared_keys}, glu={self.glu}"
            + (", sparse_grad=True" if self.sparse_grad else "")
        )

    @torch.no_grad()
    def reset_parameters(self, pool: bool = True) -> None:
        """Initialise every parameter again exactly as the constructor did: the same draws from the
        default generator in the same order, so ``torch.manual_seed(s)`` then a layer built on the
        ``meta`` device, ``to_empty()`` and ``reset_parameters()`` equals a layer built eagerly after
        ``torch.manual_seed(s)``. ``pool=False`` draws but does not write the expert pool (keys and
        tables), for a layer whose pool is shared with an earlier one."""
        self._reset_router(pool)
        reset_expert_tables(self, pool, self.rows[0])

    def expert_parameters(self) -> list[nn.Parameter]:
        """The expert tables (u, v, and the GLU gate): the optimizer's ``experts`` group."""
        return [p for p in (self.u, self.v, self.gate) if p is not None]

    def residual_table(self) -> torch.Tensor:
        """The output table v (eq. 6): the LM scales it by 1/sqrt(2 n_layers) at init."""
        return self.v

    def pool_names(self) -> tuple[str, ...]:
        return ("u", "v", "gate", "index")

    def peer_kwargs(self) -> dict[str, Any]:
        """The constructor arguments of this layer (``rows`` left out: the full layer's)."""
        return dict(
            dim=self.dim,
            num_experts=self.num_experts,
            heads=self.heads,
            topk=self.topk,
            key_dim=self.key_dim,
            activation=self.activation,
            score=self.score,
            query_norm=self.query_norm_kind,
            shared_keys=self.shared_keys,
            glu=self.glu,
            backend=self.backend,
            table_dtype=self.u.dtype,
            value_init_scale=self.value_init_scale,
            sparse_grad=self.sparse_grad,
        )

    def forward_with_aux(self, x: torch.Tensor) -> tuple[torch.Tensor, None]:
        """f(x) of eqs. 3, 7; PEER has no auxiliary loss."""
        if self.rows != (0, self.num_experts):
            raise ValueError(
                f"this PEER holds rows {self.rows} of {self.num_experts}: an expert-sharded layer "
                "mixes with peer.distributed.ExpertShardedPEER"
            )
        lead = x.shape[:-1]
        xf = self._flat(x)
        g, idx = self._retrieve(xf)  # [T, h, k]
        if self.record_usage:
            self._accumulate_usage(g, idx)
        # eqs. 3, 6, 7: sum over heads and their top-k of g_i * act(u_i . x) * v_i
        y = expert_mix(
            xf,
            self.u,
            self.v,
            idx.flatten(1),
            g.flatten(1).to(xf.dtype),
            self.activation,
            self.gate,
            backend=self.backend,
            sparse_grad=self.sparse_grad,
        )
        return y.view(*lead, self.dim), None


def _table(rows: int, cols: int, dtype: torch.dtype, device: torch.device | str | None = None) -> torch.Tensor:
    """An uninitialised expert table (filled in place by :func:`reset_expert_tables`: no temporaries,
    a 1M x 512 table is 2 GB)."""
    t = torch.empty(rows, cols, dtype=dtype, device=device)
    advise_hugepages(t)  # 2 MB pages: faster random row reads (fewer TLB misses), cheaper first touch
    return t


def reset_expert_tables(layer: PEER, pool: bool = True, start: int = 0) -> None:
    """Draw ``layer``'s tables (u, v, gate) as its constructor did, each an N(0, table_stds[name]^2)
    [num_experts, dim] table; a table holding rows [start, start + n) of it (an expert-sharded layer)
    keeps those rows. ``pool=False`` draws without writing."""
    for name in TABLES:
        t: torch.Tensor | None = getattr(layer, name)
        if t is not None:
            normal_rows_(t if pool else None, layer.table_stds[name], start, layer.num_experts, layer.dim, t.dtype)


_CHUNK_VALUES = 1 << 22  # values drawn per chunk by normal_rows_ (16 MB of fp32)


@torch.no_grad()
def normal_rows_(
    out: torch.Tensor | None, std: float, start: int, rows: int, cols: int, dtype: torch.dtype | None = None
) -> None:
    """Fill ``out`` [n, cols] with rows [start, start + n) of the N(0, std^2) [rows, cols] table that one
    ``normal_`` call would draw from the default generator, without materialising the whole table: it
    is drawn in chunks of rows. (The CPU ``normal_`` consumes the generator in order, so chunks whose
    sizes are multiples of 16 values give the same numbers as one call; tested.) ``out=None`` only
    draws, keeping the generator where the whole table would leave it. An expert-parallel rank
    initialises its rows of a table this way, equal to the unsharded layer's."""
    n = 0 if out is None else out.shape[0]
    if out is not None and start == 0 and n == rows:
        out.normal_(0.0, std)
        return
    chunk = max(16, _CHUNK_VALUES // max(cols, 1) // 16 * 16)
    bounds = list(range(0, rows, chunk)) + [rows]
    if len(bounds) > 2 and (bounds[-1] - bounds[-2]) * cols < 16:
        del bounds[-2]  # a last chunk of < 16 values would take normal_'s scalar path: merge it
    device = out.device if out is not None else None
    size = max(e - s for s, e in itertools.pairwise(bounds))
    buf = torch.empty(size, cols, dtype=dtype if out is None else out.dtype, device=device)
    for s, e in itertools.pairwise(bounds):
        b = buf[: e - s].normal_(0.0, std)
        lo, hi = max(s, start), min(e, start + n)
        if out is not None and lo < hi:
            out[lo - start : hi - start].copy_(b[lo - s : hi - s])
