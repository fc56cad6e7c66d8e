"""The fused expert mix: a custom autograd Function that never builds the gathered [T, m, d] rows.

    y[t] = sum_j g[t, j] * a[t, j] * v[i_tj],   a[t, j] = act(u[i_tj] . x[t])        (eqs. 3, 6, 7)
    GLU experts: a[t, j] = act(w[i_tj] . x[t]) * (u[i_tj] . x[t])   (w is the ``gate`` table)

Forward: each retrieved row is read once from the table and used in place: by the C++ kernel
(``fused_cpu.cpp``, fp32 x, fp32/bf16 tables) or, without a compiler or for other dtypes and
devices, by a PyTorch path that gathers a chunk of tokens' rows into one reused buffer and runs
batched mat-vecs on it. Only h = u_i . x ([T, m]) is saved for the backward.

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

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from . import cpu_ext
from .workspace import WORKSPACE, advise_hugepages, empty_hugepage

__all__ = ["expert_mix", "advise_hugepages", "empty_hugepage", "WORKSPACE"]

# PyTorch path: table rows gathered per chunk of tokens (4096 rows of d=512 fp32 = 8 MB)
CHUNK_ROWS = 4096


def expert_mix(x, u, v, idx, g, activation="gelu", gate=None, sparse_grad=False):
    """y[t] = sum_j g[t, j] * act(u[idx[t, j]] . x[t]) * v[idx[t, j]]; the contract of the reference."""
    return mix(x, u, v, idx, g, activation, gate, engine="cpp" if _use_cpp(x, u, v, gate) else "torch",
               sparse_grad=sparse_grad)


def mix(x, u, v, idx, g, activation, gate, engine: str, sparse_grad: bool = False):
    """The fused expert mix computed by ``engine``: "cpp" (fused_cpu.cpp), "torch" or "triton"."""
    if x.dim() != 2 or idx.dim() != 2 or g.shape != idx.shape or x.shape[0] != idx.shape[0]:
        raise ValueError(f"expert_mix: need x [T, d], idx and g [T, m]; got x {tuple(x.shape)}, "
                         f"idx {tuple(idx.shape)}, g {tuple(g.shape)}")
    if activation not in ("gelu", "relu"):
        raise ValueError(f"activation must be 'gelu' or 'relu', got {activation!r}")
    for name, t in (("u", u), ("v", v), ("gate", gate)):
        if t is not None and (t.dim() != 2 or t.shape != u.shape or t.shape[1] != x.shape[1]):
            raise ValueError(f"expert_mix: table {name} must be [N, d={x.shape[1]}] like u, got {tuple(t.shape)}")
    idx = idx.long().contiguous()
    if idx.numel():  # the kernels read rows by these ids unchecked
        lo, hi = torch.aminmax(idx)
        if lo < 0 or hi >= u.shape[0]:
            raise ValueError(f"expert_mix: idx must lie in [0, {u.shape[0]}), got [{int(lo)}, {int(hi)}]")
    return _ExpertMix.apply(x.contiguous(), g.to(x.dtype).contiguous(), idx, u, v, gate, activation, engine,
                            bool(sparse_grad))


def _use_cpp(x, u, v, gate) -> bool:
    tables = [t for t in (u, v, gate) if t is not None]
    return (x.device.type == "cpu" and x.dtype == torch.float32 and cpu_ext.lib() is not None
            and all(t.device.type == "cpu" and t.dtype == u.dtype and t.is_contiguous() for t in tables)
            and u.dtype in (torch.float32, torch.bfloat16))


def _engine(name: str):
    if name == "triton":
        from . import triton_kernel

        return triton_kernel
    return cpu_ext if name == "cpp" else None


class _ExpertMix(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, g, idx, u, v, gate, activation, engine, sparse_grad):
        T, d = x.shape
        m = idx.shape[1]
        y, h = x.new_empty(T, d), x.new_empty(T, m)
        hg = x.new_empty(T, m) if gate is not None else None
        eng = _engine(engine)
        if eng is not None:
            eng.forward(x, g, idx, u, v, gate, y, h, hg, activation == "gelu")
        else:
            _forward_torch(x, g, idx, u, v, gate, activation, y, h, hg)
        ctx.activation, ctx.engine, ctx.sparse_grad = activation, engine, sparse_grad
        ctx.save_for_backward(x, g, idx, u, v, gate, h, hg)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        x, g, idx, u, v, gate, h, hg = ctx.saved_tensors
        need_x, need_g, _, need_u, need_v, need_gate, _, _, _ = ctx.needs_input_grad
        dy = dy.contiguous().to(x.dtype)
        T, d = x.shape
        m = idx.shape[1]
        dx = x.new_empty(T, d) if need_x else None
        dg = x.new_empty(T, m)
        coef_u = x.new_empty(T, m)  # d loss / d (u_i . x)
        coef_v = x.new_empty(T, m)  # g * a: the weight of dy in grad v_i
        coef_w = x.new_empty(T, m) if gate is not None else None  # d loss / d (w_i . x)
        eng = _engine(ctx.engine)
        if eng is not None:
            eng.backward(x, dy, g, idx, u, v, gate, h, hg, dx, dg, coef_u, coef_v, coef_w, ctx.activation == "gelu")
        else:
            _backward_torch(x, dy, g, idx, u, v, gate, h, hg, dx, dg, coef_u, coef_v, coef_w, ctx.activation)
        wanted = [(x, coef_u) if need_u else None, (dy, coef_v) if need_v else None,
                  (x, coef_w) if need_gate else None]
        grads = _table_grads((u, v, gate), wanted, idx, eng, ctx.sparse_grad)
        return dx, (dg if need_g else None), None, *grads, None, None, None


# ------------------------------------------------------------------------------ the PyTorch path
def _act(h: torch.Tensor, activation: str) -> torch.Tensor:
    return F.gelu(h) if activation == "gelu" else F.relu(h)


def _act_backward(grad: torch.Tensor, h: torch.Tensor, activation: str) -> torch.Tensor:
    """grad * act'(h), exactly as autograd computes it."""
    if activation == "gelu":
        return torch.ops.aten.gelu_backward(grad, h)
    return torch.ops.aten.threshold_backward(grad, h, 0)


