"""Warmup + cosine schedule: values against hand-computed numbers, and group multipliers."""

import math

import pytest
import torch

from peer.train.schedule import Schedule, lr_factor


def test_warmup_is_linear_and_reaches_one():
    # warmup 4: updates 0..3 use 1/4, 2/4, 3/4, 4/4
    assert [lr_factor(s, 20, 4, 0.1) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]


def test_cosine_values():
    total, warm, r = 14, 4, 0.1  # 10 cosine steps after warmup
    assert lr_factor(4, total, warm, r) == pytest.approx(1.0)  # p = 0
    assert lr_factor(9, total, warm, r) == pytest.approx(r + (1 - r) * 0.5)  # p = 1/2 -> midpoint 0.55
    assert lr_factor(6, total, warm, r) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.2)))
    assert lr_factor(14, total, warm, r) == pytest.approx(r)  # p = 1
    assert lr_factor(1000, total, warm, r) == pytest.approx(r)  # stays at the floor past the end


def test_monotone_after_warmup_and_no_warmup_starts_at_one():
    f = [lr_factor(s, 50, 0, 0.0) for s in range(60)]
    assert f[0] == 1.0
    assert all(a >= b for a, b in zip(f, f[1:]))
    assert f[50] == pytest.approx(0.0)


def test_bad_arguments():
    with pytest.raises(ValueError, match="step"):
        lr_factor(-1, 10, 2, 0.1)
    with pytest.raises(ValueError, match="total_steps"):
        lr_factor(0, 0, 2, 0.1)
    with pytest.raises(ValueError, match="min_lr_ratio"):
        lr_factor(0, 10, 2, 1.5)


def test_apply_uses_group_multipliers():
    a, b = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.AdamW([{"params": [a], "lr_mult": 1.0}, {"params": [b], "lr_mult": 10.0}], lr=1.0)
    sched = Schedule(lr=2e-3, total_steps=14, warmup_steps=4, min_lr_ratio=0.1)
    lr = sched.apply(opt, 9)
    assert lr == pytest.approx(2e-3 * 0.55)
    assert opt.param_groups[0]["lr"] == pytest.approx(2e-3 * 0.55)
    assert opt.param_groups[1]["lr"] == pytest.approx(2e-2 * 0.55)
