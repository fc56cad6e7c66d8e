"""Which points of a sweep stand for a method: each method's best recipe per budget, the runs Fig. 1 and
Table 1 show, and what to run next (optima at an edge of the sizes run; seeds at a bracketed optimum).

A variant's *method* is its name up to the first underscore (``moe_lr3e-3`` -> ``moe``): variants
of one method are its recipes (learning rates, shapes). At each budget a method is represented by
its best recipe's compute-optimal point (lowest mean perplexity on the metric set; ties: first).
"""

from __future__ import annotations

from .analysis import compute_optimal

__all__ = ["METHODS", "method_of", "best_recipes", "best_recipe_results", "headline_results", "next_runs"]


METHODS = ("dense", "moe", "pkm", "peer")  # the paper's four: one colour each in every figure


def method_of(variant: str) -> str:
    """``moe_lr3e-3`` -> ``moe``; ``dense`` -> ``dense``."""
    return variant.split("_", 1)[0]


def best_recipes(results: list[dict], metric_set: str = "val") -> dict[tuple[float, str], dict]:
    """(budget, method) -> the compute-optimal point of the method's best variant at that budget."""
    out: dict[tuple[float, str], dict] = {}
    for (budget, variant), point in sorted(compute_optimal(results, metric_set).items()):
        key = (budget, method_of(variant))
        if key not in out or point["perplexity"][metric_set] < out[key]["perplexity"][metric_set]:
            out[key] = point
    return out


def best_recipe_results(results: list[dict], metric_set: str = "val") -> list[dict]:
    """The runs of each (budget, method)'s best variant only (every size and seed of it): what Table 1 shows."""
    keep = {(b, p["variant"]) for (b, _), p in best_recipes(results, metric_set).items()}
    return [r for r in results if (r["budget"], r["variant"]) in keep]


def headline_results(results: list[dict], metric_set: str = "val") -> list[dict]:
    """The runs Fig. 1 and Table 1 show: for the paper's four methods, each budget's best recipe only (a study
    with several learning rates per method would otherwise list every one); other variants (ablation arms) as run."""
    ours = [r for r in results if method_of(r["variant"]) in METHODS]
    return best_recipe_results(ours, metric_set) + [r for r in results if method_of(r["variant"]) not in METHODS]


def next_runs(
    results: list[dict],
    sizes_by_variant: dict[tuple[float, str], list[tuple[int, str]]],
    seeds: tuple[int, ...] = (1, 2),
    metric_set: str = "val",
    arm_seeds: tuple[int, ...] = (0, 1, 2),
) -> dict:
    """What the study needs next, per (budget, method)'s best recipe. ``edges``: the optimum is the
    smallest or largest size that has run, with ``next_size`` the planned size beyond it (None: the grid
    has none, add one to the sweep file); ``extend_runs``: seed 0 of those next sizes, to bracket the
    optimum; ``seed_runs``: for a bracketed optimum only, the runs of ``seeds`` at it and its two
    neighbours in size that have no result yet. ``sizes_by_variant`` maps (budget, variant) to its planned
    (active params, size name) pairs. A variant planned at one size only (an ablation arm, compared with the
    others at a fixed size) has no optimum to bracket: every one of its ``arm_seeds`` without a result is a
    seed run, whether or not it is its method's best recipe."""
    done = {(r["budget"], r["variant"], r["size"], r.get("seed", 0)) for r in results}
    edges, extend_runs, seed_runs = [], [], []
    fixed = sorted(k for k, v in sizes_by_variant.items() if len(v) == 1)
    for budget, variant in fixed:
        size = sizes_by_variant[budget, variant][0][1]
        seed_runs += [
            dict(budget=budget, variant=variant, size=size, seed=seed)
            for seed in arm_seeds
            if (budget, variant, size, seed) not in done
        ]
    for (budget, method), point in sorted(best_recipes(results, metric_set).items()):
        variant = point["variant"]
        if (budget, variant) in fixed:
            continue
        have = {r["size"] for r in results if (r["budget"], r["variant"]) == (budget, variant)}
        planned = [name for _, name in sorted(sizes_by_variant.get((budget, variant), []))]
        sizes = [name for name in planned if name in have]
        if point["size"] not in sizes:
            continue
        i = sizes.index(point["size"])
        sides = [side for side, at_edge in (("smallest", i == 0), ("largest", i == len(sizes) - 1)) if at_edge]
        for side in sides:
            j = planned.index(point["size"]) + (-1 if side == "smallest" else 1)
            nxt = planned[j] if 0 <= j < len(planned) else None
            edges.append(
                dict(budget=budget, method=method, variant=variant, size=point["size"], side=side, next_size=nxt)
            )
            if nxt is not None and (budget, variant, nxt, 0) not in done:
                extend_runs.append(dict(budget=budget, variant=variant, size=nxt, seed=0))
        if sides:
            continue  # seeds wait until the optimum is bracketed
        for size in sizes[i - 1 : i + 2]:
            for seed in seeds:
                if (budget, variant, size, seed) not in done:
                    seed_runs.append(dict(budget=budget, variant=variant, size=size, seed=seed))
    return dict(edges=edges, extend_runs=extend_runs, seed_runs=seed_runs)
