"""isoFLOP planning: budgets x variants x model sizes -> runs, each with steps = budget / FLOPs per step.

The paper (§3) compares methods at fixed training budgets: for each budget and method it trains
several model sizes, the number of training tokens following from the budget, and picks the
compute-optimal (lowest validation perplexity) model. A sweep file says:

    [sweep]
    name = "isoflop"
    budgets = [3e12, 1e13]            # training FLOPs per run
    min_steps = 50                    # sizes that get fewer steps are skipped (too big)
    max_params = 0                    # 0: no limit on active params
    base = "sweep_base.toml"          # optional: a Config TOML every run starts from (relative to
                                      # this file; a path relative to the working directory also works)
    set = ["train.batch_size=16"]     # optional: overrides applied to every run
    seeds = [0, 1, 2]                 # optional: every point trained once per seed (train.seed);
                                      # run dirs then end in /seed<S>; tables give mean ± std (n)

    [[sizes]]                          # the backbone family (what the paper varies for dense)
    name = "d128_l4"
    set = ["model.d_model=128", "model.n_layers=4", "model.n_heads=4"]

    [variants.dense]                   # methods or ablation arms; each is a list of overrides
    set = []
    [variants.peer]
    set = ["model.sparse_layer=peer", "model.peer.num_experts=65536"]

Steps come from :func:`peer.flops.train_flops_per_step` (the one source of FLOP truth).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from ...config import Config, ConfigError, apply_overrides, find_preset, load_config, read_toml
from ...flops import count_params, train_flops_per_step
from ...train.loop import with_corpus_vocab

__all__ = ["SweepSpec", "PlannedRun", "load_sweep", "plan", "plan_table", "plan_totals", "budget_label"]


@dataclass
class SweepSpec:
    name: str
    budgets: list[float]
    sizes: dict[str, list[str]]
    variants: dict[str, list[str]]
    base: str = ""
    overrides: list[str] = field(default_factory=list)
    min_steps: int = 20
    max_params: int = 0
    out_dir: str = ""
    parallel: int = 1
    threads: int = 0  # torch threads per run; 0: the machine's cores split over the parallel runs
    device: str = ""  # train.device of every run ("": the base config's); how runs execute, not what they train
    eval_batches: int = 40
    source: str = ""
    seeds: list[int] = field(default_factory=lambda: [0])
    seeded: bool = False  # the sweep file lists seeds: run ids and dirs carry /seed<S>

    @property
    def root(self) -> Path:
        return Path(self.out_dir or f"results/{self.name}")


@dataclass
class PlannedRun:
    """One training run of the sweep: a budget, a variant (method / ablation arm) and a size."""

    budget: float
    variant: str
    size: str
    config: Config
    steps: int
    flops_per_step: float
    tokens: int
    params_total: int
    params_active: int
    skipped: str = ""  # why the run is not trained ("" = it is)
    seed: int = 0
    seeded: bool = False

    @property
    def point_id(self) -> str:
        """The (budget, variant, size) point; its seeds share it."""
        return run_id(self.budget, self.variant, self.size)

    @property
    def run_id(self) -> str:
        return run_id(self.budget, self.variant, self.size, self.seed, self.seeded)


def run_id(budget: float, variant: str, size: str, seed: int = 0, seeded: bool = False) -> str:
    """A run's id (and its folder under the sweep root): ``<budget>/<variant>/<size>``, then ``/seed<S>`` in a
    seeded sweep; unseeded, the point's id."""
    point = f"{budget_label(budget)}/{variant}/{size}"
    return f"{point}/seed{seed}" if seeded else point


def budget_label(budget: float) -> str:
    """3e12 -> '3e12', 1.5e13 -> '1.5e13' (stable, filesystem-friendly)."""
    mant, exp = f"{budget:.3e}".split("e")
    mant = mant.rstrip("0").rstrip(".")
    return f"{mant}e{int(exp)}"


def _str_list(value, name: str) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ConfigError(f"{name}: expected a list of 'key=value' strings, got {value!r}")
    return value


