"""``peer sweep SWEEP.toml`` (plan, train, evaluate), ``peer sweep plan SWEEP.toml``, ``peer sweep plot SWEEP.toml``,
``peer sweep next SWEEP.toml`` (optima at the edge of the sizes run, with the seed-0 run beyond each; the seed runs
a bracketed optimum and its neighbours still need),
``peer sweep compare POINT_A POINT_B`` (seeded comparison of two points on every evaluation set)."""

from __future__ import annotations

from pathlib import Path

from ...errors import UsageError
from ...fsutil import atomic_write_text


def add_arguments(parser) -> None:
    parser.add_argument(
        "action_or_file", help="'plan', 'plot', 'next', 'compare', or a sweep TOML file (runs the sweep)"
    )
    parser.add_argument(
        "file", nargs="?", help="the sweep TOML file (after 'plan', 'plot' or 'next'); point A (after 'compare')"
    )
    parser.add_argument("other", nargs="?", help="point B (after 'compare')")
    parser.add_argument("--names", default="A,B", help="compare: the two sides' names (default: A,B)")
    parser.add_argument("--json", action="store_true", help="compare: print JSON")
    parser.add_argument(
        "--only",
        action="append",
        default=[],
        help="run only runs whose id contains this (repeatable; runs start in the order of the first selector each matches)",
    )
    parser.add_argument("--parallel", type=int, default=0, help="runs at a time (default: the sweep file's)")
    parser.add_argument(
        "--threads",
        type=int,
        default=-1,
        help="torch threads per run (default: the sweep file's; 0: the cores split over the parallel runs)",
    )
    parser.add_argument(
        "--device",
        default="",
        help="train.device of the runs (e.g. cuda; default: the sweep file's, else the config's). "
        "An execution setting, like --threads: finished runs are reused whatever device they ran on",
    )
    parser.add_argument("--metric-set", default="val", help="evaluation set that picks compute-optimal models")


def run(args) -> int:
    from .plan import load_sweep, plan, plan_table, plan_totals

    if args.action_or_file == "compare":
        import json

        from .compare import compare, format_compare, load_point

        if not (args.file and args.other):
            raise UsageError("peer sweep compare: give two points (folders of result.json files), A and B")
        res = compare(load_point(args.file), load_point(args.other))
        names = (args.names.split(",") + ["A", "B"])[:2]
        print(json.dumps(res, indent=1) if args.json else format_compare(res, *names))
        return 0
    if args.action_or_file in ("plan", "plot", "run", "next"):
        action, file = args.action_or_file, args.file
        if not file:
            raise UsageError(f"peer sweep {action}: a sweep TOML file is required")
    else:
        action, file = "run", args.action_or_file
    spec = load_sweep(file)
    if args.parallel:
        spec.parallel = args.parallel
    if args.threads >= 0:
        spec.threads = args.threads
    if args.device:
        spec.device = args.device
    if action == "plan":
        runs = plan(spec)
        print(plan_table(runs))
        print(plan_totals(runs, spec.parallel))
        return 0
    if action == "next":
        return print_next(spec, args.metric_set)
    if action == "run":
        from .runner import RunsFailed, run_sweep

        print(plan_table(plan(spec)))
        try:
            run_sweep(spec, only=args.only)
        except RunsFailed:
            report(spec, args.metric_set)  # what did finish, then the error line (exit 2)
            raise
    return report(spec, args.metric_set)


def print_next(spec, metric_set: str = "val") -> int:
    """Print the optima at an edge of the sizes run so far, then one run id per line for ``--only``: seed 0 of
    the planned size beyond each edge, and seeds 1 and 2 at each bracketed optimum and its two neighbours (the
    sweep file must list those seeds); a variant planned at one size (an ablation arm) gets every seed of the
    sweep file. Run them and ask again until it prints no run."""
    from .plan import budget_label, plan, run_id
    from .runner import collect
    from .select import next_runs

    sizes: dict = {}
    for r in plan(spec):
        if not r.skipped:
            sizes.setdefault((r.budget, r.variant), set()).add((r.params_active, r.size))
    nxt = next_runs(
        collect(spec), {k: sorted(v) for k, v in sizes.items()}, metric_set=metric_set, arm_seeds=tuple(spec.seeds)
    )
    for e in nxt["edges"]:
        beyond = (
            f"next: {e['next_size']}"
            if e["next_size"] is not None
            else "the grid has no size beyond it: add one to the sweep file"
        )
        print(
            f"# edge: {budget_label(e['budget'])} {e['method']} ({e['variant']}): optimum {e['size']} is the "
            f"{e['side']} size run so far ({beyond})",
            flush=True,
        )
    missing = sorted({s for s in (1, 2)} - set(spec.seeds))
    if any(r["seed"] in missing for r in nxt["seed_runs"]):
        print(f"# sweep.seeds lacks {missing}: add them to the sweep file to run these")
    for r in nxt["extend_runs"] + nxt["seed_runs"]:
        print(run_id(r["budget"], r["variant"], r["size"], r["seed"], spec.seeded))
    return 0


def report(spec, metric_set: str = "val") -> int:
    """Write Fig. 1 (PNG), the tables (Markdown: Table 1, each variant at its best size, every point) and the
    results CSV/JSON under the sweep root; print the tables. (The project's longer report, with PEER's gaps
    and their trend, spliced into docs/, is ``python -m studies.report`` in the repository, outside the package.)"""
    from .analysis import ablation_markdown, points_markdown, table1_markdown
    from .plots import isoflop_figure
    from .runner import collect, write_tables
    from .select import headline_results

    results = collect(spec)
    if not results:
        print(f"no finished runs under {spec.root}")
        return 1
    write_tables(spec, results)
    root: Path = spec.root
    headline = headline_results(results, metric_set)
    isoflop_figure(headline, root / f"{spec.name}.png", metric_set=metric_set)
    text = "\n".join(
        [
            f"# {spec.name}: compute-optimal perplexity per budget\n",
            table1_markdown(headline, metric_set).strip() + "\n",
            "## Per variant (best size)\n",
            ablation_markdown(results, metric_set).strip() + "\n",
            "## Every point (bold: compute-optimal size of its variant)\n",
            points_markdown(results, metric_set).strip() + "\n",
        ]
    )
    md = root / f"{spec.name}_tables.md"
    atomic_write_text(md, text)
    print(text)
    print(f"wrote {root / (spec.name + '.png')}, {md}, {root / (spec.name + '_results.csv')}")
    return 0
