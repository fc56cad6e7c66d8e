"""The CPU engine: ctypes bindings of ``csrc/fused_cpu.cpp`` (the fused expert mix) and
``csrc/pk_topk_cpu.cpp`` (product-key top-k), one library built by :class:`peer.ops.build.CLibrary`.

Called only from the implementations of the custom ops in :mod:`peer.ops.mix` and
:mod:`peer.ops.topk`, on contiguous CPU tensors whose dtypes those ops have checked.
"""

from __future__ import annotations

import ctypes
from collections.abc import Sequence

import torch
from torch import Tensor

from .build import CSRC, CLibrary
from .build import check as _check
from .build import ptr as _ptr

__all__ = ["LIB", "available", "forward", "backward", "sort_pairs", "table_grads", "pk_topk", "pk_topk_backward"]

_P = ctypes.c_void_p
_I = ctypes.c_int64
_C = ctypes.c_int
LIB = CLibrary(
    "cpu_kernels",
    [CSRC / "fused_cpu.cpp", CSRC / "pk_topk_cpu.cpp"],
    {
        "peer_forward": ([_P] * 9 + [_I] * 3 + [_C] * 3, _C),
        "peer_backward": ([_P] * 14 + [_I] * 3 + [_C] * 3, _C),
        "peer_table_grads": ([_P, _P, _P, _I, _I, _I] + [_P] * 9 + [_C], _C),
        "peer_sort_pairs": ([_P, _I, _I, _P, _P, _P], _I),
        "peer_pk_topk": ([_P] + [_I] * 7 + [_P] * 3 + [_C], _C),
        "peer_pk_topk_backward": ([_P] * 4 + [_I] * 6 + [_P] * 2 + [_C], _C),
    },
)


def available() -> bool:
    """True when the library is built and loaded (False when disabled or the build failed)."""
    return LIB.get() is not None


def lib() -> ctypes.CDLL:
    return LIB.require()


def forward(
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
) -> None:
    """Fill y [T, d], h [T, m] (u_i . x) and, for GLU, hg [T, m] (w_i . x). All contiguous, x/g fp32."""
    T, d = x.shape
    m = idx.shape[1]
    rc = lib().peer_forward(
        _ptr(x),
        _ptr(g),
        _ptr(idx),
        _ptr(u),
        _ptr(v),
        _ptr(w),
        _ptr(y),
        _ptr(h),
        _ptr(hg),
        T,
        d,
        m,
        int(gelu),
        int(u.dtype == torch.bfloat16),
        torch.get_num_threads(),
    )
    _check(rc, "forward")


def backward(
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
) -> None:
    """Fill dx (optional), dg, and the per-pair coefficients cu, cv (and cw for GLU), each [T, m]."""
    T, d = x.shape
    m = idx.shape[1]
    rc = lib().peer_backward(
        _ptr(x),
        _ptr(dy),
        _ptr(g),
        _ptr(idx),
        _ptr(u),
        _ptr(v),
        _ptr(w),
        _ptr(h),
        _ptr(hg),
        _ptr(dx),
        _ptr(dg),
        _ptr(cu),
        _ptr(cv),
        _ptr(cw),
        T,
        d,
        m,
        int(gelu),
        int(u.dtype == torch.bfloat16),
        torch.get_num_threads(),
    )
    _check(rc, "backward")


def sort_pairs(idx: torch.Tensor, num_experts: int) -> tuple[Tensor, Tensor, Tensor]:
    """Radix sort of the pairs of idx [T, m] by expert: (rows [U], perm [T*m], offsets [U + 1])."""
    P = idx.numel()
    perm = torch.empty(P, dtype=torch.int64)
    rows = torch.empty(P, dtype=torch.int64)
    offsets = torch.empty(P + 1, dtype=torch.int64)
    U = lib().peer_sort_pairs(_ptr(idx), P, num_experts, _ptr(perm), _ptr(rows), _ptr(offsets))
    _check(0 if U >= 0 else 1, "sort_pairs")
    return rows[:U], perm, offsets[: U + 1]


def table_grads(
    perm: Tensor,
    offsets: Tensor,
    m: int,
    triples: Sequence[tuple[Tensor, Tensor, Tensor] | None],
    out_rows: Tensor | None = None,
) -> None:
    """For each (src [T, d], coef [T, m], out) in ``triples`` (None entries skipped):
    out[r] (or out[out_rows[r]]) = sum over bag r of the expert-sorted pairs of coef[pair] * src[pair // m]."""
    U = offsets.numel() - 1
    d = next(t[0].shape[1] for t in triples if t is not None)
    args: list[int | None] = []
    for t in list(triples) + [None] * (3 - len(triples)):
        args += [None, None, None] if t is None else [_ptr(t[0]), _ptr(t[1]), _ptr(t[2])]
    rc = lib().peer_table_grads(_ptr(perm), _ptr(offsets), _ptr(out_rows), U, m, d, *args, torch.get_num_threads())
    _check(rc, "table_grads")


def pk_topk(s: torch.Tensor, k: int, scores: Tensor, ids: Tensor, ab: Tensor) -> None:
    """Product-key top-k of sub-key scores ``s`` viewed [T, h, 2, n] (last dim contiguous): fills
    scores [T, h, k] (best first), ids [T, h, k] = a * n + b and ab [T, h, k, 2]."""
    T, h, _, n = s.shape
    st, sh, ss, one = s.stride()
    if one != 1:
        raise ValueError("pk_topk: the last dim of the scores must be contiguous")
    rc = lib().peer_pk_topk(_ptr(s), T, h, n, st, sh, ss, k, _ptr(scores), _ptr(ids), _ptr(ab), torch.get_num_threads())
    _check(rc, "pk_topk")


def pk_topk_backward(G: Tensor, ab: Tensor, q: Tensor, keys: Tensor, dq: Tensor, dkeys: Tensor) -> None:
    """dq [T, h, key_dim] and dkeys (like keys [groups, 2, n, half]) of the selected product-key scores."""
    T, h, k = G.shape
    groups, _, n, half = keys.shape
    rc = lib().peer_pk_topk_backward(
        _ptr(G),
        _ptr(ab),
        _ptr(q),
        _ptr(keys),
        T * h,
        h,
        groups,
        n,
        half,
        k,
        _ptr(dq),
        _ptr(dkeys),
        torch.get_num_threads(),
    )
    _check(rc, "pk_topk_backward")