class _Gather:
    """Gathers table rows into one reused buffer, widened to the compute dtype."""

    def __init__(self, x: torch.Tensor, m: int, table_dtype: torch.dtype):
        self.tokens = min(x.shape[0], max(1, CHUNK_ROWS // max(m, 1)))
        rows, d = self.tokens * m, x.shape[1]
        self.raw = torch.empty(rows, d, dtype=table_dtype, device=x.device)
        self.out = self.raw if table_dtype == x.dtype else torch.empty(rows, d, dtype=x.dtype, device=x.device)

    def chunks(self, T: int):
        for s in range(0, T, self.tokens):
            yield s, min(s + self.tokens, T)

    def __call__(self, table: torch.Tensor, ids: torch.Tensor, n: int) -> torch.Tensor:
        raw = torch.index_select(table, 0, ids, out=self.raw[: ids.numel()])
        out = raw if self.out is self.raw else self.out[: ids.numel()].copy_(raw)
        return out.view(n, -1, raw.shape[1])  # [n tokens, m, d]


def _forward_torch(x, g, idx, u, v, gate, activation, y, h, hg) -> None:
    """Forward by chunks of tokens: h = u_i . x, a = act(h), y = sum_j g a v_i as batched mat-vecs."""
    buf = _Gather(x, idx.shape[1], u.dtype)
    for s, e in buf.chunks(x.shape[0]):
        n, ids, xc = e - s, idx[s:e].reshape(-1), x[s:e, :, None]
        torch.bmm(buf(u, ids, n), xc, out=h[s:e, :, None])
        if gate is not None:
            torch.bmm(buf(gate, ids, n), xc, out=hg[s:e, :, None])
            a = _act(hg[s:e], activation) * h[s:e]
        else:
            a = _act(h[s:e], activation)
        torch.bmm((g[s:e] * a)[:, None, :], buf(v, ids, n), out=y[s:e, None, :])


def _backward_torch(x, dy, g, idx, u, v, gate, h, hg, dx, dg, coef_u, coef_v, coef_w, act) -> None:
    """Backward by chunks of tokens: dx, dg and the per-pair coefficients of the table gradients."""
    buf = _Gather(x, idx.shape[1], u.dtype)
    for s, e in buf.chunks(x.shape[0]):
        n, ids = e - s, idx[s:e].reshape(-1)
        dA = torch.bmm(buf(v, ids, n), dy[s:e, :, None]).squeeze(-1)  # dy . v_i
        gc, hc = g[s:e], h[s:e]
        if gate is not None:
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
            if gate is not None:
                dx[s:e] += torch.bmm(coef_w[s:e, None, :], buf(gate, ids, n)).squeeze(1)


# ------------------------------------------------------------------------------ table gradients
def sort_pairs(idx: torch.Tensor):
    """Group the (token, slot) pairs of idx [T, m] by expert.

    Returns (rows [U] distinct experts ascending, perm [T*m] pair ids in expert order,
    offsets [U + 1]: the pairs of rows[r] are perm[offsets[r]:offsets[r + 1]])."""
    sorted_ids, perm = torch.sort(idx.reshape(-1))
    rows, counts = torch.unique_consecutive(sorted_ids, return_counts=True)
    offsets = counts.new_zeros(counts.numel() + 1)
    torch.cumsum(counts, 0, out=offsets[1:])
    return rows, perm, offsets


def _table_grads(tables, wanted, idx, eng, sparse: bool = False) -> list:
    """Gradients of the tables: row i = sum over the pairs retrieving expert i of coef[pair] * src[token].

    ``wanted[k]`` is (src [T, d], coef [T, m]) or None (no gradient for tables[k]); ``eng`` is the
    kernel module (cpu_ext / triton_kernel) or None for the PyTorch path; ``sparse``: sparse COO
    row gradients instead of dense ones."""
    if all(w is None for w in wanted):
        return [None] * len(tables)
    m = idx.shape[1]
    rows, perm, offsets = eng.sort_pairs(idx, tables[0].shape[0]) if hasattr(eng, "sort_pairs") else sort_pairs(idx)
    grads = []
    for table, w in zip(tables, wanted):
        if w is None:
            grads.append(None)
            continue
        src, coef = w
        if eng is not None and not sparse and table.dtype == src.dtype:  # rows straight into the dense gradient
            grad = WORKSPACE.take(table, "dense", table.shape, table.dtype, zero=True)
            eng.table_grads(perm, offsets, m, [(src, coef, grad)], out_rows=rows)
            grads.append(grad)
            continue
        if eng is not None:  # compact [U, d] block
            block = WORKSPACE.take(table, "block", (rows.numel(), src.shape[1]), src.dtype, slack=1.1)
            eng.table_grads(perm, offsets, m, [(src, coef, block)])
        else:
            block = F.embedding_bag(perm // m, src, offsets[:-1], mode="sum",
                                    per_sample_weights=coef.reshape(-1)[perm])
        if sparse:
            if block.dtype != table.dtype:
                block = WORKSPACE.take(table, "cast", block.shape, table.dtype, slack=1.1).copy_(block)
            grads.append(torch.sparse_coo_tensor(rows[None], block, table.shape, is_coalesced=True,
                                                 check_invariants=False))
        else:
            grad = WORKSPACE.take(table, "dense", table.shape, table.dtype, zero=True)
            grads.append(grad.index_copy_(0, rows, block.to(table.dtype)))
        del block
    return grads
