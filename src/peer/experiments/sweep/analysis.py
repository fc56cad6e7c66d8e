"""Compute-optimal selection and the paper's tables from sweep results (pure functions, no plotting).

Seeds: the runs of one (budget, variant, size) point with different ``train.seed`` are first
merged by :func:`aggregate` into one point whose ``perplexity`` is the mean over seeds, with
``perplexity_std`` (sample std, ddof=1; NaN for one seed) and ``n``. Compute-optimal points are
chosen on that mean; every table prints ``mean ± std (n)``.
"""

from __future__ import annotations

import math
import statistics

from ...metrics import mean_std
from .plan import budget_label

__all__ = [
    "aggregate",
    "compute_optimal",
    "table1_markdown",
    "ablation_markdown",
    "points_markdown",
    "method_ordering",
    "fmt_ppl",
]


def _point_key(r: dict) -> tuple:
    return (r["budget"], r["variant"], r["size"])


def aggregate(results: list[dict]) -> list[dict]:
    """One entry per (budget, variant, size): ``perplexity`` = mean over its seeds, ``perplexity_std``,
    ``n``, ``seeds``, and expert usage/unevenness averaged per layer. Already aggregated entries pass through."""
    groups: dict[tuple, list[dict]] = {}
    for r in results:
        groups.setdefault(_point_key(r), []).append(r)
    out = []
    for runs in groups.values():
        if len(runs) == 1 and "n" in runs[0]:
            out.append(runs[0])
            continue
        runs = sorted(runs, key=lambda r: r.get("seed", 0))
        sets = sorted({s for r in runs for s in r.get("perplexity", {})})
        mean, std, n = {}, {}, {}
        for s in sets:
            vals = [r["perplexity"][s] for r in runs if s in r.get("perplexity", {})]
            mean[s], std[s], n[s] = mean_std(vals)
        experts = {}
        for layer in sorted({name for r in runs for name in (r.get("experts") or {})}):
            es = [r["experts"][layer] for r in runs if layer in (r.get("experts") or {})]
            experts[layer] = {
                k: statistics.fmean(e[k] for e in es) for k in ("usage", "unevenness") if all(k in e for e in es)
            }
        point = dict(runs[0])
        point.update(
            perplexity=mean,
            perplexity_std=std,
            n=n,
            seeds=[r.get("seed", 0) for r in runs],
            experts=experts,
            runs=[r.get("run_id") for r in runs],
            train_seconds=statistics.fmean(r.get("train_seconds", 0.0) for r in runs),
        )
        point.pop("eval", None)
        out.append(point)
    return out


def fmt_ppl(point: dict, s: str) -> str:
    """``mean ± std (n)`` of a point's perplexity on set ``s`` (``-`` when missing)."""
    p = point.get("perplexity", {}).get(s)
    if p is None:
        return "-"
    n = point.get("n", {}).get(s, 1)
    sd = point.get("perplexity_std", {}).get(s, 0.0)
    return f"{p:.2f} ± {sd:.2f} ({n})" if n > 1 else f"{p:.2f} (1)"


def compute_optimal(results: list[dict], metric_set: str = "val") -> dict[tuple[float, str], dict]:
    """For each (budget, variant), the point (size) with the lowest mean perplexity over seeds on
    ``metric_set`` (the paper's compute-optimal model at that budget). Points without that set, or
    with a non-finite value, are ignored."""
    best: dict[tuple[float, str], dict] = {}
    for r in aggregate(results):
        ppl = r.get("perplexity", {}).get(metric_set)
        if ppl is None or not math.isfinite(ppl):
            continue
        key = (r["budget"], r["variant"])
        if key not in best or ppl < best[key]["perplexity"][metric_set]:
            best[key] = r
    return best


