"""Initialise a PEER layer to imitate the MLP it replaces (``peerify(..., init="distill")``).

1. ``capture``: forward hooks record the replaced MLP's input x and output y on sample tokens.
2. ``distill``: calibrate the query BatchNorm on x; solve for the values v in closed form (ridge
   least squares, the output being linear in v once retrieval and u are fixed, eqs. 3 and 6);
   then refine all PEER parameters with Adam on the MSE between PEER(x) and y.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from ..layers import PEER

__all__ = ["capture", "distill"]


def _as_batches(sample_inputs) -> list[dict]:
    """``sample_inputs`` as a list of model-input dicts (token ids [B, T] become ``{'input_ids': ids}``)."""

    def one(item):
        if isinstance(item, torch.Tensor):
            if item.dim() == 1:
                item = item[None]
            if item.dim() != 2 or item.dtype != torch.long:
                raise ValueError(
                    f"sample_inputs: token ids must be a [batch, seq] torch.long tensor, "
                    f"got {tuple(item.shape)} {item.dtype}"
                )
            return {"input_ids": item}
        if isinstance(item, Mapping) and "input_ids" in item:
            return dict(item)
        raise ValueError(f"sample_inputs: expected token ids or a dict with 'input_ids', got {type(item).__name__}")

    if isinstance(sample_inputs, (torch.Tensor, Mapping)):
        return [one(sample_inputs)]
    if isinstance(sample_inputs, Iterable):
        batches = [one(x) for x in sample_inputs]
        if batches:
            return batches
    raise ValueError("sample_inputs: expected token ids, a dict of model inputs, or a non-empty list of them")


@torch.no_grad()
def capture(
    model: nn.Module, mlps: dict[int, nn.Module], sample_inputs
) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """Run the model on the sample; return block id -> (MLP inputs, MLP outputs), [tokens, d] float32."""
    store: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {i: [] for i in mlps}
    keep: list[torch.Tensor | None] = [None]  # the current batch's attention mask, flattened

    def hook_for(i):
        def hook(module, args, kwargs, output):
            x = args[0] if args else next(iter(kwargs.values()))
            d = x.shape[-1]
            x, y = x.reshape(-1, d).float(), output.reshape(-1, d).float()
            if keep[0] is not None:
                x, y = x[keep[0]], y[keep[0]]
            store[i].append((x.cpu(), y.cpu()))

        return hook

    handles = [m.register_forward_hook(hook_for(i), with_kwargs=True) for i, m in mlps.items()]
    was_training = model.training
    device = next(model.parameters()).device
    try:
        model.eval()
        for batch in _as_batches(sample_inputs):
            batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
            mask = batch.get("attention_mask")
            keep[0] = mask.reshape(-1).bool().to(device) if mask is not None else None
            model(**batch, use_cache=False)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return {i: (torch.cat([x for x, _ in v]), torch.cat([y for _, y in v])) for i, v in store.items()}


def distill(
    layer: PEER,
    x: torch.Tensor,
    y: torch.Tensor,
    steps: int,
    lr: float,
    batch: int,
    ridge: float = 0.1,
    cg_iters: int = 200,
) -> dict[str, float]:
    """Fit ``layer(x)`` to ``y``: calibrate the query BatchNorm, least-squares values, then Adam (see module doc).

    Returns the MSE before / after, the MSE of predicting 0 (the scale of y), and the token count.
    """
    w = layer.query_proj.weight  # the layer's compute dtype (expert tables may be stored in bfloat16)
    device = w.device
    x, y = x.to(device, w.dtype), y.to(device, w.dtype)
    before = _mse(layer, x, y)
    with torch.no_grad():
        _calibrate_query_norm(layer, x)
        _least_squares_values(layer, x, y, ridge, cg_iters)
    if steps:
        gen = torch.Generator().manual_seed(0)
        opt = torch.optim.Adam(layer.parameters(), lr=lr)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 - s / steps)  # linear decay to 0
        layer.train()
        with torch.enable_grad():
            for _ in range(steps):
                idx = torch.randint(0, x.shape[0], (min(batch, x.shape[0]),), generator=gen).to(device)
                loss = F.mse_loss(layer(x[idx]), y[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
    return {
        "mse_before": before,
        "mse_after": _mse(layer, x, y),
        "mse_zero": float(y.pow(2).mean()),
        "tokens": int(x.shape[0]),
    }


@torch.no_grad()
def _mse(layer: PEER, x: torch.Tensor, y: torch.Tensor) -> float:
    """Mean squared error of ``layer(x)`` against ``y`` in eval mode."""
    layer.eval()
    total = sum(F.mse_loss(layer(xb), yb, reduction="sum") for xb, yb in zip(x.split(4096), y.split(4096), strict=True))
    return float(total / y.numel())


def _calibrate_query_norm(layer: PEER, x: torch.Tensor) -> None:
    """Set a query BatchNorm's running statistics to the exact mean / variance of the queries on ``x``."""
    bn = layer.query_norm
    if not isinstance(bn, nn.BatchNorm1d) or not bn.track_running_stats:
        return
    q = torch.cat([layer.query_proj(xb) for xb in x.split(4096)]).float()
    bn.running_mean.copy_(q.mean(0))
    bn.running_var.copy_(q.var(0, unbiased=True) if q.shape[0] > 1 else torch.ones_like(bn.running_var))


