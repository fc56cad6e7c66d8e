"""Compute-optimal selection and the paper's tables from sweep results (pure functions, no plotting)."""

from __future__ import annotations

import math

__all__ = ["compute_optimal", "table1_markdown", "ablation_markdown", "method_ordering"]


def compute_optimal(results: list[dict], metric_set: str = "val") -> dict[tuple[float, str], dict]:
    """For each (budget, variant), the run with the lowest perplexity on ``metric_set`` (the paper's
    compute-optimal model at that budget). Runs without that set, or with a non-finite value, are ignored."""
    best: dict[tuple[float, str], dict] = {}
    for r in results:
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
        out[budget] = {s: sorted((v for v in runs if s in runs[v]["perplexity"]), key=lambda v: runs[v]["perplexity"][s])
                       for s in sets}
    return out


def _fmt_budget(b: float) -> str:
    m, e = f"{b:.1e}".split("e")
    return f"{m.rstrip('0').rstrip('.')}e{int(e)}"


def table1_markdown(results: list[dict], metric_set: str = "val", order: list[str] | None = None) -> str:
    """The paper's Table 1: perplexity of each method's compute-optimal model per budget, every eval set."""
    best = compute_optimal(results, metric_set)
    if not best:
        return "_no finished runs_\n"
    sets = sorted({s for r in best.values() for s in r["perplexity"]}, key=lambda s: (s != metric_set, s))
    variants = order or sorted({v for _, v in best})
    lines = ["| budget | method | size (active params) | " + " | ".join(sets) + " |",
             "|---" * (3 + len(sets)) + "|"]
    for budget in sorted({b for b, _ in best}):
        cols = {s: min((best[(budget, v)]["perplexity"].get(s, math.inf) for v in variants if (budget, v) in best),
                       default=math.inf) for s in sets}
        for v in variants:
            r = best.get((budget, v))
            if r is None:
                continue
            cells = []
            for s in sets:
                p = r["perplexity"].get(s)
                txt = "-" if p is None else f"{p:.2f}"
                cells.append(f"**{txt}**" if p is not None and p == cols[s] else txt)
            lines.append(f"| {_fmt_budget(budget)} | {v} | {r['size']} ({r['params_active']:,}) | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def ablation_markdown(results: list[dict], metric_set: str = "val") -> str:
    """One row per variant (best size per budget): perplexity, and expert usage/unevenness per sparse layer."""
    best = compute_optimal(results, metric_set)
    lines = ["| budget | variant | size | ppl (" + metric_set + ") | usage % | unevenness |", "|---|---|---|---|---|---|"]
    for (budget, v), r in sorted(best.items(), key=lambda kv: (kv[0][0], kv[0][1])):
        ex = list((r.get("experts") or {}).values())
        usage = ", ".join(f"{100 * e['usage']:.1f}" for e in ex) or "-"
        uneven = ", ".join(f"{e['unevenness']:.2f}" for e in ex) or "-"
        lines.append(f"| {_fmt_budget(budget)} | {v} | {r['size']} | {r['perplexity'][metric_set]:.2f} | {usage} | {uneven} |")
    return "\n".join(lines) + "\n"
