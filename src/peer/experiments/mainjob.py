"""The main job: dense vs PEER at the same training FLOPs on the starter corpus, end to end.

    peer main [--out runs/main] [--budget 1.5e13] [--quick]

1. prepares the starter corpus (``peer data prepare``; a no-op when it is there),
2. trains ``configs/dense.toml`` and ``configs/peer.toml`` (PEER in the middle block) side by side
   (one process each, the cores split; ``--parallel 1``: one after the other) with the same
   FLOP budget ``train.flops`` (steps = budget / FLOPs per step, the paper's isoFLOP protocol),
3. evaluates both on every evaluation set (perplexity; PEER's expert usage and unevenness),
4. prints a side-by-side table, writes ``comparison.json`` / ``comparison.md`` and plots
   (``plots/loss_vs_tokens.png``, ``plots/loss_vs_flops.png``, ``plots/expert_usage.png``) to the
   out dir, and generates a short sample from each model.

Re-running skips what is done: a complete run is not retrained, an interrupted one is resumed from
its last checkpoint. ``--quick`` shrinks both models to seconds-long runs (for tests).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

from ..config import Config, ConfigError, load_config
from ..errors import PeerError, UsageError
from ..fsutil import atomic_write_text

__all__ = ["DEFAULT_BUDGET", "MODELS", "plan", "main_job", "format_table", "format_markdown", "add_arguments", "run"]

# Training FLOPs per model (see docs/mainjob.md for timings): 2309 steps of 2048 tokens for dense,
# 2030 for PEER (its sub-key scoring costs FLOPs), side by side ~17 min on 2 idle cores.
DEFAULT_BUDGET = 1.5e13
EVAL_BATCHES = 40  # per evaluation set, as the recipe study (docs/recipe.md): the same numbers as its seed-0 runs
MODELS = ("dense", "peer")
PROMPT = "The state of the Union"

# --quick: tiny versions of the presets (same backbone for both), a few steps each
QUICK = [
    "model.d_model=64",
    "model.n_layers=2",
    "model.n_heads=2",
    "model.d_ff=256",
    "model.max_seq_len=32",
    "model.peer.num_experts=256",
    "model.peer.heads=2",
    "model.peer.topk=4",
    "model.peer.key_dim=16",
    "train.seq_len=32",
    "train.batch_size=4",
    "train.eval_batches=2",
    "train.log_every=1",
    "train.eval_every=0",
    "train.ckpt_every=1000",
    "train.tensorboard=false",
    "optim.warmup_steps=2",
]
QUICK_STEPS = 6  # the quick budget: this many steps of the quick dense model


def _configs_dir() -> Path:
    """configs/ of the source tree (editable install), else ./configs."""
    from ..config import PRESETS_DIR

    return PRESETS_DIR


def _say(msg: str) -> None:
    print(msg, flush=True)


# ------------------------------------------------------------------ plan
def plan(
    out: str | Path,
    corpus: str | Path,
    vocab_size: int,
    budget: float | None = None,
    quick: bool = False,
    threads: int = 0,
    progress: bool = True,
) -> dict[str, Config]:
    """The two run configs: the presets with the corpus, out dirs and the shared FLOP budget."""
    from ..flops import train_flops_per_step

    out, cfgs = Path(out), {}
    base = [
        f"data.corpus={json.dumps(str(corpus))}",
        f"model.vocab_size={vocab_size}",
        f"train.threads={threads}",
        f"train.progress={'true' if progress else 'false'}",
    ]
    if quick:
        base += QUICK
        if budget is None:
            dense = load_config(_configs_dir() / "dense.toml", base + ["train.flops=0"])
            budget = QUICK_STEPS * train_flops_per_step(dense)
    budget = DEFAULT_BUDGET if budget is None else float(budget)
    if not budget > 0:
        raise ConfigError(f"--budget: must be a positive number of FLOPs, got {budget}")
    for name in MODELS:
        cfgs[name] = load_config(
            _configs_dir() / f"{name}.toml",
            base + [f"train.flops={budget!r}", f"train.out_dir={json.dumps(str(out / name))}"],
        )
    return cfgs


def _prepare_corpus(corpus: Path, default: bool) -> None:
    """The starter corpus at its default place is built (or found); any other --corpus must exist."""
    from ..data import list_splits, prepare

    if default:
        prepare(out=corpus, log=_say)
    elif "train" not in list_splits(corpus):
        raise FileNotFoundError(
            f"--corpus {str(corpus)!r}: not a prepared corpus (no splits/train.bin); "
            "see `peer data prepare` / `peer data tokenize`"
        )


# ------------------------------------------------------------------ the job
def main_job(
    out: str | Path = "runs/main",
    budget: float | None = None,
    quick: bool = False,
    corpus: str | Path | None = None,
    eval_batches: int | None = EVAL_BATCHES,
    threads: int = 0,
    prompt: str = PROMPT,
    max_new_tokens: int = 60,
    progress: bool = True,
    parallel: int = 2,
) -> dict:
    """Run the main job (see the module docstring); returns the comparison written to comparison.json."""
    from ..data import load_tokenizer
    from ..eval import evaluate, run_tokenizer
    from ..generate import sample
    from ..plots import plot_curves
    from ..train import load_run, resolve_steps, train_or_resume
    from ..train.signals import Interrupted, Workers

    t0 = time.perf_counter()
    out = Path(out)
    corpus_path = Path(corpus) if corpus is not None else Path("data/starter")
    _say(f"== corpus: {corpus_path}")
    _prepare_corpus(corpus_path, default=corpus is None)
    tokenizer = load_tokenizer(corpus_path)
    cfgs = plan(out, corpus_path, tokenizer.vocab_size, budget, quick, threads, progress)
    budget = cfgs["dense"].train.flops
    timing: dict[str, float] = {"prepare_s": time.perf_counter() - t0}
    state_path = out / "mainjob_state.json"
    state = json.loads(state_path.read_text(encoding="utf-8")) if state_path.is_file() else {}

    side_by_side = parallel > 1 and len(cfgs) > 1
    if side_by_side:  # one process per run, the cores split between them (never two full thread pools)
        each = max(1, (threads or os.cpu_count() or 2) // len(cfgs))
        _say(f"== train {', '.join(cfgs)} side by side, {each} thread(s) each; logs in <run>/train.log")
        cfgs = {n: replace(c, train=replace(c.train, threads=each, progress=False)) for n, c in cfgs.items()}
    for name, cfg in cfgs.items():
        _say(
            f"== train {name}: {resolve_steps(cfg)} steps x {cfg.train.tokens_per_step} tokens, "
            f"budget {budget:.3g} FLOPs -> {cfg.train.out_dir}"
        )
        _say(f"   recipe: {describe_recipe(cfg)}")

    workers = Workers()  # side by side: Ctrl-C / SIGTERM reach the children, which save a checkpoint and stop

    def train_one(name: str) -> tuple[str, float]:
        t = time.perf_counter()
        status = _train_in_process(cfgs[name], workers) if side_by_side else train_or_resume(cfgs[name])
        _say(f"   {name}: {status} ({time.perf_counter() - t:.0f} s)")
        return status, time.perf_counter() - t

    if side_by_side:
        with workers.forwarding(), ThreadPoolExecutor(len(cfgs)) as pool:
            done = dict(zip(cfgs, pool.map(train_one, cfgs), strict=True))
        if workers.stopped:
            stopped = [name for name, (status, _) in done.items() if status == "stopped"]
            raise Interrupted(
                f"stopped by {signal.Signals(workers.stopped).name}: {', '.join(stopped) or 'no run'} "
                "saved a checkpoint; the same command resumes",
                workers.stopped,
            )
    else:
        done = {name: train_one(name) for name in cfgs}
    results: dict[str, dict] = {}
    for name, cfg in cfgs.items():
        status, seconds = done[name]
        if status != "complete":  # training wall time, summed over interrupted and resumed parts
            before = state.get(f"{name}_train_s", 0.0) if status == "resumed" else 0.0
            state[f"{name}_train_s"] = before + seconds
            atomic_write_text(state_path, json.dumps(state, indent=1) + "\n")
        steps = resolve_steps(cfg)
        results[name] = {
            "run_dir": cfg.train.out_dir,
            "status": status,
            "steps": steps,
            "recipe": describe_recipe(cfg),
            "tokens": steps * cfg.train.tokens_per_step,
            "train_s": state.get(f"{name}_train_s"),
        }
    timing["train_s"] = sum(r["train_s"] or 0.0 for r in results.values())
    timing["train_wall_s"] = time.perf_counter() - t0 - timing["prepare_s"]

    t = time.perf_counter()
    plots = out / "plots"
    for name, cfg in cfgs.items():
        _say(f"== evaluate {name}")
        model, run_cfg, meta = load_run(cfg.train.out_dir)
        report = evaluate(
            cfg.train.out_dir, max_batches=eval_batches, plot_dir=plots, model_and_cfg=(model, run_cfg, meta)
        )
        results[name].update(report=report, flops=float(meta.get("flops", budget)))
        results[name]["sample"] = sample(
            model, run_tokenizer(cfg.train.out_dir, run_cfg), prompt, max_new_tokens=max_new_tokens, seed=0
        )
    timing["eval_s"] = time.perf_counter() - t
    curves = plot_curves([cfgs[n].train.out_dir for n in cfgs], plots, names=list(cfgs))
    timing["total_s"] = time.perf_counter() - t0

    comparison = {
        "budget_flops": budget,
        "corpus": str(corpus_path),
        "quick": quick,
        "eval_batches": eval_batches,
        "prompt": prompt,
        "timing": timing,
        "plots": sorted(str(p) for p in plots.glob("*.png")),
        "runs": {name: _summary(r, curves[name]) for name, r in results.items()},
    }
    atomic_write_text(out / "comparison.json", json.dumps(comparison, indent=1) + "\n")
    atomic_write_text(out / "comparison.md", format_markdown(comparison))
    print("\n" + format_table(comparison))
    print("\n" + "\n".join(confirmation_lines()))
    for name, r in comparison["runs"].items():
        print(f"\n--- sample from {name} (temperature 0.8, top-k 50, top-p 0.95, seed 0) ---\n{prompt}{r['sample']}")
    print(
        f"\nwrote {out / 'comparison.json'}, {out / 'comparison.md'} and plots in {plots} "
        f"({timing['total_s']:.0f} s in all)"
    )
    return comparison


def _train_in_process(cfg: Config, workers) -> str:
    """``train_or_resume(cfg)`` in a child process (``peer.train.worker``) of ``workers``, output in
    ``<run>/train.log``; ``"stopped"`` when a signal stopped it (its checkpoint resumes it)."""
    from ..config import config_to_dict

    run_dir = Path(cfg.train.out_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    job = run_dir / "train_job.json"
    atomic_write_text(job, json.dumps({"config": config_to_dict(cfg)}, indent=1))
    with open(run_dir / "train.log", "a", encoding="utf-8") as log:
        code = workers.run([sys.executable, "-m", "peer.train.worker", str(job)], log)
    if workers.stopped:
        return "stopped"
    status = json.loads(job.read_text(encoding="utf-8")).get("status")
    if code != 0 or status is None:
        tail = (run_dir / "train.log").read_text(encoding="utf-8", errors="replace").strip().splitlines()[-1:]
        raise PeerError(
            f"training {run_dir} failed (exit {code}): {tail[0] if tail else 'no output'}; see {run_dir / 'train.log'}"
        )
    return status


def _summary(r: dict, curve: dict) -> dict:
    rep = r["report"]
    return {
        "run_dir": r["run_dir"],
        "status": r["status"],
        "recipe": r.get("recipe", ""),
        "steps": r["steps"],
        "tokens": r["tokens"],
        "train_flops": r["flops"],
        "train_s": r["train_s"],
        "model": rep["model"],
        "params": rep["params"],
        "final_train_loss": float(curve["loss"][-1]) if len(curve["loss"]) else None,
        "final_val_loss": float(curve["val_loss"][-1]) if len(curve["val_loss"]) else None,
        "perplexity": {s: v["perplexity"] for s, v in rep["sets"].items()},
        "eval_tokens": {s: v["tokens"] for s, v in rep["sets"].items()},
        "experts": {
            layer: {k: e.get(k) for k in ("experts", "usage", "unevenness", "set")}
            for layer, e in rep["experts"].items()
        },
        "sample": r["sample"],
    }


def describe_recipe(cfg: Config) -> str:
    """One line saying which recipe a run uses: backbone, lr, and the sparse layer's shape and options."""
    m, o = cfg.model, cfg.optim
    text = f"d_model {m.d_model}, {m.n_layers} blocks, lr {o.lr:g}, warmup {o.warmup_steps}"
    if m.sparse_layer == "peer":
        p = m.peer
        n = int(round(p.num_experts**0.5))
        where = m.sparse_blocks if isinstance(m.sparse_blocks, str) else ",".join(map(str, m.sparse_blocks))
        text += (
            f"; PEER {n}^2 experts, h={p.heads}, k={p.topk}, key_dim={p.key_dim}, {p.query_norm}, {p.score}, "
            f"v init x{p.value_init_scale:g}, blocks {where} ({m.sparse_placement}"
            f"{', shared pool' if m.share_experts else ''}), expert lr x{o.expert_lr_mult:g}"
            + (
                f" -> x{o.expert_lr_mult_final:g} ({o.expert_lr_mult_schedule})"
                if o.expert_lr_mult_schedule != "constant" and o.expert_lr_mult_final != o.expert_lr_mult
                else ""
            )
            + f", table weight decay {o.expert_weight_decay:g}"
            + (", lazy row AdamW" if o.sparse_experts else "")
        )
    elif m.sparse_layer != "none":
        text += f"; {m.sparse_layer} in blocks {m.sparse_blocks}"
    return text