def load_sweep(path: str | Path) -> SweepSpec:
    """Read and validate a sweep TOML file; errors name the field."""
    p = find_preset(path)
    data = read_toml(p, "sweep")
    known = {"sweep", "sizes", "variants"}
    for key in data:
        if key not in known:
            raise ConfigError(f"{key}: unknown section; known sections: {', '.join(sorted(known))}")
    s = data.get("sweep", {})
    allowed = {
        "name",
        "budgets",
        "base",
        "set",
        "min_steps",
        "max_params",
        "out_dir",
        "parallel",
        "threads",
        "device",
        "eval_batches",
        "seeds",
    }
    for key in s:
        if key not in allowed:
            raise ConfigError(f"sweep.{key}: unknown setting; known: {', '.join(sorted(allowed))}")
    budgets = s.get("budgets")
    if not isinstance(budgets, list) or not budgets or not all(isinstance(b, (int, float)) and b > 0 for b in budgets):
        raise ConfigError(f"sweep.budgets: expected a non-empty list of positive FLOP counts, got {budgets!r}")
    sizes = {}
    for i, entry in enumerate(data.get("sizes", [])):
        if not isinstance(entry, dict) or "name" not in entry:
            raise ConfigError(f"sizes[{i}]: each size needs a name and a set list")
        if set(entry) - {"name", "set"}:
            raise ConfigError(
                f"sizes[{i}]: unknown key(s) {', '.join(sorted(set(entry) - {'name', 'set'}))}; known: name, set"
            )
        sizes[str(entry["name"])] = _str_list(entry.get("set"), f"sizes[{i}].set")
    if not sizes:
        raise ConfigError("sizes: at least one [[sizes]] entry is required")
    variants = {}
    for name, entry in (data.get("variants") or {}).items():
        if not isinstance(entry, dict):
            raise ConfigError(f"variants.{name}: expected a table with a set list")
        if set(entry) - {"set"}:  # e.g. [variants.lr0.1] is the table lr0 holding a table "1": quote dotted names
            raise ConfigError(
                f"variants.{name}: unknown key(s) {', '.join(map(repr, sorted(set(entry) - {'set'})))}; "
                'known: set (quote a variant name that holds a dot: [variants."lr0.1"])'
            )
        variants[name] = _str_list(entry.get("set"), f"variants.{name}.set")
    if not variants:
        raise ConfigError("variants: at least one [variants.NAME] table is required")
    seeds = s.get("seeds", [0])
    if (
        not isinstance(seeds, list)
        or not seeds
        or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in seeds)
        or len(set(seeds)) != len(seeds)
    ):
        raise ConfigError(f"sweep.seeds: expected a non-empty list of distinct integers >= 0, got {seeds!r}")
    spec = SweepSpec(
        name=str(s.get("name", p.stem)),
        budgets=[float(b) for b in budgets],
        sizes=sizes,
        variants=variants,
        base=_resolve_base(p, str(s.get("base", ""))),
        overrides=_str_list(s.get("set"), "sweep.set"),
        min_steps=int(s.get("min_steps", 20)),
        max_params=int(s.get("max_params", 0)),
        out_dir=str(s.get("out_dir", "")),
        parallel=int(s.get("parallel", 1)),
        threads=int(s.get("threads", 0)),
        device=str(s.get("device", "")),
        eval_batches=int(s.get("eval_batches", 40)),
        source=str(p),
        seeds=list(seeds),
        seeded="seeds" in s,
    )
    if spec.parallel < 1:
        raise ConfigError("sweep.parallel: must be >= 1")
    if spec.threads < 0:
        raise ConfigError("sweep.threads: must be >= 0 (0: the cores split over the parallel runs)")
    if spec.min_steps < 1:
        raise ConfigError("sweep.min_steps: must be >= 1")
    return spec


