"""AdamW with separate parameter groups for expert tables, product keys and the dense backbone.

Groups (every trainable parameter lands in exactly one; empty groups are dropped):

    experts     the layers' ``expert_parameters()`` (PEER u, v, gate; PKM values)
                lr * optim.expert_lr_mult, weight decay optim.expert_weight_decay
    keys        the layers' ``key_parameters()`` (PEER / PKM sub-keys)
                lr * optim.key_lr_mult, weight decay optim.key_weight_decay
    decay       the backbone's matrices (ndim >= 2): attention, FFW, routers, query networks, and the
                token embedding (tied to the output head, so it is the output projection too;
                decayed as in GPT-2 / nanoGPT)
    no_decay    the backbone's vectors (ndim < 2): norm gains, biases, BatchNorm affine parameters;
                decaying these only fights the normalisation, so weight decay is 0

PKM practice (Lample et al. 2019) is to give memory values a larger learning rate and no weight
decay; the defaults here keep every multiplier at 1 and expert/key decay at 0.

Each group carries ``name`` and ``lr_mult``; :class:`peer.train.schedule.Schedule` sets
``group['lr'] = lr(step) * group['lr_mult']``. With ``optim.sparse_experts`` the expert tables
are stepped row-wise by ``peer.train.sparse_optim`` (when that module is installed), the rest by
a dense AdamW; :class:`MultiOptimizer` presents both as one optimizer.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from ..layers.base import FeedForward

__all__ = ["param_groups", "build_optimizer", "MultiOptimizer", "clip_grad_norm", "GROUP_NAMES"]

log = logging.getLogger("peer.train")
GROUP_NAMES = ("decay", "no_decay", "experts", "keys")


def param_groups(model: nn.Module, optim_cfg) -> list[dict]:
    """Split ``model``'s trainable parameters into the groups above (module docstring)."""
    buckets: dict[str, list[nn.Parameter]] = {n: [] for n in GROUP_NAMES}
    experts, keys = set(), set()  # asked of the layers (the FeedForward contract, peer.layers.base)
    for m in model.modules():
        if isinstance(m, FeedForward):
            experts |= {id(p) for p in m.expert_parameters()}
            keys |= {id(p) for p in m.key_parameters()}
    seen: set[int] = set()
    for _, p in model.named_parameters():  # named_parameters() already yields tied tensors once
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        if id(p) in experts:
            buckets["experts"].append(p)
        elif id(p) in keys:
            buckets["keys"].append(p)
        elif p.ndim >= 2:
            buckets["decay"].append(p)
        else:
            buckets["no_decay"].append(p)
    o = optim_cfg
    settings = {
        "decay": (1.0, o.weight_decay),
        "no_decay": (1.0, 0.0),
        "experts": (o.expert_lr_mult, o.expert_weight_decay),
        "keys": (o.key_lr_mult, o.key_weight_decay),
    }
    groups = []
    for name in GROUP_NAMES:
        if buckets[name]:
            mult, wd = settings[name]
            groups.append(
                {
                    "params": buckets[name],
                    "name": name,
                    "lr_mult": float(mult),
                    "lr": o.lr * mult,
                    "weight_decay": float(wd),
                }
            )
    return groups


def _adamw(groups: list[dict], optim_cfg) -> torch.optim.Optimizer:
    o = optim_cfg
    kwargs = dict(lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps)
    if o.fused:
        try:
            return torch.optim.AdamW(groups, fused=True, **kwargs)
        except (RuntimeError, ValueError) as e:  # e.g. a device or dtype without a fused kernel
            log.warning("fused AdamW unavailable here (%s); using the foreach implementation", e)
    return torch.optim.AdamW(groups, **kwargs)


def build_optimizer(model: nn.Module, optim_cfg) -> torch.optim.Optimizer:
    """AdamW over :func:`param_groups` (fused where the device supports it).

    With ``optim_cfg.sparse_experts`` the ``experts`` group goes to the row-wise AdamW of
    ``peer.train.sparse_optim``, with ``optim_cfg.expert_optimizer="sgd"`` to plain SGD (either way a
    step changes only rows with a gradient when the gradient is sparse), and the result is a
    :class:`MultiOptimizer`.
    """
    groups = param_groups(model, optim_cfg)
    expert = [g for g in groups if g["name"] == "experts"]
    rest = [g for g in groups if g["name"] != "experts"]
    if optim_cfg.expert_optimizer == "sgd" and expert:  # takes dense or sparse (row) gradients alike
        sgd = torch.optim.SGD(expert, lr=optim_cfg.lr * optim_cfg.expert_lr_mult)
        return MultiOptimizer([_adamw(rest, optim_cfg), sgd] if rest else [sgd])
    if optim_cfg.sparse_experts and expert:
        from .sparse_optim import SparseRowAdamW  # our own module: an ImportError here is a bug, not a fallback

        o = optim_cfg
        sparse = SparseRowAdamW(
            expert, lr=o.lr * o.expert_lr_mult, betas=(o.beta1, o.beta2), eps=o.eps, weight_decay=o.expert_weight_decay
        )
        return MultiOptimizer([_adamw(rest, optim_cfg), sparse] if rest else [sparse])
    return _adamw(groups, optim_cfg)


class MultiOptimizer:
    """Several optimizers stepped together, seen as one: ``param_groups`` is the concatenation."""

    def __init__(self, optimizers: list[torch.optim.Optimizer]):
        self.optimizers = list(optimizers)

    @property
    def param_groups(self) -> list[dict]:
        return [g for o in self.optimizers for g in o.param_groups]

    def step(self) -> None:
        for o in self.optimizers:
            o.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for o in self.optimizers:
            o.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        return {"multi": [o.state_dict() for o in self.optimizers]}

    def load_state_dict(self, state: dict) -> None:
        parts = state.get("multi") if isinstance(state, dict) else None
        if parts is None or len(parts) != len(self.optimizers):
            raise ValueError(
                f"optimizer state holds {len(parts) if parts else 1} optimizer(s), "
                f"this run has {len(self.optimizers)} (optim.sparse_experts changed?)"
            )
        for o, s in zip(self.optimizers, parts, strict=True):
            o.load_state_dict(s)


def clip_grad_norm(params, max_norm: float) -> torch.Tensor:
    """Scale all gradients so that their global L2 norm is at most ``max_norm`` (``inf``: only measure);
    returns the norm before clipping. ``torch.nn.utils.clip_grad_norm_`` when every gradient is dense;
    the sparse COO row gradients that :mod:`peer.train.sparse_optim` asks for go to its clipping."""
    params = [p for p in params if p.grad is not None]
    if any(p.grad.is_sparse for p in params):
        from .sparse_optim import clip_grad_norm_

        return clip_grad_norm_(params, max_norm)
    return torch.nn.utils.clip_grad_norm_(params, max_norm)
