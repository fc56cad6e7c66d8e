"""The fused expert mix as ``torch.library`` custom ops; it never builds the gathered [T, m, d] rows.

    y[t] = sum_j g[t, j] * a[t, j] * v[i_tj],   a[t, j] = act(u[i_tj] . x[t])        (eqs. 3, 6, 7)
    GLU experts: a[t, j] = act(w[i_tj] . x[t]) * (u[i_tj] . x[t])   (w is the ``gate`` table)

Ops (visible to ``torch.compile``, FakeTensor and ``torch.library.opcheck``):
    peer::expert_mix(x, g, idx, u, v, gate, activation, engine, sparse_grad) -> (y, h, hg)
    peer::expert_mix_backward(...)      -> (dx, dg, du, dv, dgate)          dense [N, d] table grads
    peer::expert_mix_backward_rows(...) -> (dx, dg, rows, du, dv, dgate)    the U retrieved rows only
with autograd registered on the first (``h`` and ``hg`` are saved for the backward and are not
differentiable). ``engine`` names who computes: "cpp" (:mod:`.cpu`), "triton" (:mod:`.triton`) or
"torch" (:mod:`.torch_engine`); :func:`peer.ops.expert_mix` chooses it.

Forward: each retrieved row is read once from the table and used in place. Only h = u_i . x
([T, m]) is saved for the backward.

Backward (recomputes a from h; reads each retrieved row of u and v once more):
    dA[t, j] = dy[t] . v[i_tj]             dg[t, j] = dA * a          dh[t, j] = dA * g * act'(h)
    dx[t]    = sum_j dh[t, j] * u[i_tj]    (GLU adds its gate term)
    grad u_i = sum_{(t, j): i_tj = i} dh[t, j] * x[t]        grad v_i = sum_{(t, j): i_tj = i} g a * dy[t]
The table gradients touch only the U distinct retrieved rows: the (t, j) pairs are sorted by
expert id (one bag per expert, so duplicates, e.g. two heads of a token picking the same expert,
simply add up) and each bag sums x[t] (or dy[t]) with the per-pair coefficients.

The gradient of a table is dense ([N, d], what torch.optim expects; zero except the U rows) or,
with ``sparse_grad=True`` (the layer's ``sparse_grad``, as ``nn.Embedding(sparse=True)``), a
coalesced sparse COO tensor of the U rows, which a row-wise optimizer
(:class:`peer.train.sparse_optim.SparseRowAdamW`) consumes without touching the other N - U rows. Gradient buffers are
recycled (see :mod:`.workspace`): a new one is made only while the previous one is still held.

Tables may be bfloat16: rows are widened to x's dtype as they are read, so with fp32 x every
product and sum accumulates in fp32; the table gradients are rounded to bf16 at the end.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol, cast

import torch
from torch import Tensor

from peer.errors import check_values

from . import cpu, torch_engine
from . import triton as triton_engine
from .workspace import WORKSPACE

__all__ = ["fused_mix", "ENGINES", "MixEngine"]

Triples = Sequence[tuple[Tensor, Tensor, Tensor] | None]


class MixEngine(Protocol):
    """What an engine of the fused expert mix provides (:mod:`peer.ops.cpu`, :mod:`peer.ops.torch_engine`,
    :mod:`peer.ops.triton`, each a module with these functions; mypy checks each against this)."""

    def forward(
        self,
        x: Tensor,
        g: Tensor,
        idx: Tensor,
        u: Tensor,
        v: Tensor,
        w: Tensor | None,
        y: Tensor,
        h: Tensor,
        hg: Tensor | None,
        gelu: bool,
        /,
    ) -> None: ...

    def backward(
        self,
        x: Tensor,
        dy: Tensor,
        g: Tensor,
        idx: Tensor,
        u: Tensor,
        v: Tensor,
        w: Tensor | None,
        h: Tensor,
        hg: Tensor | None,
        dx: Tensor | None,
        dg: Tensor,
        cu: Tensor,
        cv: Tensor,
        cw: Tensor | None,
        gelu: bool,
        /,
    ) -> None: ...

    def sort_pairs(self, idx: Tensor, num_experts: int, /) -> tuple[Tensor, Tensor, Tensor]: ...

    def table_grads(
        self, perm: Tensor, offsets: Tensor, m: int, triples: Triples, out_rows: Tensor | None = None, /
    ) -> None: ...


ENGINES: dict[str, MixEngine] = {"cpp": cpu, "torch": torch_engine, "triton": triton_engine}
_EMPTY = (0,)


def fused_mix(
    x: Tensor,
    u: Tensor,
    v: Tensor,
    idx: Tensor,
    g: Tensor,
    activation: str = "gelu",
    gate: Tensor | None = None,
    sparse_grad: bool = False,
    engine: str = "torch",
) -> Tensor:
    """y[t] = sum_j g[t, j] * act(u[idx[t, j]] . x[t]) * v[idx[t, j]] by ``engine``; the reference's contract."""
    if x.dim() != 2 or idx.dim() != 2 or g.shape != idx.shape or x.shape[0] != idx.shape[0]:
        raise ValueError(
            f"expert_mix: need x [T, d], idx and g [T, m]; got x {tuple(x.shape)}, "
            f"idx {tuple(idx.shape)}, g {tuple(g.shape)}"
        )
    if activation not in ("gelu", "relu"):
        raise ValueError(f"activation must be 'gelu' or 'relu', got {activation!r}")
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {sorted(ENGINES)}, got {engine!r}")
    for name, t in (("u", u), ("v", v), ("gate", gate)):
        if t is not None and (t.dim() != 2 or t.shape != u.shape or t.shape[1] != x.shape[1]):
            raise ValueError(f"expert_mix: table {name} must be [N, d={x.shape[1]}] like u, got {tuple(t.shape)}")
    y, _, _ = torch.ops.peer.expert_mix(
        x.contiguous(),
        g.to(x.dtype).contiguous(),
        idx.long().contiguous(),
        u,
        v,
        gate,
        activation,
        engine,
        bool(sparse_grad),
    )
    return cast(Tensor, y)


