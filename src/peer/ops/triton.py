# mypy: disallow-untyped-defs=False, disallow-incomplete-defs=False, disallow-untyped-decorators=False
# (the @triton.jit kernels take pointers and tl.constexpr: they have no Python types)
"""Triton kernels of the fused expert mix (the GPU path), same arithmetic as ``fused_cpu.cpp``.

    forward : one program per token: tiles of BLOCK_M retrieved rows [BLOCK_M, d] of u (and the
              GLU gate) give h = u_i . x, then y = sum_j g a v_i accumulates in fp32 registers
    backward: one program per token: dA = dy . v_i, the per-pair coefficients, dx = sum_j coef u_i
    grads   : pairs sorted by expert with torch.sort; row = sum over its pairs of coef * x[token] (or
              * dy[token]); no atomics, deterministic. Dense [N, d] gradients: one program per pair,
              the one that starts a run of equal ids sums it (no host sync: the number of distinct
              experts is never read); sparse row gradients: one program per distinct expert

The custom ops, the gradient layout (dense or sparse rows) and the buffers are shared with the CPU
engine (:mod:`peer.ops.mix`). Tested on the CPU with ``TRITON_INTERPRET=1`` against the reference;
:func:`available` is False when triton is missing, or when there is neither a CUDA device nor the
interpreter.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
from torch import Tensor

from .torch_engine import sort_pairs  # torch.sort groups the pairs on the GPU too

try:
    import triton
    import triton.language as tl
except ImportError:  # importable without triton; available() says False
    triton = None

__all__ = ["available", "forward", "backward", "sort_pairs", "table_grads", "dense_table_grads"]


def available() -> bool:
    """True when the kernels can run: triton is installed and a GPU or the interpreter is there."""
    return triton is not None and (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1")


def _blocks(m: int, d: int) -> tuple[int, int]:
    block_d = triton.next_power_of_2(d)
    block_m = max(1, min(triton.next_power_of_2(m), max(1, 8192 // block_d)))
    return block_m, block_d


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
    T, d = x.shape
    m = idx.shape[1]
    if T == 0:
        return
    bm, bd = _blocks(m, d)
    _fwd[(T,)](
        x,
        g,
        idx,
        u,
        v,
        w if w is not None else u,
        y,
        h,
        hg if hg is not None else h,
        m,
        d,
        HAS_GATE=w is not None,
        GELU=gelu,
        BLOCK_M=bm,
        BLOCK_D=bd,
    )


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
    T, d = x.shape
    m = idx.shape[1]
    if T == 0:
        return
    bm, bd = _blocks(m, d)
    _bwd[(T,)](
        dy,
        g,
        idx,
        u,
        v,
        w if w is not None else u,
        h,
        hg if hg is not None else h,
        dx if dx is not None else dy,
        dg,
        cu,
        cv,
        cw if cw is not None else cu,
        m,
        d,
        HAS_GATE=w is not None,
        HAS_DX=dx is not None,
        GELU=gelu,
        BLOCK_M=bm,
        BLOCK_D=bd,
    )


def table_grads(
    perm: Tensor,
    offsets: Tensor,
    m: int,
    triples: Sequence[tuple[Tensor, Tensor, Tensor] | None],
    out_rows: Tensor | None = None,
) -> None:
    """For each (src [T, d], coef [T, m], out): out[r] (or out[out_rows[r]]) = sum over bag r of
    coef[pair] * src[pair // m]; bag r is perm[offsets[r]:offsets[r + 1]]."""
    U = offsets.numel() - 1
    for t in triples:
        if t is None or U == 0:
            continue
        src, coef, out = t
        d = src.shape[1]
        _bag[(U,)](
            perm,
            offsets,
            out_rows if out_rows is not None else perm,
            src,
            coef,
            out,
            m,
            d,
            HAS_ROWS=out_rows is not None,
            BLOCK_D=triton.next_power_of_2(d),
        )


def dense_table_grads(idx: Tensor, m: int, triples: Sequence[tuple[Tensor, Tensor, Tensor] | None]) -> None:
    """For each (src [T, d], coef [T, m], out [N, d] zeroed) in ``triples``: out[i] = sum over the pairs
    (t, j) with idx[t, j] = i of coef[t, j] * src[t]. Without a host sync: the pairs are sorted by
    expert on the device and one program per pair sums the run of equal ids that starts there (the
    others return at once), so the number of distinct experts never has to be known on the host."""
    P = idx.numel()
    if P == 0:
        return
    sorted_ids, perm = torch.sort(idx.reshape(-1))
    for t in triples:
        if t is None:
            continue
        src, coef, out = t
        d = src.shape[1]
        _bag_runs[(P,)](sorted_ids, perm, src, coef, out, P, m, d, BLOCK_D=triton.next_power_of_2(d))


if triton is not None:

    @triton.jit
    def _act(h, GELU: tl.constexpr):
        if GELU:
            return 0.5 * h * (1.0 + tl.erf(h * 0.7071067811865476))
        else:
            return tl.maximum(h, 0.0)

    @triton.jit
    def _dact(h, GELU: tl.constexpr):
        if GELU:
            cdf = 0.5 * (1.0 + tl.erf(h * 0.7071067811865476))
            return cdf + h * tl.exp(-0.5 * h * h) * 0.3989422804014327
        else:
            return tl.where(h > 0.0, 1.0, 0.0)

    @triton.jit
    def _fwd(
        x_ptr,
        g_ptr,
        idx_ptr,
        u_ptr,
        v_ptr,
        w_ptr,
        y_ptr,
        h_ptr,
        hg_ptr,
        m,
        d,
        HAS_GATE: tl.constexpr,
        GELU: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_D: tl.constexpr,
    ):
        t = tl.program_id(0).to(tl.int64)
        offs_d = tl.arange(0, BLOCK_D)
        dmask = offs_d < d
        x = tl.load(x_ptr + t * d + offs_d, mask=dmask, other=0.0).to(tl.float32)
        acc = tl.zeros([BLOCK_D], dtype=tl.float32)
        for j0 in range(0, m, BLOCK_M):
            offs_m = j0 + tl.arange(0, BLOCK_M)
            mmask = offs_m < m
            ids = tl.load(idx_ptr + t * m + offs_m, mask=mmask, other=0)
            rows = ids[:, None] * d + offs_d[None, :]
            tmask = mmask[:, None] & dmask[None, :]
            hu = tl.sum(tl.load(u_ptr + rows, mask=tmask, other=0.0).to(tl.float32) * x[None, :], axis=1)
            if HAS_GATE:
                hw = tl.sum(tl.load(w_ptr + rows, mask=tmask, other=0.0).to(tl.float32) * x[None, :], axis=1)
                tl.store(hg_ptr + t * m + offs_m, hw, mask=mmask)
                a = _act(hw, GELU) * hu
            else:
                a = _act(hu, GELU)
            tl.store(h_ptr + t * m + offs_m, hu, mask=mmask)
            coef = tl.load(g_ptr + t * m + offs_m, mask=mmask, other=0.0) * a
            acc += tl.sum(coef[:, None] * tl.load(v_ptr + rows, mask=tmask, other=0.0).to(tl.float32), axis=0)
        tl.store(y_ptr + t * d + offs_d, acc, mask=dmask)

    @triton.jit
    def _bwd(
        dy_ptr,
        g_ptr,
        idx_ptr,
        u_ptr,
        v_ptr,
        w_ptr,
        h_ptr,
        hg_ptr,
        dx_ptr,
        dg_ptr,
        cu_ptr,
        cv_ptr,
        cw_ptr,
        m,
        d,
        HAS_GATE: tl.constexpr,
        HAS_DX: tl.constexpr,
        GELU: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_D: tl.constexpr,
    ):
        t = tl.program_id(0).to(tl.int64)
        offs_d = tl.arange(0, BLOCK_D)
        dmask = offs_d < d
        dy = tl.load(dy_ptr + t * d + offs_d, mask=dmask, other=0.0).to(tl.float32)
        dx = tl.zeros([BLOCK_D], dtype=tl.float32)
        for j0 in range(0, m, BLOCK_M):
            offs_m = j0 + tl.arange(0, BLOCK_M)
            mmask = offs_m < m
            pm = t * m + offs_m
            ids = tl.load(idx_ptr + pm, mask=mmask, other=0)
            rows = ids[:, None] * d + offs_d[None, :]
            tmask = mmask[:, None] & dmask[None, :]
            dA = tl.sum(tl.load(v_ptr + rows, mask=tmask, other=0.0).to(tl.float32) * dy[None, :], axis=1)
            hu = tl.load(h_ptr + pm, mask=mmask, other=0.0)
            gt = tl.load(g_ptr + pm, mask=mmask, other=0.0)
            if HAS_GATE:
                hw = tl.load(hg_ptr + pm, mask=mmask, other=0.0)
                ag = _act(hw, GELU)
                a = ag * hu
                cu = dA * gt * ag
                cw = dA * gt * hu * _dact(hw, GELU)
                tl.store(cw_ptr + pm, cw, mask=mmask)
            else:
                a = _act(hu, GELU)
                cu = dA * gt * _dact(hu, GELU)
            tl.store(dg_ptr + pm, dA * a, mask=mmask)
            tl.store(cu_ptr + pm, cu, mask=mmask)
            tl.store(cv_ptr + pm, gt * a, mask=mmask)
            if HAS_DX:
                dx += tl.sum(cu[:, None] * tl.load(u_ptr + rows, mask=tmask, other=0.0).to(tl.float32), axis=0)
                if HAS_GATE:
                    dx += tl.sum(cw[:, None] * tl.load(w_ptr + rows, mask=tmask, other=0.0).to(tl.float32), axis=0)
        if HAS_DX:
            tl.store(dx_ptr + t * d + offs_d, dx, mask=dmask)

    @triton.jit
    def _bag(
        perm_ptr, off_ptr, rows_ptr, src_ptr, coef_ptr, out_ptr, m, d, HAS_ROWS: tl.constexpr, BLOCK_D: tl.constexpr
    ):
        r = tl.program_id(0).to(tl.int64)
        offs_d = tl.arange(0, BLOCK_D)
        dmask = offs_d < d
        start = tl.load(off_ptr + r)
        end = tl.load(off_ptr + r + 1)
        acc = tl.zeros([BLOCK_D], dtype=tl.float32)
        for p in range(start, end):
            pair = tl.load(perm_ptr + p)
            c = tl.load(coef_ptr + pair)
            acc += c * tl.load(src_ptr + (pair // m) * d + offs_d, mask=dmask, other=0.0).to(tl.float32)
        if HAS_ROWS:
            row = tl.load(rows_ptr + r)
        else:
            row = r
        tl.store(out_ptr + row * d + offs_d, acc.to(out_ptr.dtype.element_ty), mask=dmask)

    @triton.jit
    def _bag_runs(sorted_ptr, perm_ptr, src_ptr, coef_ptr, out_ptr, P, m, d, BLOCK_D: tl.constexpr):
        p = tl.program_id(0).to(tl.int64)
        e = tl.load(sorted_ptr + p)
        prev = tl.load(sorted_ptr + p - 1, mask=p > 0, other=-1)
        if prev != e:  # p starts the run of pairs of expert e
            offs_d = tl.arange(0, BLOCK_D)
            dmask = offs_d < d
            acc = tl.zeros([BLOCK_D], dtype=tl.float32)
            q = p
            cur = e
            while cur == e:
                pair = tl.load(perm_ptr + q)
                c = tl.load(coef_ptr + pair)
                acc += c * tl.load(src_ptr + (pair // m) * d + offs_d, mask=dmask, other=0.0).to(tl.float32)
                q += 1
                cur = tl.load(sorted_ptr + q, mask=q < P, other=-1)
            tl.store(out_ptr + e * d + offs_d, _to_out(acc, out_ptr), mask=dmask)

    @triton.jit
    def _to_out(acc, out_ptr):
        """fp32 -> the output's dtype, rounding to nearest even for bf16 as torch does (done on the bits:
        the interpreter's own cast truncates)."""
        if out_ptr.dtype.element_ty == tl.bfloat16:
            bits = acc.to(tl.uint32, bitcast=True)
            bits = bits + (((bits >> 16) & 1) + 0x7FFF)
            return (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
        else:
            return acc.to(out_ptr.dtype.element_ty)
