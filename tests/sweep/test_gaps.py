"""Methods across budgets: best recipe per method and what to run next (grid edges, seeds at optimum ±
neighbours: peer.experiments.sweep.select); PEER's gap in nats with its standard error, the gap's trend and
zero crossing (the project's studies.gaps)."""

import math

import pytest

from peer.experiments.sweep.select import best_recipe_results, best_recipes, method_of, next_runs
from studies.gaps import gap_figure, gap_trend, gaps, gaps_markdown


def _run(budget, variant, size, ppl, seed=0, active=100):
    return dict(
        budget=budget,
        variant=variant,
        size=size,
        seed=seed,
        perplexity={"val": ppl, "eval_x": 2 * ppl},
        params_active=active,
        params_total=active,
        run_id=f"{budget:g}/{variant}/{size}/seed{seed}",
    )


def test_method_and_best_recipe():
    assert method_of("moe_lr3e-3") == "moe" and method_of("dense") == "dense"
    rs = [
        _run(1e12, "moe_lr6e-3", "s", 30.0),
        _run(1e12, "moe_lr6e-3", "m", 28.0),
        _run(1e12, "moe_lr3e-3", "s", 27.0),
        _run(1e12, "moe_lr3e-3", "m", 29.0),
        _run(1e12, "dense", "s", 31.0),
    ]
    best = best_recipes(rs)
    assert best[(1e12, "moe")]["variant"] == "moe_lr3e-3" and best[(1e12, "moe")]["size"] == "s"
    assert {r["variant"] for r in best_recipe_results(rs)} == {"moe_lr3e-3", "dense"}  # every size of the winner
    assert len(best_recipe_results(rs)) == 3


def test_gap_is_the_mean_log_difference_with_its_standard_error():
    pe = [20.0, 22.0, 21.0]
    de = [25.0, 24.0]
    rs = [_run(1e12, "peer", "s", p, seed=i) for i, p in enumerate(pe)] + [
        _run(1e12, "dense", "s", p, seed=i) for i, p in enumerate(de)
    ]
    (row,) = gaps(rs, others=("dense",))
    la, lb = [math.log(p) for p in pe], [math.log(p) for p in de]
    ma, mb = sum(la) / 3, sum(lb) / 2
    sa2 = sum((x - ma) ** 2 for x in la) / 2
    sb2 = sum((x - mb) ** 2 for x in lb) / 1
    assert row["gap"] == pytest.approx(ma - mb) and row["gap"] < 0  # PEER better: negative
    assert row["se"] == pytest.approx(math.sqrt(sa2 / 3 + sb2 / 2))
    assert row["n"] == (3, 2)
    one = gaps([_run(1e12, "peer", "s", 20.0), _run(1e12, "dense", "s", 25.0)], others=("dense",))
    assert math.isnan(one[0]["se"])  # one seed each: no standard error
    assert "n/a (1 seed)" in gaps_markdown([_run(1e12, "peer", "s", 20.0), _run(1e12, "dense", "s", 25.0)])


def test_trend_recovers_a_line_and_its_zero_crossing():
    # gap = 0.3 - 0.1 log10(C / 1e12): crosses zero at 1e15
    rows = [dict(budget=b, gap=0.3 - 0.1 * math.log10(b / 1e12), se=0.01) for b in (1e12, 1e13, 1e14)]
    t = gap_trend(rows)
    assert t["weighted"] and t["slope"] == pytest.approx(-0.1) and t["log10_cross"] == pytest.approx(15.0)
    assert 0 < t["slope_se"] < 0.01 and 0 < t["log10_cross_se"] < 0.5
    # larger errors on the points: a larger uncertainty on the crossing
    wide = gap_trend([dict(r, se=0.05) for r in rows])
    assert wide["log10_cross_se"] > t["log10_cross_se"]
    # without seeds: unweighted; two points leave the error unknown, three give it from the residuals
    t2 = gap_trend([dict(r, se=math.nan) for r in rows[:2]])
    assert not t2["weighted"] and math.isnan(t2["slope_se"]) and t2["log10_cross"] == pytest.approx(15.0)
    noisy = [
        dict(rows[0], se=math.nan),
        dict(rows[1], gap=rows[1]["gap"] + 0.02, se=math.nan),
        dict(rows[2], se=math.nan),
    ]
    assert gap_trend(noisy)["slope_se"] > 0
    assert gap_trend(rows[:1]) is None


