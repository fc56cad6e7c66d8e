"""studies.retrievals: the slope, the crossover extrapolation and the knowledge-study law, on made-up numbers
whose answers are known."""

from __future__ import annotations

import math

import numpy as np
import pytest

from studies import retrievals as R


def test_a_weighted_line_through_the_origin_recovers_its_slope():
    s, se = R.slope_through_origin([0.5, 1.0, 2.0], [1.0, 2.0, 4.0], [0.1, 0.1, 0.2])
    assert s == pytest.approx(2.0) and se == pytest.approx(1 / math.sqrt(25 + 100 + 100))
    assert math.isnan(R.slope_through_origin([1.0], [1.0], [math.nan])[0])  # no spread: no slope


def test_the_crossover_is_where_a_shrinking_gap_reaches_zero():
    c = R.crossover_budget(1e12, 0.04, 1e-6, 1e13, 0.02, 1e-6)  # halves per decade: zero one decade later
    assert c["budget"] == pytest.approx(1e14, rel=1e-6) and c["median"] == pytest.approx(1e14, rel=1e-3)
    assert c["never"] == 0.0 and c["ci95"][0] < 1e14 < c["ci95"][1]
    grows = R.crossover_budget(1e12, 0.02, 1e-6, 1e13, 0.04, 1e-6)
    assert grows["budget"] == math.inf and grows["never"] == 1.0
    noisy = R.crossover_budget(1e12, 0.04, 0.02, 1e13, 0.02, 0.02)  # the seeds cannot tell: wide, some "never"
    assert 0.05 < noisy["never"] < 0.5 and noisy["ci68"][1] > 10 * noisy["ci68"][0]


def _point(values, r):
    return {"mean": float(np.mean(values)), "std": float(np.std(values, ddof=1)), "values": values,
            "retrievals_per_expert": r}  # fmt: skip


def _summary(slopes: dict[str, float]) -> dict:
    """Text loss = 5 + slope * log10(R_256 / R) (+ a ±0.001 seed wobble) at two budgets; tokens 3.3x apart."""
    points: dict = {}
    for b, slope in slopes.items():
        tokens = 1e6 * float(b) / 3e12
        pts = {}
        for m, n in R.KNOWLEDGE_POOLS.items():
            r, r256 = tokens * 32 / n, tokens * 32 / 256**2
            y = 5 + slope * math.log10(r256 / r) if n > 256**2 else 5.0
            p = _point([y - 0.001, y + 0.001], r)
            pts[m] = {"text_loss": p, "val_loss": p, "bits": p, "retrievals_per_expert": r}
        points[b] = {"mix": pts, "f32k": pts}
    return {"points": points}


def test_the_knowledge_law_finds_the_slopes_and_tests_that_one_fits_both_budgets():
    same = R.knowledge_law(_summary({"3e12": 0.03, "1e13": 0.03}))
    text = same["metrics"]["mix/text_loss"]
    assert text["budgets"]["3e12"]["slope"] == pytest.approx(0.03) and text["budgets"]["1e13"][
        "slope"
    ] == pytest.approx(0.03)
    assert abs(text["slope_difference_z"]) < 1e-6
    rows = {r["method"]: r for r in text["budgets"]["3e12"]["rows"]}
    assert rows["peer1024"]["x"] == pytest.approx(math.log10(16)) and rows["peer1024"]["gap"] == pytest.approx(
        0.03 * math.log10(16)
    )
    # the same slope at both budgets: the 1024² − 256² gap does not shrink, so no crossover is predicted
    assert same["text_crossover_1024_vs_256"]["budget"] == math.inf
    apart = R.knowledge_law(_summary({"3e12": 0.03, "1e13": 0.01}))
    assert apart["metrics"]["mix/text_loss"]["slope_difference_z"] < -10  # seeds agree to 0.001: clearly two slopes
    c = apart["text_crossover_1024_vs_256"]  # gap 0.0361 -> 0.0120 over log10(10/3) decades: zero ~0.55 decade on
    lo, hi = math.log10(3e12), math.log10(1e13)
    g1, g2 = 0.03 * math.log10(16), 0.01 * math.log10(16)
    assert c["budget"] == pytest.approx(10 ** (hi - g2 / ((g2 - g1) / (hi - lo))))
    assert "1024² − 256² text-loss gap reaches 0" in R.knowledge_markdown(apart)
