"""The torch engine of the fused expert mix: the kernels' algorithm in plain PyTorch, for the dtypes and
devices the C++ and Triton engines do not cover (float64, CUDA without triton) and for
``PEER_NO_CPP_KERNEL=1``. Table rows are gathered a chunk of tokens at a time into one reused
buffer (never the whole [T, m, d]); same interface as :mod:`.cpu` and :mod:`.triton`.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["forward", "backward", "sort_pairs", "table_grads"]

# table rows gathered per chunk of tokens (4096 rows of d=512 fp32 = 8 MB)
CHUNK_ROWS = 4096


def _act(h: torch.Tensor, activation: str) -> torch.Tensor:
    return F.gelu(h) if activation == "gelu" else F.relu(h)


def _act_backward(grad: torch.Tensor, h: torch.Tensor, activation: str) -> torch.Tensor:
    """grad * act'(h), exactly as autograd computes it."""
    if activation == "gelu":
        out: torch.Tensor = torch.ops.aten.gelu_backward(grad, h)
    else:
        out = torch.ops.aten.threshold_backward(grad, h, 0)
    return out


class _Gather:
    """Gathers table rows into one reused buffer, widened to the compute dtype."""

    def __init__(self, x: torch.Tensor, m: int, table_dtype: torch.dtype) -> None:
        self.tokens = min(x.shape[0], max(1, CHUNK_ROWS // max(m, 1)))
        rows, d = self.tokens * m, x.shape[1]
        self.raw = torch.empty(rows, d, dtype=table_dtype, device=x.device)
        self.out = self.raw if table_dtype == x.dtype else torch.empty(rows, d, dtype=x.dtype, device=x.device)

    def chunks(self, T: int) -> Iterator[tuple[int, int]]:
        for s in range(0, T, self.tokens):
            yield s, min(s + self.tokens, T)

    def __call__(self, table: torch.Tensor, ids: torch.Tensor, n: int) -> torch.Tensor:
        raw = torch.index_select(table, 0, ids, out=self.raw[: ids.numel()])
        out = raw if self.out is self.raw else self.out[: ids.numel()].copy_(raw)
        return out.view(n, -1, raw.shape[1])  # [n tokens, m, d]


def forward(
    x: Tensor,
    g: Tensor,
    idx: Tensor,
    u: Tensor,
    v: Tensor,
    gate: Tensor | None,
    y: Tensor,
    h: Tensor,
    hg: Tensor | None,
    gelu: bool,
) -> None:
    """Forward by chunks of tokens: h = u_i . x, a = act(h), y = sum_j g a v_i as batched mat-vecs."""
    activation = "gelu" if gelu else "relu"
    buf = _Gather(x, idx.shape[1], u.dtype)
    for s, e in buf.chunks(x.shape[0]):
        n, ids, xc = e - s, idx[s:e].reshape(-1), x[s:e, :, None]
        torch.bmm(buf(u, ids, n), xc, out=h[s:e, :, None])
        if gate is not None and hg is not None:
            torch.bmm(buf(gate, ids, n), xc, out=hg[s:e, :, None])
            a = _act(hg[s:e], activation) * h[s:e]
        else:
            a = _act(h[s:e], activation)
        torch.bmm((g[s:e] * a)[:, None, :], buf(v, ids, n), out=y[s:e, None, :])


def backward(
    x: Tensor,
    dy: Tensor,
    g: Tensor,
    idx: Tensor,
    u: Tensor,
    v: Tensor,
    gate: Tensor | None,
    h: Tensor,
    hg: Tensor | None,
    dx: Tensor | None,
    dg: Tensor,
    coef_u: Tensor,
    coef_v: Tensor,
    coef_w: Tensor | None,
    gelu: bool,
) -> None:
    """Backward by chunks of tokens: dx, dg and the per-pair coefficients of the table gradients."""
    act = "gelu" if gelu else "relu"
    buf = _Gather(x, idx.shape[1], u.dtype)
    for s, e in buf.chunks(x.shape[0]):
        n, ids = e - s, idx[s:e].reshape(-1)
        dA = torch.bmm(buf(v, ids, n), dy[s:e, :, None]).squeeze(-1)  # dy . v_i
        gc, hc = g[s:e], h[s:e]
        if gate is not None and hg is not None and coef_w is not None:
            ag = _act(hg[s:e], act)
            a = ag * hc
            coef_u[s:e] = dA * gc * ag
            coef_w[s:e] = _act_backward(dA * gc * hc, hg[s:e], act)
        else:
            a = _act(hc, act)
            coef_u[s:e] = _act_backward(dA * gc, hc, act)
        dg[s:e] = dA * a
        coef_v[s:e] = gc * a
        if dx is not None:
            torch.bmm(coef_u[s:e, None, :], buf(u, ids, n), out=dx[s:e, None, :])
            if gate is not None and coef_w is not None:
                dx[s:e] += torch.bmm(coef_w[s:e, None, :], buf(gate, ids, n)).squeeze(1)


def sort_pairs(idx: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Group the (token, slot) pairs of idx [T, m] by expert.

    Returns (rows [U] distinct experts ascending, perm [T*m] pair ids in expert order,
    offsets [U + 1]: the pairs of rows[r] are perm[offsets[r]:offsets[r + 1]])."""
    sorted_ids, perm = torch.sort(idx.reshape(-1))
    rows, counts = torch.unique_consecutive(sorted_ids, return_counts=True)
    offsets = counts.new_zeros(counts.numel() + 1)
    torch.cumsum(counts, 0, out=offsets[1:])
    return rows, perm, offsets


def table_grads(
    perm: Tensor,
    offsets: Tensor,
    m: int,
    triples: Sequence[tuple[Tensor, Tensor, Tensor] | None],
    out_rows: Tensor | None = None,
) -> None:
    """For each (src [T, d], coef [T, m], out): out[r] (or out[out_rows[r]]) = sum over bag r of
    coef[pair] * src[pair // m]; bag r is perm[offsets[r]:offsets[r + 1]]."""
    for t in triples:
        if t is None:
            continue
        src, coef, out = t
        block = F.embedding_bag(perm // m, src, offsets[:-1], mode="sum", per_sample_weights=coef.reshape(-1)[perm])
        if out_rows is None:
            out.copy_(block)
        else:
            out.index_copy_(0, out_rows, block.to(out.dtype))