# ------------------------------------------------------------------ tables
def _rows(comparison: dict) -> tuple[list[str], list[tuple[str, list[str]]]]:
    names = list(comparison["runs"])
    runs = [comparison["runs"][n] for n in names]
    rows = [
        ("params, total", [f"{r['params']['total']:,}" for r in runs]),
        ("params, active per token", [f"{r['params']['active']:,}" for r in runs]),
        ("training FLOPs", [f"{r['train_flops']:.3g}" for r in runs]),
        ("steps / tokens", [f"{r['steps']} / {r['tokens']:,}" for r in runs]),
        ("training time", [f"{r['train_s']:.0f} s" if r["train_s"] is not None else "-" for r in runs]),
    ]
    sets = list(dict.fromkeys(s for r in runs for s in r["perplexity"]))
    for s in sets:
        rows.append((f"perplexity {s}", [f"{r['perplexity'][s]:.2f}" if s in r["perplexity"] else "-" for r in runs]))
    layers = list(dict.fromkeys(layer for r in runs for layer in r["experts"]))
    for layer in layers:
        for key, label, fmt in (
            ("usage", "expert usage", lambda v: f"{100 * v:.1f}%"),
            ("unevenness", "unevenness (KL)", lambda v: f"{v:.3f}"),
        ):
            rows.append(
                (
                    f"{label}, {layer}",
                    [
                        fmt(r["experts"][layer][key])
                        if layer in r["experts"] and r["experts"][layer].get(key) is not None
                        else "-"
                        for r in runs
                    ],
                )
            )
    return names, rows


