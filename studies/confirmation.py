"""Stage 3 of the confirmation study (docs/confirmation.md, pre-registered): the report.

For every finished run of the final sweep (``results/confirm/final/<budget>/<method>/<size>/seed<S>``),
every token of ``val``, every ``eval_*`` split and both ``test_*`` splits is scored once
(``peer.eval.evaluate(run, test=True)``, all batches; kept as ``eval_full.json`` in the run folder).
Then, per budget and split: each method's mean ± std of the loss (nats per token, = ln perplexity) over
its seeds, and its gap to PEER, ``method - PEER`` (> 0: PEER lower), with the standard error
``sqrt(s_m^2 / n_m + s_PEER^2 / n_PEER)``, Welch's degrees of freedom and the 95 % interval
``gap ± t_{0.975, dof} * se`` (scipy's Student t). A method counts as beaten on a split when the gap
exceeds 2 standard errors (the protocol's rule). Written to ``summary.json`` (which ``peer main``
prints beside its one-seed table) and ``summary.md``, and plotted (``docs/img/confirmation_gaps.png``: each gap
with its 95 % interval, per split and budget).

A budget is *complete* when every run the sweep file plans for it has finished; until then its entry
says ``"complete": false`` and lists the missing runs, and every reader (summary.md, ``peer main``)
calls its numbers interim. Scoring runs beside a training sweep: ``--threads 1`` (the default) keeps it
to one core's worth of torch threads::

    python -m studies.confirmation [--root results/confirm/final] [--sweep configs/confirm_final.toml] [--threads 1]
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from peer.fsutil import atomic_write_text
from peer.metrics import mean_std_record

__all__ = [
    "gap_stats",
    "planned_runs",
    "tuning_effort",
    "summarize",
    "summary_markdown",
    "verdict_markdown",
    "plot",
    "main",
    "FULL_EVAL",
]

FULL_EVAL = "eval_full.json"
HEADLINE_SPLITS = ("val", "test_sotu")  # the in-domain splits the claim is judged on


def gap_stats(method: Sequence[float], peer: Sequence[float]) -> dict:
    """Gap ``mean(method) - mean(peer)`` with its standard error, Welch dof, 95 % interval and the protocol's
    ``verdict``: "PEER" (or "baseline") when that side is lower by more than 2 standard errors, else "tie".
    NaN and no verdict (None) where a side has fewer than two seeds (no spread to estimate)."""
    from scipy import stats

    a, b = np.asarray(method, dtype=np.float64), np.asarray(peer, dtype=np.float64)
    gap = float(a.mean() - b.mean())
    if len(a) < 2 or len(b) < 2:
        return {"gap": gap, "se": math.nan, "dof": math.nan, "ci95": [math.nan, math.nan], "peer_better_by_2se": False,
                "verdict": None}  # fmt: skip
    va, vb = a.var(ddof=1) / len(a), b.var(ddof=1) / len(b)
    se = math.sqrt(va + vb)
    dof = (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1)) if va + vb > 0 else math.inf
    half = float(stats.t.ppf(0.975, dof)) * se if se > 0 else 0.0
    verdict = "PEER" if gap > 2 * se else "baseline" if gap < -2 * se else "tie"
    return {"gap": gap, "se": se, "dof": dof, "ci95": [gap - half, gap + half], "peer_better_by_2se": gap > 2 * se,
            "verdict": verdict}  # fmt: skip


def planned_runs(sweep_file: str | Path) -> dict[str, dict[str, list[int]]]:
    """The runs a sweep file plans: {budget label: {method: [seeds]}}."""
    from peer.experiments.sweep.plan import budget_label, load_sweep
    from peer.experiments.sweep.select import method_of

    spec = load_sweep(sweep_file)
    return {budget_label(b): {method_of(v): list(spec.seeds) for v in spec.variants} for b in spec.budgets}


def tuning_effort(screen_root: str | Path) -> dict[str, dict[str, int]]:
    """Per method, what its recipe was chosen from, counted from the screen's finished runs (stages 1
    and 2, ``<root>/<budget>/<method>_tNN/<size>/seed<S>/result.json``): ``configurations`` (distinct
    trials) and ``runs`` (trials × seeds). The protocol reports it beside the gaps: equal per method."""
    from peer.experiments.sweep.select import method_of

    trials: dict[str, set[str]] = {}
    runs: dict[str, int] = {}
    for result in Path(screen_root).glob("*/*/*/seed*/result.json"):
        variant = result.parents[2].name
        m = method_of(variant)
        trials.setdefault(m, set()).add(variant)
        runs[m] = runs.get(m, 0) + 1
    return {m: {"configurations": len(trials[m]), "runs": runs[m]} for m in sorted(trials)}


def summarize(rows: Sequence[dict], planned: dict[str, dict[str, list[int]]] | None = None) -> dict:
    """``rows``: {"budget": float, "method": str, "seed": int, "loss": {split: nats}} -> the summary (module
    docstring): {"budgets": {label: {split: {"methods": {m: {mean, std, n, seeds}}, "gaps": {m: gap_stats}}}},
    "complete": {label: bool}, "missing": {label: ["method seedS", ...]}}. ``planned`` ({label: {method:
    [seeds]}}, e.g. ``planned_runs``) says which runs make a budget complete; without it, none is known
    to be missing."""
    from peer.experiments.sweep.plan import budget_label

    out: dict = {"budgets": {}, "complete": {}, "missing": {}}
    have = {(budget_label(r["budget"]), r["method"], r["seed"]) for r in rows}
    labels = sorted({budget_label(r["budget"]) for r in rows} | set(planned or {}), key=float)
    for label in labels:
        missing = [
            f"{m} seed{s}"
            for m, seeds in (planned or {}).get(label, {}).items()
            for s in seeds
            if (label, m, s) not in have
        ]
        out["complete"][label] = not missing
        out["missing"][label] = missing
    for budget in sorted({r["budget"] for r in rows}):
        at = [r for r in rows if r["budget"] == budget]
        splits = sorted({s for r in at for s in r["loss"]}, key=lambda s: (s not in HEADLINE_SPLITS, s))
        per_split = {}
        for split in splits:
            losses: dict[str, list[float]] = {}
            seeds: dict[str, list[int]] = {}
            for r in sorted(at, key=lambda r: (r["method"], r["seed"])):
                if split in r["loss"]:
                    losses.setdefault(r["method"], []).append(r["loss"][split])
                    seeds.setdefault(r["method"], []).append(r["seed"])
            methods = {m: {**mean_std_record(v), "seeds": seeds[m]} for m, v in losses.items()}
            gaps = {m: gap_stats(v, losses["peer"]) for m, v in losses.items() if m != "peer" and "peer" in losses}
            per_split[split] = {"methods": methods, "gaps": gaps}
        out["budgets"][budget_label(budget)] = per_split
    return out


def verdict_markdown(summary: dict) -> str:
    """The claim at a glance: one row per split, one column per (budget, baseline), each cell the gap
    ``baseline - PEER`` in nats with its standard error and the protocol's verdict ("PEER" when PEER is
    lower by more than 2 standard errors, "baseline" when the baseline is, "tie" otherwise)."""
    cols = [
        (b, m)
        for b, splits in summary["budgets"].items()
        for m in sorted({m for e in splits.values() for m in e["gaps"]})
    ]
    if not cols:  # PEER or every baseline still unscored: no gap to show
        return "(no gap yet: PEER and at least one baseline need finished runs)"
    splits = list(dict.fromkeys(s for e in summary["budgets"].values() for s in e))
    interim = {b for b, m in summary.get("missing", {}).items() if m}
    head = [f"{m} @ {b}{' (interim)' if b in interim else ''}" for b, m in cols]
    lines = ["| split | " + " | ".join(head) + " |", "|---|" + "---|" * len(cols)]
    for split in splits:
        cells = []
        for b, m in cols:
            g = summary["budgets"][b].get(split, {}).get("gaps", {}).get(m)
            if g is None:
                cells.append("—")
                continue
            if g["verdict"] is None:
                cells.append(f"{g['gap']:+.3f} (too few seeds)")
                continue
            cells.append(f"{g['gap']:+.3f} ± {g['se']:.3f} ({g['verdict']})")
        lines.append(f"| {split} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def summary_markdown(summary: dict) -> str:
    lines = ["# The confirmation study: PEER against each method's tuned recipe (docs/confirmation.md)", ""]
    if summary["budgets"]:
        lines += [
            "Gap to PEER, baseline − PEER in nats per token ± its standard error (> 0: PEER lower); the verdict by",
            "the protocol's rule: PEER (or the baseline) lower by more than 2 standard errors, else a tie.",
            "",
            verdict_markdown(summary),
            "",
        ]
    if summary.get("tuning"):
        lines += [
            "Tuning effort before each frozen recipe (configurations tried, and runs; counted from the screen's results): "
            + ", ".join(f"{m} {t['configurations']} ({t['runs']} runs)" for m, t in summary["tuning"].items())
            + ".",
            "",
        ]
    for budget, splits in summary["budgets"].items():
        missing = summary.get("missing", {}).get(budget, [])
        lines += [
            f"## {budget} training FLOPs",
            "",
            *(
                [
                    f"**Interim**: {len(missing)} planned run(s) not finished ({', '.join(missing)}); these numbers are not the result.",
                    "",
                ]
                if missing
                else []
            ),
            "| split | method | loss (mean ± std, n) | gap to PEER (method − PEER) | 95 % interval | PEER lower by > 2 se |",
            "|---|---|---|---|---|---|",
        ]
        for split, entry in splits.items():
            for m, s in entry["methods"].items():
                g = entry["gaps"].get(m)
                few = g is not None and g["verdict"] is None  # a side with one seed: no spread, no interval
                gap = (
                    "—"
                    if g is None
                    else f"{g['gap']:+.4f} (too few seeds)"
                    if few
                    else f"{g['gap']:+.4f} ± {g['se']:.4f}"
                )
                ci = f"[{g['ci95'][0]:+.4f}, {g['ci95'][1]:+.4f}]" if g and not few else "—"
                won = ("yes" if g["peer_better_by_2se"] else "no") if g else "—"
                std = f"{s['std']:.4f}" if s["n"] > 1 else "—"
                lines.append(f"| {split} | {m} | {s['mean']:.4f} ± {std} ({s['n']}) | {gap} | {ci} | {won} |")
        lines.append("")
    return "\n".join(lines)


def plot(summary: dict, path: Path) -> None:
    """The gaps at a glance: one panel per budget, one row per split, each baseline's gap to PEER with its
    95 % interval (right of 0: PEER lower); interim budgets say so in their title."""
    from peer.plots import pyplot, save_figure

    plt = pyplot()
    budgets = list(summary["budgets"])
    fig, axes = plt.subplots(
        1, max(1, len(budgets)), figsize=(5.2 * max(1, len(budgets)), 4.2), squeeze=False, sharex=True
    )
    interim = {b for b, m in summary.get("missing", {}).items() if m}
    for ax, b in zip(axes[0], budgets, strict=False):
        splits = list(summary["budgets"][b])
        methods = sorted({m for e in summary["budgets"][b].values() for m in e["gaps"]})
        for j, m in enumerate(methods):
            ys, xs, lo, hi = [], [], [], []
            for i, split in enumerate(splits):
                g = summary["budgets"][b][split]["gaps"].get(m)
                if g is None or g["verdict"] is None:
                    continue
                ys.append(i + (j - (len(methods) - 1) / 2) * 0.22)
                xs.append(g["gap"])
                lo.append(g["gap"] - g["ci95"][0])
                hi.append(g["ci95"][1] - g["gap"])
            if xs:
                ax.errorbar(xs, ys, xerr=[lo, hi], fmt="o", color=f"C{j}", capsize=2, label=f"{m} − PEER")
        if not ax.get_legend_handles_labels()[0]:
            ax.text(0.5, 0.5, "no gap yet", transform=ax.transAxes, ha="center", va="center", color="0.4")
        ax.axvline(0, color="k", lw=0.8)
        ax.set_yticks(range(len(splits)), splits, fontsize=8)
        ax.invert_yaxis()
        ax.set_xlabel("loss gap, nats per token (> 0: PEER lower), 95 % interval")
        ax.set_title(f"{b} training FLOPs{' (interim)' if b in interim else ''}", fontsize=10)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=3)
    fig.tight_layout()
    save_figure(fig, path)


def _full_eval(run_dir: Path) -> dict:
    """Every token of every split (test_* included) of one run, computed once and kept in the run folder."""
    from peer.eval import evaluate

    path = run_dir / FULL_EVAL
    if path.is_file():
        return json.loads(path.read_text(encoding="utf-8"))
    rep = evaluate(run_dir, test=True, max_batches=None, plot_dir=None)
    keep = {"step": rep["step"], "loss": {s: v["loss"] for s, v in rep["sets"].items()}}
    atomic_write_text(path, json.dumps(keep, indent=1) + "\n")
    return keep


def main(argv: list[str] | None = None) -> int:
    import argparse

    from peer.experiments.sweep.select import method_of

    parser = argparse.ArgumentParser(prog="python -m studies.confirmation", description=__doc__.split("\n")[0])
    parser.add_argument("--root", default="results/confirm/final", help="the final sweep's results")
    parser.add_argument(
        "--sweep", default="configs/confirm_final.toml", help="the sweep file: which runs make a budget complete"
    )
    parser.add_argument("--screen", default="results/confirm/screen", help="stages 1-2's results (the tuning count)")
    parser.add_argument("--plot", default="docs/img/confirmation_gaps.png", help="where the gap plot goes")
    parser.add_argument("--threads", type=int, default=1, help="torch threads for scoring (default 1: beside a sweep)")
    args = parser.parse_args(argv)
    if args.threads < 1:
        parser.error(f"--threads: must be >= 1, got {args.threads}")
    import torch

    torch.set_num_threads(args.threads)
    root = Path(args.root)
    rows = []
    for result in sorted(root.glob("*/*/*/seed*/result.json")):
        r = json.loads(result.read_text(encoding="utf-8"))
        full = _full_eval(result.parent)
        rows.append({"budget": r["budget"], "method": method_of(r["variant"]), "seed": r["seed"], "loss": full["loss"]})
    if not rows:
        print(f"no finished runs under {root}")
        return 1
    summary = summarize(rows, planned_runs(args.sweep))
    summary["tuning"] = tuning_effort(args.screen)
    atomic_write_text(root / "summary.json", json.dumps(summary, indent=1) + "\n")
    text = summary_markdown(summary)
    atomic_write_text(root / "summary.md", text)
    plot(summary, Path(args.plot))
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