def test_the_report_says_where_the_zero_crossing_lies():
    """A crossing beyond the budgets is an extrapolation; one below them means the gap moves away
    from zero as the budget grows (PEER ahead and pulling away, or behind and falling further)."""

    def md(g1, g2):
        rs = []
        for b, g in ((1e12, g1), (1e13, g2)):
            rs += [_run(b, "peer", "s", 20 * math.exp(g), seed=s) for s in range(2)]
            rs += [_run(b, "dense", "s", 20.0 * (1 + 0.01 * s), seed=s) for s in range(2)]
        return gaps_markdown(rs, others=("dense",))

    assert "beyond the budgets measured (extrapolated)" in md(0.2, 0.1)  # behind, closing: crosses at ~1e14
    assert "no crossing ahead" in md(-0.1, -0.2)  # ahead and pulling away
    assert "within the budgets measured" in md(0.1, -0.1)
    assert "not resolved: the slope is within 2 se of zero" in md(
        -0.1, -0.101
    )  # flat within its errors: no crossing placed


def test_next_runs_extends_edges_and_seeds_only_bracketed_optima():
    sizes = [(100, "s"), (200, "m"), (300, "l"), (400, "xl")]
    rs = [_run(1e12, "dense", n, p, active=a) for (a, n), p in zip(sizes, [30.0, 25.0, 27.0, 29.0], strict=True)]
    rs += [_run(1e12, "peer", n, p, active=a) for (a, n), p in zip(sizes[:3], [20.0, 22.0, 24.0], strict=True)]
    rs += [_run(1e12, "moe", n, p, active=a) for (a, n), p in zip(sizes[:2], [30.0, 26.0], strict=True)]
    rs.append(_run(1e12, "dense", "m", 25.5, seed=1, active=200))
    nxt = next_runs(rs, {(1e12, v): sizes for v in ("dense", "peer", "moe")})
    assert nxt["edges"] == [
        dict(budget=1e12, method="moe", variant="moe", size="m", side="largest", next_size="l"),
        dict(budget=1e12, method="peer", variant="peer", size="s", side="smallest", next_size=None),
    ]
    assert nxt["extend_runs"] == [dict(budget=1e12, variant="moe", size="l", seed=0)]  # peer: the grid ends at s
    dense = {(r["size"], r["seed"]) for r in nxt["seed_runs"] if r["variant"] == "dense"}
    assert dense == {("s", 1), ("s", 2), ("m", 2), ("l", 1), ("l", 2)}  # m seed 1 is done; xl is no neighbour
    assert {r["variant"] for r in nxt["seed_runs"]} == {"dense"}  # edge optima get no seeds yet


def test_next_runs_brackets_a_single_size_on_both_sides():
    sizes = [(100, "s"), (200, "m"), (300, "l")]
    nxt = next_runs([_run(1e12, "peer", "m", 20.0, active=200)], {(1e12, "peer"): sizes})
    assert [(e["side"], e["next_size"]) for e in nxt["edges"]] == [("smallest", "s"), ("largest", "l")]
    assert {r["size"] for r in nxt["extend_runs"]} == {"s", "l"} and nxt["seed_runs"] == []


def test_gap_figure(tmp_path):
    rs = []
    for b, g in ((1e12, 0.2), (1e13, 0.1), (1e14, 0.0)):
        for s in range(2):
            rs += [
                _run(b, "peer", "s", 20 * math.exp(g) * (1 + 0.01 * s), seed=s),
                _run(b, "dense", "s", 20.0 * (1 + 0.01 * s), seed=s),
            ]
    out = tmp_path / "g.png"
    series = gap_figure(rs, out, others=("dense", "moe"))
    assert out.stat().st_size > 1000 and set(series) == {"dense"}
    assert [round(g, 6) for _, g, _ in series["dense"]] == [0.2, 0.1, 0.0]


def test_fig1_shows_each_methods_best_recipe_and_every_ablation_arm():
    from peer.experiments.sweep.select import headline_results

    runs = [
        _run(1e12, "dense", "s", 10.0),
        _run(1e12, "dense_lr2e-2", "s", 9.0),
        _run(1e12, "dense_lr2e-2", "m", 9.5),
        _run(1e12, "peer", "s", 8.0),
        _run(1e12, "peer_lr1e-2", "s", 8.5),
        _run(3e12, "dense", "s", 7.0),
        _run(3e12, "dense_lr2e-2", "s", 7.5),
        _run(1e12, "n64sq", "s", 12.0),
        _run(1e12, "n64sq_nobn", "s", 13.0),
    ]
    shown = {(r["budget"], r["variant"], r["size"]) for r in headline_results(runs)}
    assert shown == {
        (1e12, "dense_lr2e-2", "s"),
        (1e12, "dense_lr2e-2", "m"),
        (1e12, "peer", "s"),
        (3e12, "dense", "s"),
        (1e12, "n64sq", "s"),
        (1e12, "n64sq_nobn", "s"),
    }


