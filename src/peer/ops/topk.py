"""Fast product-key top-k on the CPU (paper eqs. 4-5), with a sparse backward.

Forward, per chunk of tokens (all heads and both halves at once):
    s = q_half . C_half for every sub-key (one batched matmul into a reused few-MB buffer),
    then one C++ pass keeps the k best sub-keys of each half and the k best of their k^2 sums
    (only the ~k ln k sums that can make the top k are formed); the [T, h, 2, n] score tensor
    is never materialised whole.
Backward: a retrieved score is q1 . c_a + q2 . c'_b, so
    dq1 = sum_j G_j c_{a_j},  dq2 = sum_j G_j c'_{b_j},  dc_a += G_j q1,  dc'_b += G_j q2
touching only the selected sub-keys, instead of autograd's dense [T, h, 2, n] gradient and two
more large matmuls.

Ops: ``peer::pk_topk(q, keys, k) -> (scores, ids, ab)`` with autograd registered (``ids`` and the
sub-key pairs ``ab`` are not differentiable) and ``peer::pk_topk_backward(G, ab, q, keys) -> (dq,
dkeys)``. :func:`peer.ops.topk_engine` says when they apply (CPU, fp32, kernel built) and otherwise takes
the index's PyTorch code.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from . import cpu
from .workspace import WORKSPACE

__all__ = ["product_topk"]

SCORE_CHUNK_BYTES = (
    4 << 20
)  # sub-key scores per chunk of tokens: stays in cache for the selection pass (measured: 32 MB, 1 MB slower)


def product_topk(q: Tensor, keys: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """q [T, h, key_dim], keys [groups, 2, n, key_dim/2] (groups 1 or h) -> (scores, ids) [T, h, k], best first."""
    scores, ids, _ = torch.ops.peer.pk_topk(q.contiguous(), keys, k)
    return scores, ids


def _subkey_scores(qc: Tensor, keys: Tensor, out: Tensor) -> Tensor:
    """Sub-key scores of a chunk qc [c, h, key_dim] as a [c, h, 2, n] view (last dim contiguous)."""
    c, h, kd = qc.shape
    groups, _, n, half = keys.shape
    if groups == 1:  # [2, c*h, half] @ [2, half, n]
        q2 = qc.view(c * h, 2, half).transpose(0, 1)
        s = torch.bmm(q2, keys[0].transpose(1, 2), out=out[: 2 * c * h * n].view(2, c * h, n))
        return s.view(2, c, h, n).permute(1, 2, 0, 3)
    # per-head keys: [h*2, c, half] @ [h*2, half, n]
    q2 = qc.view(c, h * 2, half).transpose(0, 1)
    s = torch.bmm(q2, keys.reshape(h * 2, n, half).transpose(1, 2), out=out[: 2 * c * h * n].view(h * 2, c, n))
    return s.view(h, 2, c, n).permute(2, 0, 1, 3)


@torch.library.custom_op("peer::pk_topk", mutates_args=(), device_types="cpu")
def _pk_topk(q: Tensor, keys: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
    T, h, kd = q.shape
    groups, _, n, half = keys.shape
    scores = q.new_empty(T, h, k)
    ids = torch.empty(T, h, k, dtype=torch.int64)
    ab = torch.empty(T, h, k, 2, dtype=torch.int64)
    c = max(1, min(T, SCORE_CHUNK_BYTES // (4 * h * 2 * n)))
    # recycled: a fresh buffer of this size costs more in page faults than the matmul that fills it
    buf = WORKSPACE.take(keys, "subkey_scores", (c * h * 2 * n,), q.dtype)
    keys = keys.contiguous()
    for s in range(0, T, c):
        e = min(s + c, T)
        cpu.pk_topk(_subkey_scores(q[s:e], keys, buf), k, scores[s:e], ids[s:e], ab[s:e])
    return scores, ids, ab


@_pk_topk.register_fake
def _(q: Tensor, keys: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
    T, h, _ = q.shape
    return q.new_empty(T, h, k), q.new_empty(T, h, k, dtype=torch.int64), q.new_empty(T, h, k, 2, dtype=torch.int64)


@torch.library.custom_op("peer::pk_topk_backward", mutates_args=(), device_types="cpu")
def _pk_topk_backward(G: Tensor, ab: Tensor, q: Tensor, keys: Tensor) -> tuple[Tensor, Tensor]:
    keys = keys.contiguous()
    dq, dkeys = torch.empty_like(q), torch.empty_like(keys)
    cpu.pk_topk_backward(G.contiguous().float(), ab, q, keys, dq, dkeys)
    return dq, dkeys


@_pk_topk_backward.register_fake
def _(G: Tensor, ab: Tensor, q: Tensor, keys: Tensor) -> tuple[Tensor, Tensor]:
    return torch.empty_like(q), torch.empty_like(keys, memory_format=torch.contiguous_format)


def _setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[Tensor, Tensor, Tensor]) -> None:
    q, keys, _ = inputs
    _, ids, ab = output
    ctx.mark_non_differentiable(ids, ab)
    ctx.save_for_backward(q, keys, ab)


def _backward(ctx: Any, G: Tensor, _dids: Tensor, _dab: Tensor) -> tuple[Tensor, Tensor, None]:
    q, keys, ab = ctx.saved_tensors
    dq, dkeys = torch.ops.peer.pk_topk_backward(G, ab, q, keys)
    return dq, dkeys, None


_pk_topk.register_autograd(_backward, setup_context=_setup_context)
