"""Retrievals per expert over a run, and what pool-size runs say about them (issue 29, item 4).

Over a run of T training tokens, a PEER layer with h heads retrieving k experts each makes T*h*k
retrievals; an expert of a pool of N is retrieved R = T*h*k/N times on average.

``python -m studies.retrievals [--root results/isoflop_redo/1e13]``: the isoFLOP study's pool-size arms at
1e13 FLOPs (``n*sq``, the d32 × 4 backbone, h=4, k=8, seeds as run) set beside the 256² arm (``peer``):
their val loss gap to it, with a Welch standard error, against log10 of the ratio of retrievals per expert.
A line through the origin, ``gap = s * log10(R_256 / R)``, is fitted to the pools larger than 256²
(weighted by 1/se²).

``python -m studies.retrievals --knowledge [results/knowledge/v2/main/summary.json]``: the same at each budget
of the knowledge study (``studies.knowledge report`` writes the summary), for text loss on the facts + text
mix, val loss and bits stored on 32,000 facts; whether one slope fits both budgets (a test of "the penalty
depends on R alone"); and where the 1024² − 256² text-loss gap, moving linearly in log10(budget) through the
two measured budgets, reaches zero, with an interval from the seeds' spread.
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .confirmation import gap_stats

__all__ = ["main", "slope_through_origin", "pool_gaps", "crossover_budget", "knowledge_law"]

ARMS = {"n64sq": 64**2, "n128sq": 128**2, "peer": 256**2, "n512sq": 512**2, "n1024sq": 1024**2}
KNOWLEDGE_POOLS = {"peer128": 128**2, "peer256": 256**2, "peer512": 512**2, "peer1024": 1024**2}
KNOWLEDGE_METRICS = (  # (corpus, metric, what it is): the gaps the knowledge study's runs give
    ("mix", "text_loss", "text loss on the facts + text mix (nats/token)"),
    ("f32k", "val_loss", "val loss on 32,000 facts (nats/token)"),
    ("f32k", "bits", "bits stored of 32,000 facts"),
)


def slope_through_origin(xs: Sequence[float], ys: Sequence[float], ses: Sequence[float]) -> tuple[float, float]:
    """The weighted (1/se²) least-squares slope of a line through the origin, and its standard error;
    NaN without a point that has a finite, positive se."""
    keep = [(x, y, 1 / e**2) for x, y, e in zip(xs, ys, ses, strict=True) if math.isfinite(e) and e > 0]
    if not keep:
        return math.nan, math.nan
    x, y, w = (np.array(v, dtype=np.float64) for v in zip(*keep, strict=True))
    sxx = float((w * x * x).sum())
    return float((w * x * y).sum() / sxx), math.sqrt(1 / sxx)


def _arm(root: Path, variant: str) -> tuple[list[float], float]:
    runs = [json.loads(f.read_text()) for f in sorted(root.glob(f"{variant}/d32_l4/seed*/result.json"))]
    return [math.log(r["perplexity"]["val"]) for r in runs], float(np.mean([r["tokens"] for r in runs]))


def isoflop(root: Path, heads_topk: int) -> None:
    ref, ref_tokens = _arm(root, "peer")
    r_ref = ref_tokens * heads_topk / ARMS["peer"]
    print(
        "| pool N | seeds | val loss (mean ± std) | retrievals per expert R | gap to 256² (nats) | log10(R_256 / R) |"
    )
    print("|---|---|---|---|---|---|")
    xs, ys, es = [], [], []
    for variant, n in ARMS.items():
        losses, tokens = _arm(root, variant)
        if not losses:
            continue
        r = tokens * heads_topk / n
        g = gap_stats(losses, ref)
        x = math.log10(r_ref / r)
        sd = f"{np.std(losses, ddof=1):.4f}" if len(losses) > 1 else "—"
        gap = f"{g['gap']:+.4f} ± {g['se']:.4f}" if variant != "peer" else "0"
        print(f"| {math.isqrt(n)}² | {len(losses)} | {np.mean(losses):.4f} ± {sd} | {r:,.0f} | {gap} | {x:+.2f} |")
        if n > ARMS["peer"]:
            xs.append(x), ys.append(g["gap"]), es.append(g["se"])
    s, s_se = slope_through_origin(xs, ys, es)
    if math.isfinite(s):
        print(f"\nslope s = {s:.4f} ± {s_se:.4f} nats per decade fewer retrievals per expert (pools > 256², weighted)")
        print(
            f"R of the 256² arm: {r_ref:,.0f}; a 1024² pool reaches it at {r_ref * 1024**2 / heads_topk:,.0f} training tokens"
        )


def pool_gaps(points: dict, metric: str) -> list[dict]:
    """Each PEER pool of one (budget, corpus) of a knowledge summary against 256²: ``metric``'s gap (pool
    − 256², Welch se), its retrievals per expert R and x = log10(R_256 / R)."""
    ref = points.get("peer256")
    if ref is None or metric not in ref:
        return []
    rows = []
    for m, n in KNOWLEDGE_POOLS.items():
        if m not in points or metric not in points[m]:
            continue
        e = points[m]
        g = gap_stats(e[metric]["values"], ref[metric]["values"])
        r = e["retrievals_per_expert"]
        rows.append({"method": m, "N": n, "seeds": len(e[metric]["values"]), "mean": e[metric]["mean"],
                     "R": r, "x": math.log10(ref["retrievals_per_expert"] / r), "gap": g["gap"], "se": g["se"]})  # fmt: skip
    return rows


def crossover_budget(b1: float, g1: float, se1: float, b2: float, g2: float, se2: float, draws: int = 100_000) -> dict:
    """The budget beyond which a gap (pool − reference loss) measured at budgets ``b1 < b2`` is below 0, if it
    moves linearly in log10(budget) through both: the point estimate and 68 % / 95 % intervals from normal
    draws of the two gaps (seed 0, so the answer is reproducible); inf where the gap does not fall with the
    budget, and ``never``: the share of draws in which it does not."""
    l1, l2 = math.log10(b1), math.log10(b2)

    def cross(a: np.ndarray, b: np.ndarray) -> np.ndarray:  # log10 of the budget beyond which the gap is < 0
        slope = (b - a) / (l2 - l1)
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(slope < 0, l2 - b / slope, np.inf)

    point = float(cross(np.array([g1]), np.array([g2]))[0])
    rng = np.random.default_rng(0)
    sims = cross(rng.normal(g1, se1, draws), rng.normal(g2, se2, draws))
    q = np.quantile(sims, [0.025, 0.16, 0.5, 0.84, 0.975], method="inverted_cdf")  # no interpolation with inf
    return {"log10_budget": point, "budget": 10**point if math.isfinite(point) else math.inf,
            "median": float(10 ** q[2]), "ci68": [float(10 ** q[1]), float(10 ** q[3])],
            "ci95": [float(10 ** q[0]), float(10 ** q[4])], "never": float(np.mean(~np.isfinite(sims)))}  # fmt: skip


def knowledge_law(summary: dict) -> dict:
    """From a knowledge-study summary: pool gaps per budget and metric, the slope per budget and whether one
    slope fits both (z of their difference), and the 1024² − 256² text-loss crossover budget."""
    budgets = sorted(summary["points"], key=float)
    out: dict = {"metrics": {}}
    for corpus, metric, what in KNOWLEDGE_METRICS:
        per: dict = {}
        for b in budgets:
            rows = pool_gaps(summary["points"][b].get(corpus, {}), metric)
            big = [r for r in rows if r["N"] > KNOWLEDGE_POOLS["peer256"]]
            s, s_se = slope_through_origin([r["x"] for r in big], [r["gap"] for r in big], [r["se"] for r in big])
            per[b] = {"rows": rows, "slope": s, "slope_se": s_se}
        entry: dict = {"what": what, "corpus": corpus, "budgets": per}
        if len(budgets) >= 2:
            (a, b) = (per[budgets[0]], per[budgets[-1]])
            if all(math.isfinite(v) for v in (a["slope"], b["slope"], a["slope_se"], b["slope_se"])):
                entry["slope_difference_z"] = (b["slope"] - a["slope"]) / math.hypot(a["slope_se"], b["slope_se"])
        out["metrics"][f"{corpus}/{metric}"] = entry
    text = out["metrics"]["mix/text_loss"]["budgets"]
    ends = (
        [{r["method"]: r for r in text[b]["rows"]}.get("peer1024") for b in (budgets[0], budgets[-1])]
        if budgets
        else []
    )
    if len(budgets) >= 2 and all(e and math.isfinite(e["se"]) for e in ends):
        (e1, e2) = ends
        out["text_crossover_1024_vs_256"] = crossover_budget(
            float(budgets[0]),
            e1["gap"],
            e1["se"],
            float(budgets[-1]),
            e2["gap"],
            e2["se"],  # type: ignore[index]
        )
    return out


def knowledge_markdown(law: dict) -> str:
    lines = []
    for e in law["metrics"].values():
        lines += [f"### {e['what']}: gap of each pool to 256²", "",
                  "| budget | pool | seeds | mean | retrievals per expert R | log10(R_256 / R) | gap to 256² |",
                  "|---|---|---|---|---|---|---|"]  # fmt: skip
        for b, per in e["budgets"].items():
            for r in per["rows"]:
                gap = "0" if r["method"] == "peer256" else f"{r['gap']:+.4g} ± {r['se']:.2g}"
                lines.append(
                    f"| {b} | {math.isqrt(r['N'])}² | {r['seeds']} | {r['mean']:.4g} | {r['R']:,.0f} | {r['x']:+.2f} | {gap} |"
                )
        slopes = "; ".join(f"{b}: {p['slope']:+.4g} ± {p['slope_se']:.2g}" for b, p in e["budgets"].items())
        lines += ["", f"Slope per decade fewer retrievals per expert (pools > 256², weighted, through 0): {slopes}"
                  + (f"; difference between budgets z = {e['slope_difference_z']:+.2f}" if "slope_difference_z" in e else ""), ""]  # fmt: skip
    if c := law.get("text_crossover_1024_vs_256"):
        lines += [
            f"1024² − 256² text-loss gap reaches 0, extrapolated linearly in log10(budget): {c['budget']:.3g} FLOPs "
            f"(median of draws {c['median']:.3g}; 68 % {c['ci68'][0]:.3g}-{c['ci68'][1]:.3g}; 95 % "
            f"{c['ci95'][0]:.3g}-{c['ci95'][1]:.3g}; the gap does not fall with the budget in {100 * c['never']:.0f} % of draws)", ""
        ]  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m studies.retrievals", description=__doc__.split("\n")[0])
    parser.add_argument("--root", default="results/isoflop_redo/1e13")
    parser.add_argument("--heads-topk", type=int, default=32, help="h*k of the arms (default 4*8)")
    parser.add_argument("--knowledge", nargs="?", const="results/knowledge/v2/main/summary.json", default=None,
                        help="a knowledge-study summary.json instead (default path when given bare)")  # fmt: skip
    args = parser.parse_args(argv)
    if args.knowledge is None:
        isoflop(Path(args.root), args.heads_topk)
        return 0
    law = knowledge_law(json.loads(Path(args.knowledge).read_text()))
    out = Path(args.knowledge).with_name("retrievals.json")
    out.write_text(json.dumps(law, indent=1) + "\n")
    print(knowledge_markdown(law))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