def method_ordering(results: list[dict], metric_set: str = "val") -> dict[float, dict[str, list[str]]]:
    """budget -> eval set -> variants ordered best first (by the compute-optimal model chosen on ``metric_set``)."""
    best = compute_optimal(results, metric_set)
    out: dict[float, dict[str, list[str]]] = {}
    for budget in sorted({b for b, _ in best}):
        runs = {v: r for (b, v), r in best.items() if b == budget}
        sets = sorted({s for r in runs.values() for s in r["perplexity"]})
        out[budget] = {
            s: sorted((v for v in runs if s in runs[v]["perplexity"]), key=lambda v: runs[v]["perplexity"][s])
            for s in sets
        }
    return out


def table1_markdown(results: list[dict], metric_set: str = "val", order: list[str] | None = None) -> str:
    """The paper's Table 1: perplexity of each method's compute-optimal model per budget, every eval set."""
    best = compute_optimal(results, metric_set)
    if not best:
        return "_no finished runs_\n"
    sets = sorted({s for r in best.values() for s in r["perplexity"]}, key=lambda s: (s != metric_set, s))
    variants = order or sorted({v for _, v in best})
    lines = ["| budget | method | size (active params) | " + " | ".join(sets) + " |", "|---" * (3 + len(sets)) + "|"]
    for budget in sorted({b for b, _ in best}):
        cols = {
            s: min(
                (best[(budget, v)]["perplexity"].get(s, math.inf) for v in variants if (budget, v) in best),
                default=math.inf,
            )
            for s in sets
        }
        for v in variants:
            r = best.get((budget, v))
            if r is None:
                continue
            cells = []
            for s in sets:
                p = r["perplexity"].get(s)
                txt = fmt_ppl(r, s)
                cells.append(f"**{txt}**" if p is not None and p == cols[s] else txt)
            lines.append(
                f"| {budget_label(budget)} | {v} | {r['size']} ({r['params_active']:,}) | " + " | ".join(cells) + " |"
            )
    return "\n".join(lines) + "\n"


def _expert_cells(point: dict) -> tuple[str, str]:
    """Expert usage % and unevenness of each sparse layer of a point, comma-separated (``-``: none)."""
    ex = list((point.get("experts") or {}).values())
    usage = ", ".join(f"{100 * e['usage']:.1f}" for e in ex if "usage" in e) or "-"
    uneven = ", ".join(f"{e['unevenness']:.2f}" for e in ex if "unevenness" in e) or "-"
    return usage, uneven


def ablation_markdown(results: list[dict], metric_set: str = "val") -> str:
    """One row per variant (best size per budget): perplexity, and expert usage/unevenness per sparse layer."""
    best = compute_optimal(results, metric_set)
    lines = [
        "| budget | variant | size | ppl (" + metric_set + "), mean ± std (seeds) | usage % | unevenness |",
        "|---|---|---|---|---|---|",
    ]
    for (budget, v), r in sorted(best.items(), key=lambda kv: (kv[0][0], kv[0][1])):
        usage, uneven = _expert_cells(r)
        lines.append(f"| {budget_label(budget)} | {v} | {r['size']} | {fmt_ppl(r, metric_set)} | {usage} | {uneven} |")
    return "\n".join(lines) + "\n"


def points_markdown(results: list[dict], metric_set: str = "val") -> str:
    """Every point of the grid, one row each (budget, variant, size ascending): steps, ``mean ± std (n)``
    on ``metric_set``, expert usage of the sparse layer and mean training seconds per run; the
    compute-optimal size of each (budget, variant) in bold."""
    points = sorted(aggregate(results), key=lambda r: (r["budget"], r["variant"], r.get("params_active", 0)))
    best = {id(r) for r in compute_optimal(points, metric_set).values()}  # aggregated points pass through as they are
    lines = [
        f"| budget | variant | size (active params) | steps | ppl ({metric_set}), mean ± std (seeds) | usage % | train s |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in points:
        txt = fmt_ppl(r, metric_set)
        usage, _ = _expert_cells(r)
        lines.append(
            f"| {budget_label(r['budget'])} | {r['variant']} | {r['size']} ({r.get('params_active', 0):,}) | "
            f"{r.get('steps', '-')} | {f'**{txt}**' if id(r) in best else txt} | {usage} | "
            f"{r.get('train_seconds', 0.0):.0f} |"
        )
    return "\n".join(lines) + "\n"