def _least_squares_values(layer: PEER, x: torch.Tensor, y: torch.Tensor, ridge: float, iters: int) -> None:
    """Values v minimising ||Phi v - y||^2 + lam ||v - v0||^2 for the retrieval and u fixed (eval mode).

    Eqs. 3 and 6: y(x) = sum_i c_i(x) v_i with c_i(x) = g_i(x) act(u_i . x) (GLU: act(w_i . x) u_i . x)
    over the retrieved experts, so y is linear in the values; Phi [tokens, N] is that sparse
    coefficient matrix. The normal equations (Phi^T Phi + lam I) v = Phi^T y + lam v0 are solved by
    conjugate gradients, O(tokens * h * k * d) per iteration. v0 is the initial v rescaled to the
    output scale of y (experts not retrieved on the sample keep it); lam = ridge * mean diag(Phi^T Phi).
    """
    layer.eval()
    rows, cols, vals = [], [], []
    for start, xb in zip(range(0, x.shape[0], 4096), x.split(4096), strict=True):
        g, idx = layer.retrieve(xb)  # [T, h, k]
        idx, g = idx.flatten(1), g.flatten(1)
        h = torch.einsum("td,tmd->tm", xb, F.embedding(idx, layer.u).to(xb.dtype))
        act = F.gelu if layer.activation == "gelu" else F.relu
        if layer.gate is not None:
            h = act(torch.einsum("td,tmd->tm", xb, F.embedding(idx, layer.gate).to(xb.dtype))) * h
        else:
            h = act(h)
        rows.append(torch.arange(start, start + xb.shape[0], device=x.device).repeat_interleave(idx.shape[1]))
        cols.append(idx.flatten())
        vals.append((g.to(h.dtype) * h).flatten())
    n = layer.num_experts
    phi = torch.sparse_coo_tensor(
        torch.stack([torch.cat(rows), torch.cat(cols)]), torch.cat(vals).float(), (x.shape[0], n)
    ).coalesce()
    phi_t = phi.t().coalesce()
    v = layer.v.detach().float()
    pred = torch.sparse.mm(phi, v)
    v0 = v * (y.float().pow(2).mean().sqrt() / pred.pow(2).mean().sqrt().clamp_min(1e-12))
    lam = ridge * float(phi.values().pow(2).sum()) / n + 1e-12

    def normal(m):  # (Phi^T Phi + lam I) m
        return torch.sparse.mm(phi_t, torch.sparse.mm(phi, m)) + lam * m

    b = torch.sparse.mm(phi_t, y.float()) + lam * v0
    sol = v0.clone()
    r = b - normal(sol)
    p = r.clone()
    rr = (r * r).sum()
    b_norm = float((b * b).sum().sqrt()) + 1e-30
    for _ in range(iters):  # conjugate gradients, all d output columns at once (one shared step size)
        if float(rr.sqrt()) <= 1e-6 * b_norm:
            break
        ap = normal(p)
        alpha = rr / (p * ap).sum()
        sol += alpha * p
        r -= alpha * ap
        rr_new = (r * r).sum()
        p = r + (rr_new / rr) * p
        rr = rr_new
    layer.v.data.copy_(sol.to(layer.v.dtype))