def format_table(comparison: dict) -> str:
    """The side-by-side table, as plain text."""
    names, rows = _rows(comparison)
    w0 = max(len(label) for label, _ in rows)
    ws = [max(len(n), *(len(v[i]) for _, v in rows)) for i, n in enumerate(names)]
    head = f"{'':<{w0}}  " + "  ".join(f"{n:>{w}}" for n, w in zip(names, ws, strict=True))
    lines = [f"dense vs PEER at {comparison['budget_flops']:.3g} training FLOPs each (one seed each)"]
    lines += [f"  recipe {n}: {comparison['runs'][n].get('recipe', '')}" for n in names]
    lines += [head, "-" * len(head)]
    lines += [
        f"{label:<{w0}}  " + "  ".join(f"{v:>{w}}" for v, w in zip(vals, ws, strict=True)) for label, vals in rows
    ]
    return "\n".join(lines)


CONFIRMATION = Path("results/confirm/final/summary.json")  # written by `python -m studies.confirmation`
_MARK = {"PEER": " *", "baseline": " !", "tie": ""}  # a gap's verdict (studies.confirmation.gap_stats)


def confirmation_lines(path: str | Path = CONFIRMATION) -> list[str]:
    """What the main job's one-seed table may be read as: the confirmation study's gaps (PEER against
    each method's tuned recipe, fresh seeds, held-out splits; docs/confirmation.md) when its summary is
    here, else that the claim is not confirmed yet. The table itself never claims more."""
    p = Path(path)
    if not p.is_file():
        return [
            "Not confirmed yet: the table above is one seed per model on this machine. The fair comparison",
            "(equal tuning for every method, a causal MoE, fresh seeds, held-out test splits: docs/confirmation.md)",
            "has not finished; until it has, read no more into this table than one seed shows.",
        ]
    summary = json.loads(p.read_text(encoding="utf-8"))
    missing = {b: m for b, m in summary.get("missing", {}).items() if m}
    lines = [
        "The confirmation study (docs/confirmation.md; each method tuned equally, 5 fresh seeds): method - PEER",
        "in nats per token with its standard error (> 0: PEER lower; by more than 2 standard errors: * PEER lower,",
        "! the baseline lower):",
    ]
    if summary.get("tuning"):
        lines.append(
            "  recipes chosen from (configurations tried, runs): "
            + ", ".join(f"{m} {t['configurations']} ({t['runs']})" for m, t in summary["tuning"].items())
        )
    if missing:
        lines.insert(
            0,
            "Interim: the confirmation study has not finished ("
            + "; ".join(f"{b}: {len(m)} run(s) to go" for b, m in missing.items())
            + "); interim budgets are marked and prove nothing yet.",
        )
    for budget, splits in summary["budgets"].items():
        tag = " (interim)" if budget in missing else ""
        gaps = [g for entry in splits.values() for g in entry["gaps"].values() if g["verdict"] is not None]
        if not gaps:
            lines.append(f"  {budget}{tag}: no gap yet (PEER and a baseline need at least two seeds each)")
            continue
        won = sum(g["verdict"] == "PEER" for g in gaps)
        lost = sum(g["verdict"] == "baseline" for g in gaps)
        lines.append(
            f"  {budget}{tag}: PEER lower by > 2 se in {won} of {len(gaps)} (split, baseline) pairs, "
            f"a baseline lower by > 2 se in {lost}, the rest ties"
        )
        for split, entry in splits.items():
            cells = "  ".join(
                f"{m} {g['gap']:+.3f} ± {g['se']:.3f}{_MARK[g['verdict']]}"
                for m, g in entry["gaps"].items()
                if g["verdict"] is not None
            )
            if cells:
                lines.append(f"  {budget}{tag} {split:<22} {cells}")
    return lines


