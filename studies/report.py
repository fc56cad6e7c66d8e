"""The project's study report (not installed with ``peer``): Fig. 1 and the gap plot (PNG), every table
(Markdown: PEER's gaps and their trend, each method's best recipe per size, wall time, CPU-vs-GPU seeds), and,
with ``--into DOC``, the same tables spliced into a hand-written document between markers, so a report page
cannot go stale::

    python -m studies.report configs/isoflop_redo.toml --into docs/reproduction.md

(``peer sweep`` itself writes the tables a user of the library needs: Fig. 1, Table 1, the variants and
every point; see :func:`peer.experiments.sweep.cli.report`.)

A document marks each generated block with a pair of HTML comments (invisible when rendered)::

    <!-- sweep isoflop_redo:table1 -->
    ...replaced on every `python -m studies.report FILE --into DOC`...
    <!-- /sweep isoflop_redo:table1 -->

The name is the sweep's, the key one of :data:`SECTIONS`. Everything outside the markers is left as it is.
"""

from __future__ import annotations

import collections
import math
import re
from pathlib import Path

from peer.errors import PeerError, UsageError
from peer.experiments.sweep.analysis import (
    ablation_markdown,
    aggregate,
    compute_optimal,
    fmt_ppl,
    method_ordering,
    points_markdown,
    table1_markdown,
)
from peer.experiments.sweep.plan import budget_label
from peer.experiments.sweep.plots import isoflop_figure
from peer.experiments.sweep.select import METHODS, best_recipe_results, best_recipes, headline_results, method_of
from peer.fsutil import atomic_write_text
from peer.metrics import mean_std

from .gaps import gap_figure, gaps, gaps_markdown

SECTIONS = ("summary", "table1", "sizes", "variants", "gaps", "ordering", "points", "wall", "hardware")
_TITLES = {
    "summary": "PEER against each method's best recipe, per budget",
    "table1": None,
    "sizes": "Each method's best recipe at every size run (bold: compute-optimal)",
    "variants": "Per variant (best size)",
    "gaps": "PEER's gap to each method's best recipe (nats; < 0: PEER better)",
    "ordering": "Ordering of each method's best recipe (best first)",
    "points": "Every point (bold: compute-optimal size of its variant)",
    "wall": "Wall time (training seconds of the finished runs)",
    "hardware": "Points trained on both CPU and GPU (CPU seeds against their point's GPU seeds)",
}


def _on_gpu(r: dict) -> bool:
    return (r.get("hardware") or {}).get("device", "cpu") != "cpu"  # not recorded: a CPU run (before it was recorded)


def wall_markdown(results: list[dict], parallel: int) -> str:
    """Per budget and hardware (a study may run on several machines): runs, summed training time, and the
    wall time at ``parallel`` runs side by side. Runs from before ``hardware`` was recorded count as CPU."""

    secs: dict = collections.defaultdict(float)
    runs: collections.Counter = collections.Counter()
    for r in results:
        key = (r["budget"], _on_gpu(r), (r.get("hardware") or {}).get("name") or "CPU (not recorded)")
        secs[key] += float(r.get("train_seconds") or 0.0)
        runs[key] += 1
    p = max(1, parallel)
    rows = [
        f"| {budget_label(b)} | {name} | {runs[b, gpu, name]} | {secs[b, gpu, name] / 3600:.1f} h | "
        f"{secs[b, gpu, name] / 3600 / p:.1f} h |"
        for b, gpu, name in sorted(secs)
    ]
    return "\n".join(
        [
            f"| budget | hardware | runs | training time (sum) | wall at {p} side by side |",
            "|---|---|---|---|---|",
            *rows,
        ]
    )


def hardware_markdown(results: list[dict], metric_set: str = "val") -> str | None:
    """The check that a study run on two kinds of machine compares like with like. A run's machine changes its
    float rounding, and so its trajectory once a top-k pick flips, as a seed does; a systematic effect would show
    as CPU seeds lying on one side of their point's GPU seeds. Per point with seeds on both: each seed's
    ``metric_set`` perplexity by machine and each CPU seed's gap in nats (ln ppl minus the mean ln ppl of the
    point's GPU seeds); last, all those gaps' mean ± standard error. ``None`` when no point is mixed."""

    groups: dict[tuple, list[dict]] = collections.defaultdict(list)
    for r in results:
        if metric_set in r.get("perplexity", {}):
            groups[r["budget"], r["variant"], r["size"]].append(r)
    rows, diffs = [], []
    for (budget, variant, size), runs in sorted(groups.items()):
        gpu = sorted((r for r in runs if _on_gpu(r)), key=lambda r: r.get("seed", 0))
        cpu = sorted((r for r in runs if not _on_gpu(r)), key=lambda r: r.get("seed", 0))
        if not gpu or not cpu:
            continue
        ref = sum(math.log(r["perplexity"][metric_set]) for r in gpu) / len(gpu)
        gap = [math.log(r["perplexity"][metric_set]) - ref for r in cpu]
        diffs += gap
        seeds = [", ".join(f"{r['perplexity'][metric_set]:.1f} (s{r.get('seed', 0)})" for r in rs) for rs in (gpu, cpu)]
        rows.append(
            f"| {budget_label(budget)} | {variant}/{size} | {seeds[0]} | {seeds[1]} | "
            + ", ".join(f"{g:+.3f}" for g in gap)
            + " |"
        )
    if not rows:
        return None
    mean, sd = mean_std(diffs)[:2]
    se = sd / math.sqrt(len(diffs))
    return "\n".join(
        [
            f"| budget | point | GPU: {metric_set} ppl (seed) | CPU: {metric_set} ppl (seed) | CPU - GPU (nats) |",
            "|---|---|---|---|---|",
            *rows,
            "",
            f"All {len(diffs)} CPU seeds against their point's GPU seeds: {mean:+.3f} ± {se:.3f} nats "
            "(mean ± standard error; > 0: the CPU seeds are worse).",
        ]
    )