def test_summary_row_per_budget_with_each_methods_best_and_peers_lead():
    from studies.report import summary_markdown

    runs = [_run(1e12, "peer", "s", 100.0 * f, seed=i) for i, f in enumerate((1.0, 1.02, 0.98))]
    runs += [_run(1e12, "dense_lr2e-2", "s", 110.0 * f, seed=i) for i, f in enumerate((1.0, 1.01, 0.99))]
    runs += [_run(1e12, "dense", "s", 130.0), _run(3e12, "peer", "m", 90.0), _run(3e12, "dense", "m", 80.0)]
    rows = summary_markdown(runs, "peer", ("dense", "moe")).splitlines()
    assert rows[0] == "| budget | peer | dense | moe | peer's lead over dense / moe (nats ± se) |"
    r1, r3 = rows[2].split(" | "), rows[3].split(" | ")
    assert r1[2].endswith("(3) dense_lr2e-2/s") and r1[3] == "-"  # dense's best recipe; no MoE run
    lead = math.log(110.0) - math.log(
        100.0
    )  # the seed means of ln ppl (symmetric factors: about the logs of 110 and 100)
    assert abs(float(r1[4].split(" ± ")[0]) - lead) < 2e-3 and float(r1[4].split(" ± ")[1].split(" /")[0]) > 0
    assert r3[4].startswith(
        f"{math.log(80.0) - math.log(90.0):+.3f} ± n/a"
    )  # PEER behind: a negative lead; 1 seed each


def test_trend_errors_grow_when_the_points_are_not_on_a_line():
    """Three budgets whose gaps scatter about the line far more than their standard errors: chi²/dof > 1
    and the slope's error is the unscaled one times sqrt(chi²/dof); points on the line keep their errors."""
    import numpy as np

    on = [dict(budget=b, gap=g, se=0.01) for b, g in ((1e12, 0.10), (1e13, 0.05), (1e14, 0.0))]
    t = gap_trend(on)
    assert t["chi2_dof"] == pytest.approx(0.0, abs=1e-12)
    assert t["slope_se"] == pytest.approx(0.01 / math.sqrt(2))  # sqrt(1 / sum w (x - mean x)^2): unscaled
    off = [dict(r, gap=r["gap"] + d) for r, d in zip(on, (0.0, 0.05, 0.0), strict=True)]
    t2 = gap_trend(off)
    x, y = np.array([12.0, 13.0, 14.0]), np.array([r["gap"] for r in off])
    resid = y - np.polyval(np.polyfit(x, y, 1), x)
    chi2 = float(resid @ resid) / 0.01**2
    assert t2["chi2_dof"] == pytest.approx(chi2 / 1) and t2["chi2_dof"] > 1
    assert t2["slope_se"] == pytest.approx(0.01 / math.sqrt(2) * math.sqrt(chi2))
    assert "chi²/dof" in gaps_markdown(
        [
            _run(b, v, "s", 20 * math.exp(g if v == "peer" else 0) * (1 + 0.01 * s), seed=s)
            for b, g in ((1e12, 0.1), (1e13, 0.15), (1e14, 0.0))
            for v in ("peer", "dense")
            for s in range(2)
        ],
        others=("dense",),
    )


def test_next_runs_gives_every_seed_to_fixed_size_arms_and_brackets_none():
    one = [(200, "m")]  # an ablation: every arm planned at one size
    rs = [
        _run(1e13, "peer", "m", 20.0, active=200),
        _run(1e13, "nobn", "m", 22.0, active=200),
        _run(1e13, "n64sq", "m", 21.0, active=200),
        _run(1e13, "peer", "m", 20.5, seed=1, active=200),
    ]
    nxt = next_runs(rs, {(1e13, v): one for v in ("peer", "nobn", "n64sq")}, arm_seeds=(0, 1))
    assert nxt["edges"] == [] and nxt["extend_runs"] == []  # one planned size: nothing to bracket
    assert {(r["variant"], r["seed"]) for r in nxt["seed_runs"]} == {
        ("nobn", 1),
        ("n64sq", 1),
    }  # every arm, not only the best
    mixed = next_runs(rs[:1], {(1e13, "peer"): [(100, "s"), (200, "m")], (1e13, "nobn"): one}, arm_seeds=(0,))
    assert [(e["variant"], e["side"]) for e in mixed["edges"]] == [("peer", "smallest"), ("peer", "largest")]
    assert mixed["extend_runs"] == [dict(budget=1e13, variant="peer", size="s", seed=0)]  # a size grid still brackets
    assert mixed["seed_runs"] == [dict(budget=1e13, variant="nobn", size="m", seed=0)]
