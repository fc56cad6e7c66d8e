"""The row-wise AdamW update of :class:`peer.train.sparse_optim.SparseRowAdamW` as a custom op.

    peer::adamw_rows(p!, m!, v!, g, rows?, lr, beta1, beta2, eps, weight_decay, bc1, bc2, rowwise) -> ()

updates rows ``rows`` [U] (None: every row) of p [N, d] and its moments in place (``adamw_cpu.cpp``,
next to this file; built by :class:`peer.ops.build.CLibrary`). :func:`available` says when it
applies (CPU, contiguous fp32/bf16 parameter, library built); the optimizer's PyTorch path covers
the rest.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import torch
from torch import Tensor

from peer.ops.build import CLibrary, check, ptr

__all__ = ["LIB", "available", "adamw_rows"]

_P, _I, _F, _C = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float, ctypes.c_int
LIB = CLibrary(
    "adamw",
    [Path(__file__).with_name("adamw_cpu.cpp")],
    {"peer_adamw_rows": ([_P] * 5 + [_I] * 2 + [_F] * 7 + [_C] * 4, _C)},
)


def available(p: Tensor) -> bool:
    return (
        p.device.type == "cpu"
        and p.is_contiguous()
        and p.dtype in (torch.float32, torch.bfloat16)
        and LIB.get() is not None
    )


@torch.library.custom_op("peer::adamw_rows", mutates_args=("p", "m", "v"), device_types="cpu")
def adamw_rows(
    p: Tensor,
    m: Tensor,
    v: Tensor,
    g: Tensor,
    rows: Tensor | None,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    bc1: float,
    bc2: float,
    rowwise: bool,
) -> None:
    """AdamW on rows ``rows`` [U] (None: every row) of p [N, d] (fp32/bf16) with gradient rows g [U, d] (fp32).
    m is [N, d] and v is [N, d] (or [N] fp32 when ``rowwise``), fp32 or bf16, updated in place."""
    U, d = g.shape
    if rows is not None and rows.numel() != U:
        raise ValueError(f"adamw_rows: {rows.numel()} rows for {U} gradient rows")
    g = g.float().contiguous()
    rows = rows.contiguous() if rows is not None else None
    rc = LIB.require().peer_adamw_rows(
        ptr(p),
        ptr(m),
        ptr(v),
        ptr(g),
        ptr(rows),
        U,
        d,
        lr,
        beta1,
        beta2,
        eps,
        weight_decay,
        bc1,
        bc2,
        int(p.dtype == torch.bfloat16),
        int(m.dtype == torch.bfloat16),
        int(rowwise),
        torch.get_num_threads(),
    )
    check(rc, "adamw_rows")


@adamw_rows.register_fake
def _(p, m, v, g, rows, lr, beta1, beta2, eps, weight_decay, bc1, bc2, rowwise):
    return None