def format_markdown(comparison: dict) -> str:
    """comparison.md: the table and the samples."""
    names, rows = _rows(comparison)
    md = [
        f"# Main job: dense vs PEER at {comparison['budget_flops']:.3g} training FLOPs",
        "",
        f"Corpus `{comparison['corpus']}`; perplexity over up to {comparison['eval_batches']} batches per set; "
        f"wall time {comparison['timing']['total_s']:.0f} s; one seed per model.",
        "",
        *[f"- recipe **{n}**: {comparison['runs'][n].get('recipe', '')}" for n in names],
        "",
        "| | " + " | ".join(names) + " |",
        "|---|" + "---:|" * len(names),
    ]
    md += [f"| {label} | " + " | ".join(vals) + " |" for label, vals in rows]
    md += ["", "## What this table shows", "", *confirmation_lines(), "", "## Samples", ""]
    for n in names:
        md += [f"**{n}**: {comparison['prompt']}{comparison['runs'][n]['sample']}".replace("\n", " "), ""]
    md += ["## Plots", ""] + [f"- `{p}`" for p in comparison["plots"]]
    return "\n".join(md) + "\n"


# ------------------------------------------------------------------ CLI
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="runs/main", help="where the runs, plots and comparison go")
    parser.add_argument(
        "--budget",
        type=float,
        default=None,
        help=f"training FLOPs per model (default {DEFAULT_BUDGET:g}; --quick: {QUICK_STEPS} tiny steps)",
    )
    parser.add_argument(
        "--quick", action="store_true", help="tiny models, a few steps: a seconds-long end-to-end check"
    )
    parser.add_argument("--corpus", default=None, help="a prepared corpus dir (default: build data/starter)")
    parser.add_argument(
        "--eval-batches",
        type=int,
        default=EVAL_BATCHES,
        help=f"batches per evaluation set (default {EVAL_BATCHES}; 0: all)",
    )
    parser.add_argument("--threads", type=int, default=0, help="torch threads in all (0: torch's default)")
    parser.add_argument(
        "--parallel",
        type=int,
        default=2,
        help="train the two runs side by side, each with 1/parallel of the threads (default 2; 1: one after the other)",
    )
    parser.add_argument("--prompt", default=PROMPT, help="prompt for the samples")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> int:
    if args.eval_batches < 0:
        raise UsageError(f"--eval-batches: must be >= 0, got {args.eval_batches}")
    if args.parallel < 1:
        raise UsageError(f"--parallel: must be >= 1, got {args.parallel}")
    main_job(
        args.out,
        args.budget,
        args.quick,
        args.corpus,
        args.eval_batches or None,
        args.threads,
        args.prompt,
        progress=not args.no_progress and sys.stderr.isatty(),
        parallel=args.parallel,
    )
    return 0
