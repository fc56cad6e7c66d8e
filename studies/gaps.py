"""PEER's gap to the other methods across budgets, its trend and where it would cross zero (the project's
study statistics; not part of the installed package). Each method is its best recipe's compute-optimal
point per budget (:mod:`peer.experiments.sweep.select`).

Gaps are in nats of the metric set: ``ln ppl(PEER) - ln ppl(other)`` from the per-seed runs of the
two compute-optimal points (mean over seeds of ln ppl), with the standard error
``sqrt(s_a^2 / n_a + s_b^2 / n_b)`` (sample std over seeds; undefined with one seed). The trend is
a straight line in log10(budget), weighted by 1 / se^2 when every point has a standard error
(otherwise unweighted, its uncertainty from the residuals), its errors scaled up by sqrt(chi^2/dof)
when the points scatter about the line more than their errors allow; where it crosses zero, with
the delta-method standard error of the crossing.
"""

from __future__ import annotations

import math
from pathlib import Path

from peer.experiments.sweep.plan import budget_label
from peer.experiments.sweep.select import best_recipes
from peer.metrics import mean_std

__all__ = ["gaps", "gap_trend", "gaps_markdown", "gap_figure"]


def _seed_logs(results: list[dict], point: dict, metric_set: str) -> list[float]:
    return [
        math.log(r["perplexity"][metric_set])
        for r in results
        if (r["budget"], r["variant"], r["size"]) == (point["budget"], point["variant"], point["size"])
        and metric_set in r.get("perplexity", {})
    ]


def _mean_sd(xs: list[float]) -> tuple[float, float]:
    return mean_std(xs)[:2]


def gaps(
    results: list[dict],
    method: str = "peer",
    others: tuple[str, ...] = ("dense", "moe"),
    metric_set: str = "val",
    sets: list[str] | None = None,
) -> list[dict]:
    """One row per (budget, other method, eval set): the gap of ``method``'s best recipe to the other's,
    in nats (negative: ``method`` is better), with its standard error and the two points."""
    best = best_recipes(results, metric_set)
    rows = []
    for budget in sorted({b for b, _ in best}):
        a = best.get((budget, method))
        if a is None:
            continue
        for other in others:
            b = best.get((budget, other))
            if b is None:
                continue
            for s in sets or [metric_set]:
                la, lb = _seed_logs(results, a, s), _seed_logs(results, b, s)
                if not la or not lb:
                    continue
                (ma, sa), (mb, sb) = _mean_sd(la), _mean_sd(lb)
                se = math.sqrt(sa**2 / len(la) + sb**2 / len(lb))
                rows.append(
                    dict(
                        budget=budget,
                        method=method,
                        other=other,
                        set=s,
                        gap=ma - mb,
                        se=se,
                        n=(len(la), len(lb)),
                        std=(sa, sb),
                        ppl=(math.exp(ma), math.exp(mb)),
                        points=(f"{a['variant']}/{a['size']}", f"{b['variant']}/{b['size']}"),
                    )
                )
    return rows


def gap_trend(rows: list[dict]) -> dict | None:
    """Fit gap = a + b log10(budget) over ``rows`` (one other method, one set). Returns the slope per
    decade with its standard error, the fitted gap at each budget, and the budget where the line
    crosses zero (``log10_cross`` ± ``log10_cross_se``; None when the slope is zero). None below 2 budgets.
    Weighted by 1 / se^2 when every row has a standard error; then ``chi2_dof`` is the fit's chi^2 per degree
    of freedom (NaN with two budgets) and, when above 1, the errors are scaled by its square root."""
    import numpy as np

    if len(rows) < 2:
        return None
    x = np.log10([r["budget"] for r in rows])
    y = np.array([r["gap"] for r in rows])
    se = np.array([r["se"] for r in rows])
    weighted = bool(np.all(np.isfinite(se)) and np.all(se > 0))
    w = 1.0 / se**2 if weighted else np.ones_like(y)
    X = np.stack([np.ones_like(x), x], 1)
    A = X.T @ (w[:, None] * X)
    coef = np.linalg.solve(A, X.T @ (w * y))
    resid = y - X @ coef
    dof = len(y) - 2
    chi2_dof = float((w * resid) @ resid) / dof if weighted and dof > 0 else math.nan
    if weighted:
        # Points off the line by more than their errors (chi^2/dof > 1): the line does not describe them
        # within their errors, so its uncertainties are scaled up by sqrt(chi^2/dof) (the Birge ratio),
        # never down.
        cov = np.linalg.inv(A) * (max(1.0, chi2_dof) if math.isfinite(chi2_dof) else 1.0)
    elif dof > 0:
        cov = np.linalg.inv(A) * float(resid @ resid) / dof
    else:
        cov = np.full((2, 2), np.nan)  # two points, no seeds: the line is exact and its error unknown
    a, b = float(coef[0]), float(coef[1])
    out = dict(
        intercept=a,
        slope=b,
        slope_se=float(math.sqrt(cov[1, 1])) if np.isfinite(cov[1, 1]) else math.nan,
        weighted=weighted,
        chi2_dof=chi2_dof,
        fitted={float(r["budget"]): float(f) for r, f in zip(rows, X @ coef, strict=True)},
        log10_cross=None,
        log10_cross_se=None,
    )
    if b != 0:
        c = -a / b
        g = np.array([-1.0 / b, a / b**2])  # d c / d (a, b)
        var = float(g @ cov @ g)
        out.update(log10_cross=c, log10_cross_se=math.sqrt(var) if np.isfinite(var) and var >= 0 else math.nan)
    return out


