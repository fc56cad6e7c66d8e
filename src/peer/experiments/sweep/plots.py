"""The paper's Fig. 1 from sweep results: validation perplexity vs model size, per method and budget."""

from __future__ import annotations

from pathlib import Path

from .analysis import aggregate, compute_optimal
from .select import METHODS, method_of

__all__ = ["isoflop_figure"]

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
