"""Warmup + cosine schedule: values against hand-computed numbers, and group multipliers."""

import itertools
import math

import pytest
import torch

from peer.train.schedule import Schedule, expert_mult, lr_factor


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
    assert all(a >= b for a, b in itertools.pairwise(f))
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


@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_expert_multiplier_decays_from_start_to_final(kind):
    vals = [expert_mult(s, 11, 10.0, 1.0, kind) for s in range(11)]
    assert vals[0] == 10.0 and math.isclose(vals[-1], 1.0)
    assert all(a > b for a, b in itertools.pairwise(vals))  # strictly decreasing
    mid = 5.5 if kind == "linear" else 5.5  # both pass the midpoint at half the run
    assert math.isclose(vals[5], mid)
    if kind == "cosine":
        assert vals[1] > 1.0 + 9.0 * 0.9  # cosine stays high longer than linear at the start
    assert expert_mult(3, 11, 10.0, 1.0, "constant") == 10.0


def test_apply_decays_only_the_expert_group():
    from peer.config import load_config

    cfg = load_config(
        None,
        [
            "optim.expert_lr_mult=8",
            "optim.expert_lr_mult_schedule=linear",
            "optim.expert_lr_mult_final=2",
            "optim.key_lr_mult=3",
            "optim.warmup_steps=0",
            "optim.min_lr_ratio=1.0",
            "optim.lr=0.1",
        ],
    )
    p = [torch.nn.Parameter(torch.zeros(2)) for _ in range(3)]
    opt = torch.optim.AdamW(
        [
            {"params": [p[0]], "name": "experts", "lr_mult": 8.0},
            {"params": [p[1]], "name": "keys", "lr_mult": 3.0},
            {"params": [p[2]], "name": "decay", "lr_mult": 1.0},
        ]
    )
    sched = Schedule.from_config(cfg.optim, 5)
    lrs = []
    for step in range(5):
        sched.apply(opt, step)
        lrs.append([g["lr"] for g in opt.param_groups])
    assert [round(r[0], 6) for r in lrs] == [0.8, 0.65, 0.5, 0.35, 0.2]
    assert all(math.isclose(r[1], 0.3) and math.isclose(r[2], 0.1) for r in lrs)