def _where(log10_cross: float, log10_budgets: list[float]) -> str:
    """Where the fitted line's zero lies relative to the budgets it was fitted on."""
    lo, hi = min(log10_budgets), max(log10_budgets)
    if log10_cross > hi:
        return ", beyond the budgets measured (extrapolated)"
    if log10_cross >= lo:
        return ", within the budgets measured"
    return ", below the budgets measured: at larger budgets the line moves away from zero (no crossing ahead)"


def _crossing(t: dict, rows: list[dict]) -> str:
    """Where the fitted line crosses zero, with its uncertainty; a slope within 2 standard errors of zero places
    no crossing (the line may as well be flat), and one whose position is uncertain by more than a decade is not printed."""
    where = _where(t["log10_cross"], [math.log10(r["budget"]) for r in rows])
    se = t["log10_cross_se"]
    at = f"10^{t['log10_cross']:.2f} = {10 ** t['log10_cross']:.1e} FLOPs" + (
        f" (log10 ± {se:.2f})" if se is not None and math.isfinite(se) else " (uncertainty unknown)"
    )
    if math.isfinite(t["slope_se"]) and abs(t["slope"]) < 2 * t["slope_se"]:
        resolved = se is not None and math.isfinite(se) and se <= 1.0
        return "not resolved: the slope is within 2 se of zero" + (
            f" (the fitted line crosses at {at}{where})" if resolved else ""
        )
    return at + where


def _fmt_se(x: float) -> str:
    return "n/a (1 seed)" if not math.isfinite(x) else f"{x:.3f}"


def gaps_markdown(
    results: list[dict],
    method: str = "peer",
    others: tuple[str, ...] = ("dense", "moe"),
    metric_set: str = "val",
    sets: list[str] | None = None,
) -> str:
    """The gap table (every budget, other method and set) and, per other method on the metric set, its trend."""
    rows = gaps(results, method, others, metric_set, sets)
    if not rows:
        return "_no budget has both methods yet_\n"
    lines = [
        f"| budget | {method} vs | set | {method} | other | gap (nats) | se | gap / se | seeds |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        z = r["gap"] / r["se"] if math.isfinite(r["se"]) and r["se"] > 0 else math.nan
        lines.append(
            f"| {budget_label(r['budget'])} | {r['other']} ({r['points'][1]}) | {r['set']} | {r['ppl'][0]:.2f} "
            f"| {r['ppl'][1]:.2f} | {r['gap']:+.3f} | {_fmt_se(r['se'])} | "
            f"{'-' if not math.isfinite(z) else f'{z:+.1f}'} | {r['n'][0]}, {r['n'][1]} |"
        )
    lines.append("")
    for other in others:
        sub = [r for r in rows if r["other"] == other and r["set"] == metric_set]
        t = gap_trend(sub)
        if t is None:
            continue
        cross = "never (flat)" if t["log10_cross"] is None else _crossing(t, sub)
        lines.append(
            f"- {method} vs {other} on {metric_set}: gap {t['slope']:+.3f} nats per decade of budget"
            f" (± {_fmt_se(t['slope_se'])}, {'weighted by seeds' if t['weighted'] else 'unweighted'},"
            + (
                f" chi²/dof {t['chi2_dof']:.1f}{' (errors scaled by its root)' if t['chi2_dof'] > 1 else ''},"
                if math.isfinite(t["chi2_dof"])
                else ""
            )
            + f" {len(sub)} budgets); zero crossing {cross}"
        )
    return "\n".join(lines) + "\n"


def gap_figure(
    results: list[dict],
    out: Path,
    method: str = "peer",
    others: tuple[str, ...] = ("dense", "moe"),
    metric_set: str = "val",
) -> dict:
    """PEER's gap to each other method (nats of ``metric_set``, ± one standard error over seeds) against
    the budget, with the fitted trend line. Returns {other: [(budget, gap, se)]} for checking."""
    import math

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = gaps(results, method, others, metric_set)
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    series = {}
    for other in others:
        sub = [r for r in rows if r["other"] == other]
        if not sub:
            continue
        pts = [(r["budget"], r["gap"], r["se"]) for r in sub]
        series[other] = pts
        xs, ys, ses = zip(*pts, strict=True)
        yerr = [s if math.isfinite(s) else 0.0 for s in ses]
        line = ax.errorbar(xs, ys, yerr=yerr if any(yerr) else None, fmt="o", capsize=3, label=f"{method} - {other}")
        t = gap_trend(sub)
        if t is not None:
            lo, hi = math.log10(min(xs)), math.log10(max(xs))
            gx = [10 ** (lo + (hi - lo) * i / 20) for i in range(21)]
            ax.plot(
                gx,
                [t["intercept"] + t["slope"] * math.log10(g) for g in gx],
                "--",
                color=line[0].get_color(),
                alpha=0.7,
                label=f"trend {t['slope']:+.3f} / decade",
            )
    ax.axhline(0.0, color="k", lw=0.8)
    ax.set_xscale("log")
    ax.set_xlabel("training FLOPs")
    ax.set_ylabel(f"ln ppl gap ({metric_set}), nats")
    ax.set_title(f"{method} vs the others at each budget's optimum (< 0: {method} better)", fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return series
