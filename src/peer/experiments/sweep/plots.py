"""The paper's Fig. 1 from sweep results: validation perplexity vs model size, per method and budget."""

from __future__ import annotations

from pathlib import Path

from .analysis import aggregate, compute_optimal
from .gaps import METHODS, gap_trend, gaps, method_of

__all__ = ["isoflop_figure", "gap_figure"]

_MARKERS = {"dense": "o", "moe": "s", "pkm": "^", "peer": "D"}


def isoflop_figure(results: list[dict], out: Path, metric_set: str = "val", x: str = "params_active") -> dict:
    """One curve per (variant, budget): mean perplexity over seeds on ``metric_set`` against ``x`` (active
    parameters by default), error bars of one std where a point has several seeds, compute-optimal
    points circled; the colour is the method's, the line style the budget's. Returns the plotted series
    (x, mean, std) for checking."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series: dict[tuple[float, str], list[tuple[float, float, float]]] = {}
    for r in aggregate(results):
        p = r.get("perplexity", {}).get(metric_set)
        if p is not None:
            sd = r.get("perplexity_std", {}).get(metric_set, 0.0)
            series.setdefault((r["budget"], r["variant"]), []).append((r[x], p, sd))
    for k in series:
        series[k].sort()
    best = compute_optimal(results, metric_set)
    budgets = sorted({b for b, _ in series})
    styles = ["-", "--", ":", "-."]
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    variants = sorted({v for _, v in series}, key=lambda v: (method_of(v) not in METHODS, v))
    hues = {
        v: colors[(METHODS.index(method_of(v)) if method_of(v) in METHODS else len(METHODS) + i) % len(colors)]
        for i, v in enumerate(variants)
    }
    fig, ax = plt.subplots(figsize=(8.5, 4.8))
    for (b, v), pts in sorted(series.items()):
        xs, ys, sds = zip(*pts, strict=True)
        ls = styles[budgets.index(b) % len(styles)]
        ax.errorbar(
            xs,
            ys,
            yerr=sds if any(sds) else None,
            fmt=ls,
            marker=_MARKERS.get(method_of(v), "o"),
            color=hues[v],
            capsize=3,
            label=f"{v} @ {b:.0e}",
        )
        opt = best.get((b, v))
        if opt is not None:
            ax.scatter(
                [opt[x]], [opt["perplexity"][metric_set]], s=180, facecolors="none", edgecolors=hues[v], linewidths=2
            )
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("active parameters" if x == "params_active" else x)
    ax.set_ylabel(f"perplexity ({metric_set})")
    ax.set_title("isoFLOP curves (mean ± std over seeds; circles: compute-optimal)", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), title="variant @ FLOPs", title_fontsize=7)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return {f"{v}@{b:g}": pts for (b, v), pts in series.items()}


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
