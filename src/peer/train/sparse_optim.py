"""Row-wise (lazy) AdamW for the expert tables, and gradient clipping that understands sparse grads.

A PEER step at N = 1024^2 retrieves a few hundred thousand of the N rows of u and v; a dense
optimizer still reads and writes all N rows of the parameter, both moments and a dense gradient.
A PEER layer built with ``sparse_grad=True`` (``layer.sparse_grad``; the trainer sets it for
``optim.sparse_experts``) has the fused expert kernel hand its tables a sparse COO gradient with
just the retrieved rows (see :mod:`peer.ops.mix`); :class:`SparseRowAdamW` updates
only those rows (a dense gradient works too), like the embedding optimizers
of FBGEMM/TorchRec (which go one step further and apply the update inside the backward).

Semantics (lazy AdamW, as TensorFlow's LazyAdam and torch.optim.SparseAdam): at step t, for every
row r present in the gradient,

    p_r <- p_r * (1 - lr * wd)                                  (decoupled decay, touched rows only)
    m_r <- m_r + (1 - b1) (g_r - m_r)        v_r <- b2 v_r + (1 - b2) g_r^2
    p_r <- p_r - lr / (1 - b1^t) * m_r / (sqrt(v_r) / sqrt(1 - b2^t) + eps)

with t the step count of the parameter (global, not per row). Rows absent from the gradient
are left alone: no decay, moments frozen. Consequences, checked by the tests:
- when every row is in every gradient it *is* torch.optim.AdamW (any weight decay);
- from a zero state, one step equals AdamW on the touched rows and, with wd = 0, everywhere.
A dense gradient counts as touching every row (plain AdamW).

Memory options (what lets N = 2048^2 at d = 256 train in 24 GiB):
- ``state_dtype="bfloat16"``: both moments stored in bf16 (arithmetic stays fp32);
- ``rowwise=True``: one second moment per row (the mean of g^2 over the row), FBGEMM's
  "partial row-wise Adam"; v then costs N floats instead of N * d.

Gradient accumulation works (sparse grads add up; the step coalesces). Clipping must go through
:func:`clip_grad_norm_`, which accepts sparse gradients (torch's does not).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch

from peer.ops.workspace import empty_hugepage

from . import adamw_kernel

__all__ = ["SparseRowAdamW", "clip_grad_norm_", "coalesced"]

_STATE_DTYPES = {
    None: None,
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    torch.float32: torch.float32,
    torch.bfloat16: torch.bfloat16,
}


class SparseRowAdamW(torch.optim.Optimizer):
    """Lazy AdamW: only the rows of a 2-D parameter present in its (sparse) gradient are updated.

    Args:
        params: parameters or groups (2-D tensors, e.g. expert tables [N, d]).
        lr, betas, eps, weight_decay: as torch.optim.AdamW (decoupled weight decay).
        state_dtype: moment storage, "float32" / "bfloat16" / None (= the parameter's dtype).
        rowwise: one second moment per row instead of per element.
    """

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        betas=(0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        *,
        state_dtype=None,
        rowwise: bool = False,
    ):
        if not lr >= 0:
            raise ValueError(f"lr must be >= 0, got {lr!r}")
        if not (0 <= betas[0] < 1 and 0 <= betas[1] < 1):
            raise ValueError(f"betas must be in [0, 1), got {betas!r}")
        if not eps >= 0:
            raise ValueError(f"eps must be >= 0, got {eps!r}")
        if not weight_decay >= 0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay!r}")
        if state_dtype not in _STATE_DTYPES:
            raise ValueError(f"state_dtype must be 'float32', 'bfloat16' or None, got {state_dtype!r}")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))
        self.state_dtype, self.rowwise = _STATE_DTYPES[state_dtype], bool(rowwise)
        for group in self.param_groups:
            for p in group["params"]:
                if p.dim() != 2:
                    raise ValueError(
                        f"SparseRowAdamW: params must be 2-D tables [rows, dim], got shape {tuple(p.shape)}"
                    )

    def _init_state(self, p: torch.Tensor) -> dict:
        dtype = self.state_dtype or p.dtype
        state = self.state[p]
        state["step"] = torch.tensor(0.0)
        state["exp_avg"] = empty_hugepage(p.shape, dtype, p.device).zero_()
        vshape = p.shape[:1] if self.rowwise else p.shape
        state["exp_avg_sq"] = empty_hugepage(vshape, torch.float32 if self.rowwise else dtype, p.device).zero_()
        return state

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, (b1, b2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p] if self.state[p] else self._init_state(p)
                state["step"] += 1
                t = float(state["step"])
                rows, values = _grad_rows(p.grad)
                _adamw_rows(
                    p,
                    state["exp_avg"],
                    state["exp_avg_sq"],
                    values,
                    rows,
                    lr,
                    b1,
                    b2,
                    eps,
                    wd,
                    1 - b1**t,
                    1 - b2**t,
                    self.rowwise,
                )
        return loss

    def load_state_dict(self, state_dict: dict) -> None:
        """As torch's, but moments keep this optimizer's storage dtype (torch casts them to the param's)."""
        super().load_state_dict(state_dict)
        for p, st in self.state.items():
            dtype = self.state_dtype or p.dtype
            if "exp_avg" in st:
                st["exp_avg"] = st["exp_avg"].to(dtype)
                st["exp_avg_sq"] = st["exp_avg_sq"].to(torch.float32 if self.rowwise else dtype)


def coalesced(grad: torch.Tensor) -> torch.Tensor:
    """A row-sparse gradient as a coalesced tensor, without copying when it already is one.

    Autograd drops the "coalesced" flag when it stores a sparse gradient in ``.grad``, and
    ``coalesce()`` would then sort and copy all U x d values; the fused kernel's rows are sorted
    and distinct, so a cheap check lets the flag be set back. Accumulated gradients (several
    backward passes) really are coalesced (duplicate rows summed)."""
    if grad.is_coalesced():
        return grad
    rows = grad._indices()[0]
    if grad.sparse_dim() == 1 and (rows.numel() < 2 or bool((rows[1:] > rows[:-1]).all())):
        return grad._coalesced_(True)
    return grad.coalesce()


def _grad_rows(grad: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
    """(rows [U] or None for all rows, fp32 contiguous gradient rows [U, d])."""
    if grad.is_sparse:
        grad = coalesced(grad)
        return grad.indices()[0].contiguous(), grad.values().float().contiguous()
    return None, grad.float().contiguous()


def _adamw_rows(p, m, v, g, rows, lr, b1, b2, eps, wd, bc1, bc2, rowwise) -> None:
    if rows is not None and rows.numel() == 0:
        return
    if adamw_kernel.available(p):
        torch.ops.peer.adamw_rows(p, m, v, g, rows, lr, b1, b2, eps, wd, bc1, bc2, rowwise)
        return
    # PyTorch path (other devices, no compiler): gather the rows, update, scatter back
    idx = rows if rows is not None else torch.arange(p.shape[0], device=p.device)
    pr, mr = p.index_select(0, idx).float(), m.index_select(0, idx).float()
    pr.mul_(1 - lr * wd)
    mr.lerp_(g, 1 - b1)
    if rowwise:
        vr = v.index_select(0, idx).mul_(b2).add_(g.square().mean(1), alpha=1 - b2)
        denom = (vr.sqrt() / math.sqrt(bc2)).add_(eps)[:, None]
        v.index_copy_(0, idx, vr)
    else:
        vr = v.index_select(0, idx).float().mul_(b2).addcmul_(g, g, value=1 - b2)
        denom = (vr.sqrt() / math.sqrt(bc2)).add_(eps)
        v.index_copy_(0, idx, vr.to(v.dtype))
    pr.addcdiv_(mr, denom, value=-lr / bc1)
    m.index_copy_(0, idx, mr.to(m.dtype))
    p.index_copy_(0, idx, pr.to(p.dtype))


@torch.no_grad()
def clip_grad_norm_(
    parameters: Iterable[torch.Tensor] | torch.Tensor, max_norm: float, error_if_nonfinite: bool = False
) -> torch.Tensor:
    """torch.nn.utils.clip_grad_norm_ (2-norm) for a mix of dense and sparse COO gradients.

    Sparse gradients are coalesced in place (so duplicate rows add up before the norm)."""
    params = [parameters] if isinstance(parameters, torch.Tensor) else list(parameters)
    sparse = [p for p in params if p.grad is not None and p.grad.is_sparse]
    dense = [p for p in params if p.grad is not None and not p.grad.is_sparse]
    for p in sparse:
        p.grad = coalesced(p.grad)
    sq = [torch.linalg.vector_norm(p.grad._values().float()) ** 2 for p in sparse]
    if dense:
        sq.append(torch.nn.utils.get_total_norm([p.grad for p in dense]).float() ** 2)
    if not sq:
        return torch.tensor(0.0)
    total = torch.stack([s.to(sq[0].device) for s in sq]).sum().sqrt()
    if error_if_nonfinite and not torch.isfinite(total):
        raise RuntimeError(f"the total norm of the gradients is {total.item()}: non-finite")
    # as torch's: a clamped coefficient multiplies every gradient (x 1.0 when not clipping), computed
    # on the device (no host sync) in float64 as a Python float was
    coef = (float(max_norm) / (total.double() + 1e-6)).clamp(max=1.0)
    for p in sparse:
        p.grad._values().mul_(coef)
    for p in dense:
        p.grad.mul_(coef)
    return total
