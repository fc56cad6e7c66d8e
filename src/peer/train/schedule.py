"""Learning-rate schedule: linear warmup, then cosine decay to ``min_lr_ratio * lr``.

A pure function of the step, so the schedule needs no state of its own in a checkpoint:

    factor(s) = (s + 1) / warmup                                   s < warmup
    factor(s) = r + (1 - r) * (1 + cos(pi * p)) / 2,               s >= warmup
                p = min(1, (s - warmup) / max(1, total - warmup)),  r = min_lr_ratio

``s`` counts optimizer updates from 0: update number ``s + 1`` uses ``lr * factor(s)``. The first
warmup update already has a nonzero rate, the warmup reaches ``lr`` at ``s = warmup - 1`` and
the last update (``s = total - 1``) is within one step of ``min_lr_ratio * lr``.

Expert-table multiplier (``optim.expert_lr_mult_schedule``): the ``experts`` group's multiplier
moves from M = ``expert_lr_mult`` at update 0 to F = ``expert_lr_mult_final`` at the last update,

    mult(s) = F + (M - F) * w(s / (total - 1)),   w(p) = 1 - p (linear) or (1 + cos(pi p)) / 2 (cosine)

on top of the base schedule (UltraMem's decaying value lr); "constant" keeps M throughout.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = ["lr_factor", "expert_mult", "Schedule"]


def lr_factor(step: int, total_steps: int, warmup_steps: int, min_lr_ratio: float) -> float:
    """Multiplier of the base learning rate for 0-based update ``step`` (see the module docstring)."""
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    if total_steps <= 0:
        raise ValueError(f"total_steps must be positive, got {total_steps}")
    if not 0.0 <= min_lr_ratio <= 1.0:
        raise ValueError(f"min_lr_ratio must be in [0, 1], got {min_lr_ratio}")
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def expert_mult(step: int, total_steps: int, start: float, final: float, kind: str = "constant") -> float:
    """The expert-table lr multiplier for 0-based update ``step`` (see the module docstring)."""
    if kind == "constant":
        return start
    p = min(1.0, max(0, step) / max(1, total_steps - 1))
    if kind == "linear":
        w = 1.0 - p
    elif kind == "cosine":
        w = 0.5 * (1.0 + math.cos(math.pi * p))
    else:
        raise ValueError(f"expert lr multiplier schedule must be 'constant', 'linear' or 'cosine', got {kind!r}")
    return final + (start - final) * w


@dataclass
class Schedule:
    """The schedule of one run; :meth:`apply` sets every group's lr to ``lr * factor * group['lr_mult']``
    (the ``experts`` group's multiplier follows :func:`expert_mult`)."""

    lr: float
    total_steps: int
    warmup_steps: int = 0
    min_lr_ratio: float = 0.1
    expert_mult_schedule: str = "constant"
    expert_mult_final: float = 1.0

    @classmethod
    def from_config(cls, optim_cfg, total_steps: int) -> Schedule:
        return cls(
            optim_cfg.lr,
            total_steps,
            optim_cfg.warmup_steps,
            optim_cfg.min_lr_ratio,
            optim_cfg.expert_lr_mult_schedule,
            optim_cfg.expert_lr_mult_final,
        )

    def __call__(self, step: int) -> float:
        """The base learning rate (before group multipliers) for update ``step``."""
        return self.lr * lr_factor(step, self.total_steps, self.warmup_steps, self.min_lr_ratio)

    def apply(self, optimizer: torch.optim.Optimizer, step: int) -> float:
        lr = self(step)
        for group in optimizer.param_groups:
            mult = group.get("lr_mult", 1.0)
            if group.get("name") == "experts":
                mult = expert_mult(step, self.total_steps, mult, self.expert_mult_final, self.expert_mult_schedule)
            group["lr"] = lr * mult
        return lr

    def state_dict(self) -> dict:
        """For the record only (the schedule is a pure function of the step and the config)."""
        return {
            "lr": self.lr,
            "total_steps": self.total_steps,
            "warmup_steps": self.warmup_steps,
            "min_lr_ratio": self.min_lr_ratio,
            "expert_mult_schedule": self.expert_mult_schedule,
            "expert_mult_final": self.expert_mult_final,
        }