def _check_ids(idx: Tensor, n: int) -> None:
    """The kernels read rows by these ids unchecked (runs in the op, so also under torch.compile);
    no host sync (:func:`peer.errors.check_values`)."""
    if idx.numel():
        lo, hi = torch.aminmax(idx)
        check_values(
            (lo >= 0) & (hi < n), f"expert_mix: idx must lie in [0, {n})", lambda: f", got [{int(lo)}, {int(hi)}]"
        )


# ------------------------------------------------------------------------------ forward
@torch.library.custom_op("peer::expert_mix", mutates_args=())
def _expert_mix(
    x: Tensor,
    g: Tensor,
    idx: Tensor,
    u: Tensor,
    v: Tensor,
    gate: Tensor | None,
    activation: str,
    engine: str,
    sparse_grad: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    _check_ids(idx, u.shape[0])
    T, d = x.shape
    m = idx.shape[1]
    y, h = x.new_empty(T, d), x.new_empty(T, m)
    hg = x.new_empty(T, m) if gate is not None else x.new_empty(_EMPTY)
    ENGINES[engine].forward(x, g, idx, u, v, gate, y, h, hg if gate is not None else None, activation == "gelu")
    return y, h, hg


@_expert_mix.register_fake
def _(
    x: Tensor,
    g: Tensor,
    idx: Tensor,
    u: Tensor,
    v: Tensor,
    gate: Tensor | None,
    activation: str,
    engine: str,
    sparse_grad: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    T, d = x.shape
    m = idx.shape[1]
    return x.new_empty(T, d), x.new_empty(T, m), x.new_empty((T, m) if gate is not None else _EMPTY)


# ------------------------------------------------------------------------------ backward
def _coefficients(
    dy: Tensor,
    x: Tensor,
    g: Tensor,
    idx: Tensor,
    u: Tensor,
    v: Tensor,
    gate: Tensor | None,
    h: Tensor,
    hg: Tensor,
    activation: str,
    engine: str,
    need_x: bool,
    need_u: bool,
    need_v: bool,
    need_gate: bool,
) -> tuple[Tensor | None, Tensor, tuple[Tensor, Tensor, Tensor], list[tuple[Tensor, Tensor] | None]]:
    """dx (None unless need_x), dg, the three tables (u, v, gate; u standing in for an absent gate)
    and, per table, the (src [T, d], coef [T, m]) of its gradient, or None when not wanted."""
    T, d = x.shape
    m = idx.shape[1]
    dx = x.new_empty(T, d) if need_x else None
    dg = x.new_empty(T, m)
    coef_u = x.new_empty(T, m)  # d loss / d (u_i . x)
    coef_v = x.new_empty(T, m)  # g * a: the weight of dy in grad v_i
    coef_w = x.new_empty(T, m) if gate is not None else None  # d loss / d (w_i . x)
    ENGINES[engine].backward(
        x,
        dy,
        g,
        idx,
        u,
        v,
        gate,
        h,
        hg if gate is not None else None,
        dx,
        dg,
        coef_u,
        coef_v,
        coef_w,
        activation == "gelu",
    )
    srcs: list[tuple[Tensor, Tensor] | None] = [(x, coef_u), (dy, coef_v), (x, coef_w) if coef_w is not None else None]
    wanted = [w if need else None for w, need in zip(srcs, (need_u, need_v, need_gate), strict=True)]
    return dx, dg, (u, v, gate if gate is not None else u), wanted


def _block(
    eng: MixEngine, table: Tensor, src: Tensor, coef: Tensor, perm: Tensor, offsets: Tensor, m: int, rows: Tensor
) -> Tensor:
    """Gradient rows [U, d] of ``table`` (in src's dtype) in a recycled buffer."""
    block: Tensor = WORKSPACE.take(table, "block", (rows.numel(), src.shape[1]), src.dtype, slack=1.1)
    eng.table_grads(perm, offsets, m, [(src, coef, block)])
    return block


def _dense_grads(
    eng: MixEngine, tables: Sequence[Tensor], wanted: Sequence[tuple[Tensor, Tensor] | None], idx: Tensor
) -> list[Tensor | None]:
    """Dense [N, d] gradients (recycled buffers, zero except the retrieved rows) of the wanted tables."""
    out: list[Tensor | None] = [None] * len(tables)
    if all(w is None for w in wanted):
        return out
    m = idx.shape[1]
    if eng is triton_engine:  # no host sync on the GPU: never asks how many distinct rows there are
        dense = {
            k: WORKSPACE.take(t, "dense", t.shape, t.dtype, zero=True)
            for k, (t, w) in enumerate(zip(tables, wanted, strict=True))
            if w is not None
        }
        triton_engine.dense_table_grads(
            idx, m, [None if w is None else (w[0], w[1], dense[k]) for k, w in enumerate(wanted)]
        )
        return [dense.get(k) for k in range(len(tables))]
    rows, perm, offsets = eng.sort_pairs(idx, tables[0].shape[0])
    for k, (table, w) in enumerate(zip(tables, wanted, strict=True)):
        if w is None:
            continue
        grad = WORKSPACE.take(table, "dense", table.shape, table.dtype, zero=True)
        if table.dtype == w[0].dtype:  # rows straight into the dense gradient
            eng.table_grads(perm, offsets, m, [(w[0], w[1], grad)], rows)
        else:
            grad.index_copy_(0, rows, _block(eng, table, w[0], w[1], perm, offsets, m, rows).to(table.dtype))
        out[k] = grad
    return out


def _row_grads(
    eng: MixEngine, tables: Sequence[Tensor], wanted: Sequence[tuple[Tensor, Tensor] | None], idx: Tensor
) -> tuple[Tensor, list[Tensor | None]]:
    """(rows [U] ascending, then per table its gradient rows [U, d] in the table's dtype or None)."""
    m = idx.shape[1]
    rows, perm, offsets = eng.sort_pairs(idx, tables[0].shape[0])
    out: list[Tensor | None] = []
    for table, w in zip(tables, wanted, strict=True):
        if w is None:
            out.append(None)
            continue
        block = _block(eng, table, w[0], w[1], perm, offsets, m, rows)
        if block.dtype != table.dtype:
            block = WORKSPACE.take(table, "cast", block.shape, table.dtype, slack=1.1).copy_(block)
        out.append(block)
    return rows, out


def _or_empty(t: Tensor | None, like: Tensor) -> Tensor:
    return t if t is not None else like.new_empty(_EMPTY)


@torch.library.custom_op("peer::expert_mix_backward", mutates_args=())
def _expert_mix_backward(
    dy: Tensor,
    x: Tensor,
    g: Tensor,
    idx: Tensor,
    u: Tensor,
    v: Tensor,
    gate: Tensor | None,
    h: Tensor,
    hg: Tensor,
    activation: str,
    engine: str,
    need_x: bool,
    need_u: bool,
    need_v: bool,
    need_gate: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    dx, dg, tables, wanted = _coefficients(
        dy, x, g, idx, u, v, gate, h, hg, activation, engine, need_x, need_u, need_v, need_gate
    )
    grads = _dense_grads(ENGINES[engine], tables, wanted, idx)
    gu, gv, gw = (_or_empty(gr, t) for gr, t in zip(grads, tables, strict=True))
    return _or_empty(dx, x), dg, gu, gv, gw


@_expert_mix_backward.register_fake
def _(
    dy: Tensor,
    x: Tensor,
    g: Tensor,
    idx: Tensor,
    u: Tensor,
    v: Tensor,
    gate: Tensor | None,
    h: Tensor,
    hg: Tensor,
    activation: str,
    engine: str,
    need_x: bool,
    need_u: bool,
    need_v: bool,
    need_gate: bool,
) -> tuple[Tensor, ...]:
    tables = (u, v, gate if gate is not None else u)
    return (
        x.new_empty(x.shape if need_x else _EMPTY),
        x.new_empty(idx.shape),
        *(
            t.new_empty(t.shape if need else _EMPTY)
            for t, need in zip(tables, (need_u, need_v, need_gate), strict=True)
        ),
    )


@torch.library.custom_op("peer::expert_mix_backward_rows", mutates_args=())
def _expert_mix_backward_rows(
    dy: Tensor,
    x: Tensor,
    g: Tensor,
    idx: Tensor,
    u: Tensor,
    v: Tensor,
    gate: Tensor | None,
    h: Tensor,
    hg: Tensor,
    activation: str,
    engine: str,
    need_x: bool,
    need_u: bool,
    need_v: bool,
    need_gate: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    dx, dg, tables, wanted = _coefficients(
        dy, x, g, idx, u, v, gate, h, hg, activation, engine, need_x, need_u, need_v, need_gate
    )
    rows, blocks = _row_grads(ENGINES[engine], tables, wanted, idx)
    bu, bv, bw = (_or_empty(b, t) for b, t in zip(blocks, tables, strict=True))
    return _or_empty(dx, x), dg, rows, bu, bv, bw


@_expert_mix_backward_rows.register_fake
def _(
    dy: Tensor,
    x: Tensor,
    g: Tensor,
    idx: Tensor,
    u: Tensor,
    v: Tensor,
    gate: Tensor | None,
    h: Tensor,
    hg: Tensor,
    activation: str,
    engine: str,
    need_x: bool,
    need_u: bool,
    need_v: bool,
    need_gate: bool,
) -> tuple[Tensor, ...]:
    U = torch.library.get_ctx().new_dynamic_size()
    tables = (u, v, gate if gate is not None else u)
    return (
        x.new_empty(x.shape if need_x else _EMPTY),
        x.new_empty(idx.shape),
        idx.new_empty(U),
        *(
            t.new_empty((U, t.shape[1]) if need else _EMPTY)
            for t, need in zip(tables, (need_u, need_v, need_gate), strict=True)
        ),
    )


# ------------------------------------------------------------------------------ autograd
def _setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[Tensor, Tensor, Tensor]) -> None:
    x, g, idx, u, v, gate, activation, engine, sparse_grad = inputs
    _, h, hg = output
    ctx.mark_non_differentiable(h, hg)
    ctx.save_for_backward(x, g, idx, u, v, gate, h, hg)
    ctx.activation, ctx.engine, ctx.sparse_grad = activation, engine, sparse_grad


def _backward(ctx: Any, dy: Tensor, _dh: Tensor, _dhg: Tensor) -> tuple[Tensor | None, ...]:
    x, g, idx, u, v, gate, h, hg = ctx.saved_tensors
    need_x, need_g, _, need_u, need_v, need_gate = ctx.needs_input_grad[:6]
    need_gate = need_gate and gate is not None
    args = (
        dy.contiguous().to(x.dtype),
        x,
        g,
        idx,
        u,
        v,
        gate,
        h,
        hg,
        ctx.activation,
        ctx.engine,
        need_x,
        need_u,
        need_v,
        need_gate,
    )
    if ctx.sparse_grad and (need_u or need_v or need_gate):
        dx, dg, rows, *blocks = torch.ops.peer.expert_mix_backward_rows(*args)
        grads = [
            torch.sparse_coo_tensor(rows[None], b, t.shape, is_coalesced=True, check_invariants=False) if need else None
            for b, t, need in zip(blocks, (u, v, gate), (need_u, need_v, need_gate), strict=True)
        ]
    else:
        dx, dg, *dense = torch.ops.peer.expert_mix_backward(*args)
        grads = [gr if need else None for gr, need in zip(dense, (need_u, need_v, need_gate), strict=True)]
    return (dx if need_x else None, dg if need_g else None, None, *grads, None, None, None)


_expert_mix.register_autograd(_backward, setup_context=_setup_context)