def sizes_markdown(results: list[dict], metric_set: str = "val") -> str:
    """One row per (budget, method): its best recipe's ``metric_set`` perplexity (mean ± std (seeds)) at every size
    run, the compute-optimal one in bold, so that a reader sees the optimum bracketed and how many seeds each
    neighbour has. Columns are the sizes any row has, smallest model first."""

    best = best_recipes(results, metric_set)
    points = {
        (p["budget"], p["variant"], p["size"]): p
        for p in aggregate(best_recipe_results(results, metric_set))
        if metric_set in p.get("perplexity", {})
    }
    smallest: dict[str, float] = {}
    for (_, _, size), p in points.items():
        smallest[size] = min(smallest.get(size, math.inf), float(p.get("params_active") or 0))
    sizes = sorted(smallest, key=lambda s: (smallest[s], s))
    order = {m: i for i, m in enumerate(METHODS)}
    lines = ["| budget | method (recipe) | " + " | ".join(sizes) + " |", "|---|---" + "|---" * len(sizes) + "|"]
    for (budget, method), opt in sorted(
        best.items(), key=lambda kv: (kv[0][0], order.get(kv[0][1], len(order)), kv[0][1])
    ):
        cells = []
        for size in sizes:
            p = points.get((budget, opt["variant"], size))
            cell = fmt_ppl(p, metric_set) if p else "-"
            cells.append(f"**{cell}**" if size == opt["size"] else cell)
        lines.append(f"| {budget_label(budget)} | {method} ({opt['variant']}) | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def summary_markdown(results: list[dict], method: str, others: tuple[str, ...], metric_set: str = "val") -> str:
    """One row per budget: each method's best recipe at its compute-optimal size (``metric_set`` perplexity,
    the seed mean, its recipe and size), then ``method``'s lead over each other method in nats ± its standard
    error (a lead is positive when ``method`` is better; ``n/a``: a side has one seed)."""

    best = best_recipes(results, metric_set)
    lead = {(g["budget"], g["other"]): g for g in gaps(results, method, others, metric_set)}
    cols = (method, *others)
    lines = [
        "| budget | " + " | ".join(cols) + " | " + f"{method}'s lead over " + " / ".join(others) + " (nats ± se) |",
        "|---" * (len(cols) + 2) + "|",
    ]
    for budget in sorted({b for b, _ in best}):
        cells = []
        for m in cols:
            p = best.get((budget, m))
            cells.append(f"{fmt_ppl(p, metric_set)} {p['variant']}/{p['size']}" if p else "-")
        leads = []
        for o in others:
            g = lead.get((budget, o))
            se = "n/a" if g is None or not math.isfinite(g["se"]) else f"{g['se']:.3f}"
            leads.append("-" if g is None else f"{-g['gap']:+.3f} ± {se}")
        lines.append(f"| {budget_label(budget)} | " + " | ".join(cells) + " | " + " / ".join(leads) + " |")
    return "\n".join(lines)


def report_sections(spec, results: list[dict], metric_set: str = "val") -> dict[str, str]:
    """The report's Markdown blocks by key (:data:`SECTIONS`); ``gaps`` only when the sweep has PEER and dense or MoE.
    Writes the figures under the sweep root as a side effect."""

    root: Path = spec.root
    headline = headline_results(results, metric_set)
    isoflop_figure(headline, root / f"{spec.name}.png", metric_set=metric_set)
    out = {"table1": table1_markdown(headline, metric_set), "variants": ablation_markdown(results, metric_set)}
    methods = {method_of(v) for v in spec.variants}
    if methods & set(METHODS):
        out["sizes"] = sizes_markdown([r for r in results if method_of(r["variant"]) in METHODS], metric_set)
    if "peer" in methods and methods & {"dense", "moe"}:
        others = tuple(m for m in ("dense", "moe", "pkm") if m in methods)
        sets = sorted({s for r in results for s in r.get("perplexity", {})}, key=lambda s: (s != metric_set, s))
        gap_png = root / f"{spec.name}_gaps.png"
        gap_figure(results, gap_png, "peer", others, metric_set)
        out["gaps"] = gaps_markdown(results, "peer", others, metric_set, sets)
        out["summary"] = summary_markdown(results, "peer", others, metric_set)
    best = best_recipe_results(results, metric_set)
    opt = compute_optimal(best, metric_set)
    out["ordering"] = "\n".join(
        f"- {budget_label(budget)} FLOPs, {s}: " + " < ".join(f"{v} {fmt_ppl(opt[(budget, v)], s)}" for v in vs)
        for budget, per_set in method_ordering(best, metric_set).items()
        for s, vs in per_set.items()
    )
    out["points"] = points_markdown(results, metric_set)
    out["wall"] = wall_markdown(results, spec.parallel)
    if (hw := hardware_markdown(results, metric_set)) is not None:
        out["hardware"] = hw
    return {k: v.strip() for k, v in out.items()}


def report_markdown(name: str, sections: dict[str, str]) -> str:
    """The ``<name>_tables.md`` page: every section under its heading."""
    lines = [f"# {name}: compute-optimal perplexity per budget\n"]
    for key in SECTIONS:
        if key in sections:
            if _TITLES[key]:
                lines.append(f"## {_TITLES[key]}\n")
            lines.append(sections[key] + "\n")
            if key == "gaps":
                lines.append(f"Plot: {name}_gaps.png\n")
    return "\n".join(lines)


def splice(doc: str, name: str, sections: dict[str, str]) -> tuple[str, list[str]]:
    """Replace every marked block of sweep ``name`` in ``doc``; return the new text and the keys replaced.
    Raises :class:`UsageError` (one line) on an unknown key, an unclosed or unopened marker, or no marker at all."""
    pat = re.compile(r"<!-- (/?)sweep ([\w.-]+):([\w-]+) -->")
    pieces, pos, open_key, replaced = [], 0, None, []
    for m in pat.finditer(doc):
        closing, sweep, key = m.group(1) == "/", m.group(2), m.group(3)
        if sweep != name:
            continue
        line = doc.count("\n", 0, m.start()) + 1
        if key not in SECTIONS:
            raise UsageError(
                f"line {line}: unknown section '{key}' in marker {m.group(0)}; allowed: {', '.join(SECTIONS)}"
            )
        if not closing:
            if open_key:
                raise UsageError(f"line {line}: marker {m.group(0)} opens inside the unclosed '{open_key}' block")
            if key not in sections:
                raise UsageError(
                    f"line {line}: this sweep's report has no '{key}' section (it has: {', '.join(sections)})"
                )
            pieces.append(doc[pos : m.end()])
            open_key, pos = key, m.end()
        else:
            if open_key != key:
                raise UsageError(f"line {line}: closing marker {m.group(0)} without its opening marker")
            pieces.append("\n" + sections[key] + "\n")
            pos, open_key = m.start(), None
            replaced.append(key)
    if open_key:
        raise UsageError(f"the '{open_key}' block of sweep '{name}' is not closed (<!-- /sweep {name}:{open_key} -->)")
    if not replaced:
        raise UsageError(
            f"no <!-- sweep {name}:KEY --> ... <!-- /sweep {name}:KEY --> blocks; keys: {', '.join(SECTIONS)}"
        )
    pieces.append(doc[pos:])
    return "".join(pieces), replaced


def splice_into(path: str | Path, name: str, sections: dict[str, str]) -> list[str]:
    """:func:`splice` a file in place (atomically; untouched on any error)."""
    path = Path(path)
    try:
        doc = path.read_text(encoding="utf-8")
    except OSError as e:
        raise UsageError(f"--into {path}: {e.strerror or e}") from None
    text, replaced = splice(doc, name, sections)
    if text != doc:
        atomic_write_text(path, text)
    return replaced


def main(argv: list[str] | None = None) -> int:
    """``python -m studies.report SWEEP.toml [--into DOC] [--metric-set val]``."""
    import argparse
    import sys

    from peer.experiments.sweep.plan import load_sweep
    from peer.experiments.sweep.runner import collect, write_tables

    parser = argparse.ArgumentParser(prog="python -m studies.report", description=__doc__.split("\n")[0])
    parser.add_argument("sweep", help="the sweep TOML file")
    parser.add_argument("--into", metavar="DOC", help="refresh DOC's <!-- sweep NAME:KEY --> blocks")
    parser.add_argument("--metric-set", default="val", help="evaluation set that picks compute-optimal models")
    args = parser.parse_args(argv)
    try:
        spec = load_sweep(args.sweep)
        results = collect(spec)
        if not results:
            print(f"no finished runs under {spec.root}")
            return 1
        write_tables(spec, results)
        sections = report_sections(spec, results, args.metric_set)
        text = report_markdown(spec.name, sections)
        md = spec.root / f"{spec.name}_tables.md"
        atomic_write_text(md, text)
        print(text)
        print(f"wrote {spec.root / (spec.name + '.png')}, {md}, {spec.root / (spec.name + '_results.csv')}")
        if args.into:
            keys = splice_into(args.into, spec.name, sections)
            print(f"refreshed {len(keys)} blocks in {args.into}: {', '.join(keys)}")
    except (PeerError, FileNotFoundError) as e:
        print(f"studies.report: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