def _resolve_base(sweep_file: Path, base: str) -> str:
    """``base`` relative to the sweep file, else to the working directory; a missing file names both."""
    if not base or Path(base).is_absolute():
        return base
    here = sweep_file.parent / base
    if here.is_file():
        return str(here)
    if Path(base).is_file():
        return base
    raise ConfigError(
        f"sweep.base: {base!r} is neither at {str(here)!r} (next to the sweep file) "
        f"nor at {str(Path(base).resolve())!r}"
    )


def plan(spec: SweepSpec) -> list[PlannedRun]:
    """Every (budget, variant, size, seed) with its step count; runs too big for the budget are marked skipped."""
    base = load_config(spec.base or None)
    runs = []
    for budget in spec.budgets:
        for variant, vset in spec.variants.items():
            for size, sset in spec.sizes.items():
                for seed in spec.seeds:
                    runs.append(_plan_one(spec, base, budget, variant, vset, size, sset, seed))
    return runs


def _plan_one(
    spec: SweepSpec, base: Config, budget: float, variant: str, vset: list[str], size: str, sset: list[str], seed: int
) -> PlannedRun:
    where = f"budget {budget_label(budget)}, variant {variant!r}, size {size!r}"
    try:
        cfg = apply_overrides(base, [*spec.overrides, *sset, *vset, "train.steps=1", f"train.seed={seed}"])
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None
    cfg = with_corpus_vocab(cfg)
    per_step = train_flops_per_step(cfg)
    steps = int(math.floor(budget / per_step))
    pc = count_params(cfg.model)
    skipped = ""
    if steps < spec.min_steps:
        skipped = f"only {steps} steps at this budget (< min_steps={spec.min_steps})"
    elif spec.max_params and pc.active > spec.max_params:
        skipped = f"{pc.active} active params > max_params={spec.max_params}"
    run_dir = spec.root / budget_label(budget) / variant / size
    if spec.seeded:
        run_dir = run_dir / f"seed{seed}"
    cfg = apply_overrides(cfg, [f"train.steps={max(steps, 1)}", "train.flops=0", f"train.out_dir={run_dir.as_posix()}"])
    tokens = steps * cfg.train.tokens_per_step
    return PlannedRun(
        budget, variant, size, cfg, steps, per_step, tokens, pc.total, pc.active, skipped, seed=seed, seeded=spec.seeded
    )


def plan_table(runs: list[PlannedRun]) -> str:
    """A readable table of the plan: sizes, steps and tokens per budget and variant."""
    head = f"{'budget':>8} {'variant':<14} {'size':<12} {'seed':>4} {'params':>10} {'active':>10} {'steps':>7} {'tokens':>11}  note"
    lines = [head, "-" * len(head)]
    for r in runs:
        lines.append(
            f"{budget_label(r.budget):>8} {r.variant:<14} {r.size:<12} {r.seed:>4} {r.params_total:>10,} "
            f"{r.params_active:>10,} {r.steps:>7} {r.tokens:>11,}  {r.skipped}"
        )
    return "\n".join(lines)


STATE_BYTES_PER_PARAM = 16  # fp32 weights, a dense gradient and AdamW's two moments: an upper bound


def plan_totals(runs: list[PlannedRun], parallel: int = 1) -> str:
    """The plan's totals: runs to train, training FLOPs and tokens, and the memory the parameters take
    with their gradients and optimizer state (``STATE_BYTES_PER_PARAM`` bytes each, an upper bound that
    leaves out activations), for the largest run and for the ``parallel`` largest side by side."""
    todo = [r for r in runs if not r.skipped]
    flops = sum(r.steps * r.flops_per_step for r in todo)
    tokens = sum(r.tokens for r in todo)
    sizes = sorted((r.params_total * STATE_BYTES_PER_PARAM for r in todo), reverse=True)
    gib = 2.0**30
    return (
        f"{len(todo)} runs to train ({len(runs) - len(todo)} skipped): {flops:.3g} training FLOPs, {tokens:,} tokens; "
        f"parameters + gradients + AdamW state: largest run {sizes[0] / gib if sizes else 0:.2f} GiB, "
        f"{max(1, parallel)} side by side at most {sum(sizes[: max(1, parallel)]) / gib:.2f} GiB (plus activations)"
    )
