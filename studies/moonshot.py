"""The knowledge study's moonshot (issue 29): new facts without forgetting. Protocol in docs/knowledge.md,
committed before its runs; everything here is mechanical::

    python -m studies.moonshot run --seed 0      # every method at every learning rate of its ladder (2 side by side)
    python -m studies.moonshot choose            # each method's learning rate, from seed 0 (refuses before)
    python -m studies.moonshot run --seed 1      # the chosen learning rates, fresh seeds (1, 2): reported
    python -m studies.moonshot report            # results/knowledge/moonshot/summary.{json,md}, docs/img/moonshot.png
    python -m studies.moonshot posthoc           # addendum 2 (after the report; decides nothing): posthoc/summary.{json,md}
    python -m studies.moonshot overlap           # how much of the facts' retrieval the base's text retrieval shares: overlap.json

Two base models trained on text only (the confirmation screen's incumbent dense and PEER 256² runs, trial 1 of
each by design), each taught 2,000 facts they have never seen (``data/facts_new_r34``) for the same number of
steps by each method; then new-fact recall (every probe) and forgetting (the rise of the starter corpus's
val loss, every token, and of every ``eval_*`` split). Learning rates: each method the same number of rungs,
plus an outward rung where the choice sits at an edge of what was tried.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from peer.fsutil import atomic_write_text
from peer.metrics import mean_std_record as _ms

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "results" / "knowledge" / "moonshot"
BASES = {
    "dense": "results/confirm/screen/1.5e13/dense_t01/d48_l4/seed10",
    "peer": "results/confirm/screen/1.5e13/peer_t01/d48_l4/seed10",
}
# 34 statements per fact (the facts and probes of the pilot's data/facts_new, which had 3): 600 steps read the
# 1.25 M-token stream about once, never twice in one order (addendum of 2026-12-07, docs/knowledge.md)
FACTS = "data/facts_new_r34"
FACTS_CMD = f"peer data facts --out {FACTS} --num-facts 2000 --seed 1 --repeats 34 --tokenizer data/starter"
TEXT = "data/starter"
STEPS = 600  # of 2,048 tokens: ~33 exposures per fact, the 1.25 M-token stream (2,000 facts x 34 statements) read ~once
EVAL_BATCHES = 41  # of 16 x 128 tokens: all of the starter's val split
ROWS = 500  # sparse memory fine-tuning's rows per batch and layer (fixed a priori, not tuned)
PEER_FT = ["optim.expert_lr_mult=1", "optim.expert_lr_mult_schedule=constant"]
SPARSE = ["train.trainable=experts", "optim.sparse_experts=true", "optim.expert_weight_decay=0"]
# method -> (base, --set overrides, learning-rate ladder, first rungs tried)
METHODS: dict[str, tuple[str, list[str], tuple[float, ...], tuple[float, ...]]] = {
    "dense_full": ("dense", [], (3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2), (1e-4, 3e-4, 1e-3, 3e-3)),
    "dense_lora": (
        "dense",
        ["model.lora_rank=8", "model.lora_alpha=16", "train.trainable=lora"],
        (3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1),
        (1e-3, 3e-3, 1e-2, 3e-2),
    ),
    "peer_full": ("peer", PEER_FT, (3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2), (1e-4, 3e-4, 1e-3, 3e-3)),
    "peer_rows": ("peer", PEER_FT + SPARSE, (3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1), (1e-3, 3e-3, 1e-2, 3e-2)),
    "peer_smf": (
        "peer",
        PEER_FT
        + SPARSE
        + [
            f"train.expert_rows={ROWS}",
            "train.row_selection=batch",
            f"train.background={TEXT}",
            "optim.expert_optimizer=sgd",
        ],  # fmt: skip
        (0.3, 1.0, 3.0, 10.0, 30.0, 100.0),
        (1.0, 3.0, 10.0, 30.0),
    ),
}
REFERENCE = "dense_full"  # the target's yardstick: full fine-tuning of the dense model
SPARSE_METHODS = ("peer_rows", "peer_smf")  # "updating only the expert rows that the facts retrieve"
FORGET_SHARE = 0.25
REPORT_SEEDS = (1, 2)
# Addendum 2 (docs/knowledge.md), written after the registered report: rungs beyond a ladder that stopped while
# its method still learned nothing, and every method held to the sparse methods' forgetting cap.
POSTHOC_RUNGS: dict[str, tuple[float, ...]] = {"peer_smf": (100.0, 300.0, 1000.0)}


def lr_name(lr: float) -> str:
    return f"{lr:g}"


def posthoc_dir() -> Path:
    return OUT / "posthoc"


def run_dir(method: str, lr: float, seed: int, root: Path | None = None) -> Path:
    """A fine-tuning's folder under ``root`` (default: the registered runs' OUT)."""
    return (OUT if root is None else root) / f"seed{seed}" / f"{method}_lr{lr_name(lr)}"


def _evaluate(run: str | Path) -> dict:
    """The starter corpus's val (every token) and the same number of tokens of each eval_* split; every
    probe of the new facts."""
    from peer.eval import evaluate

    r = evaluate(run, corpus=ROOT / TEXT, facts=ROOT / FACTS, max_batches=EVAL_BATCHES)
    return {"loss": {s: v["loss"] for s, v in r["sets"].items()}, "recall": r["knowledge"]["recall"],
            "bits": r["knowledge"]["bits"], "value_nats": r["knowledge"]["value_nats_per_token"]}  # fmt: skip


def base_eval(base: str) -> dict:
    path = OUT / f"base_{base}.json"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(_evaluate(ROOT / BASES[base]), indent=1) + "\n")
    return json.loads(path.read_text())


def fine_tune(method: str, lr: float, seed: int, root: Path | None = None) -> dict:
    """Train (resumable: ``peer train`` resumes an interrupted run folder) and evaluate one fine-tuning, under
    ``root`` (a post hoc run reuses the registered run of the same method, rate and seed if there is one)."""
    for done in (run_dir(method, lr, seed) / "moonshot.json", run_dir(method, lr, seed, root) / "moonshot.json"):
        if done.is_file():
            return json.loads(done.read_text())
    out = run_dir(method, lr, seed, root)
    base, sets, _, _ = METHODS[method]
    src = ROOT / BASES[base]
    args = [sys.executable, "-m", "peer", "train", str(src / "config.toml"), "--out", str(out), "--set",
            f"data.corpus={FACTS}", f"train.init_from={src}", "train.flops=0", f"train.steps={STEPS}",
            f"train.seed={seed}", f"optim.lr={lr:g}", "train.threads=1", "train.eval_every=0", "train.tensorboard=false",
            "train.progress=false", f"train.ckpt_every={STEPS}", "train.keep_last=1", *sets]  # fmt: skip
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.parent / f"{out.name}.log", "a") as log:
        subprocess.run(args, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, check=True)
    r = {"method": method, "lr": lr, "seed": seed, **_evaluate(out)}
    atomic_write_text(done, json.dumps(r, indent=1) + "\n")
    return r


def results(seed: int, posthoc: bool = False) -> dict[str, dict[float, dict]]:
    """method -> lr -> result of ``seed``'s runs on the registered ladders (and with ``posthoc``, the post hoc
    rungs too)."""
    out: dict[str, dict[float, dict]] = {m: {} for m in METHODS}
    for m, (_, _, ladder, _) in METHODS.items():
        rungs = [(lr, None) for lr in ladder] + (
            [(lr, posthoc_dir()) for lr in POSTHOC_RUNGS.get(m, ())] if posthoc else []
        )
        for lr, root in rungs:
            f = run_dir(m, lr, seed, root) / "moonshot.json"
            if f.is_file():
                out[m][lr] = json.loads(f.read_text())
    return out


def forgetting(r: dict, base: dict, split: str = "val") -> float:
    return r["loss"][split] - base["loss"][split]


def choose_lr(
    method: str, rs: dict[float, dict], bases: dict[str, dict], ref: dict | None, capped: bool | None = None
) -> float | None:
    """The method's learning rate from its seed-0 runs ``rs`` (lr -> result): the reference and the dense /
    PEER full and LoRA fine-tunings take the highest recall; the sparse methods (every method, with
    ``capped``: addendum 2) the highest recall whose forgetting is at most FORGET_SHARE of the reference's
    (the target's constraint), else the least forgetting. Ties: the smaller learning rate."""
    base = bases[METHODS[method][0]]
    if method in SPARSE_METHODS if capped is None else capped:
        assert ref is not None
        cap = FORGET_SHARE * forgetting(ref, bases[METHODS[REFERENCE][0]])
        ok = [lr for lr in sorted(rs) if forgetting(rs[lr], base) <= cap]
        if ok:
            return max(ok, key=lambda lr: (rs[lr]["recall"], -lr))
        return min(sorted(rs), key=lambda lr: forgetting(rs[lr], base))
    return max(sorted(rs), key=lambda lr: (rs[lr]["recall"], -lr))


def needed(seed0: dict[str, dict[float, dict]], bases: dict[str, dict]) -> dict[str, list[float]]:
    """method -> learning rates seed 0 still needs: the first rungs, then one rung outward while the choice
    sits at an edge of what was tried (and the ladder goes on). The reference is settled first."""
    want: dict[str, list[float]] = {}
    order = [REFERENCE] + [m for m in METHODS if m != REFERENCE]
    ref = None
    for m in order:
        _, _, ladder, first = METHODS[m]
        tried = sorted(set(first) | set(seed0[m]))
        missing = [lr for lr in tried if lr not in seed0[m]]
        if missing:
            want[m] = missing
            continue
        if m in SPARSE_METHODS and ref is None:  # their choice needs the reference's: it runs first
            continue
        lr = choose_lr(m, seed0[m], bases, ref)
        i = ladder.index(lr)
        if lr == tried[0] and i > 0:
            want[m] = [ladder[i - 1]]
        elif lr == tried[-1] and i < len(ladder) - 1:
            want[m] = [ladder[i + 1]]
        if m == REFERENCE and m not in want:
            ref = seed0[m][lr]
    return want


def choice(bases: dict[str, dict]) -> dict[str, float]:
    seed0 = results(0)
    want = needed(seed0, bases)
    if want:
        raise SystemExit(f"seed 0 is not complete: {want} (run `python -m studies.moonshot run --seed 0`)")
    ref = seed0[REFERENCE][choose_lr(REFERENCE, seed0[REFERENCE], bases, None)]
    return {m: choose_lr(m, seed0[m], bases, ref) for m in METHODS}


def posthoc_choice(bases: dict[str, dict]) -> tuple[dict[str, float], dict[str, list[float]]]:
    """Addendum 2: every method's rate by the sparse methods' rule (the best recall within the forgetting cap
    set by the registered reference), on seed 0's registered and post hoc rungs; and the post hoc rungs seed 0
    still needs (none while any is missing: the choice waits for them)."""
    seed0 = results(0, posthoc=True)
    missing = {m: todo for m, lrs in POSTHOC_RUNGS.items() if (todo := [lr for lr in lrs if lr not in seed0[m]])}
    if missing:
        return {}, missing
    ref = seed0[REFERENCE][json.loads((OUT / "choice.json").read_text())[REFERENCE]]
    chosen = {m: choose_lr(m, seed0[m], bases, ref, capped=True) for m in METHODS}
    return {m: lr for m, lr in chosen.items() if lr is not None}, {}


def overlap_stats(facts: list, text_w: torch.Tensor, text_hits: torch.Tensor, text_batches: int, rows: int) -> dict:
    """How much the expert rows the new facts retrieve are rows text retrieves too, for one layer: ``facts``
    the router weight per expert of each facts batch; ``text_w``, ``text_hits``: the text batches' summed
    router weight per expert and how many of the ``text_batches`` retrieve it. ``top_rows_share``: per facts
    batch, the share of its router weight on its ``rows`` experts of largest TF-IDF (``peer_smf``'s rule,
    :mod:`peer.train.memory_rows`, with this text as background), averaged over the batches."""
    from peer.train.memory_rows import batch_top_rows, idf

    f_w = torch.stack(facts).sum(0)
    f_used, t_used = f_w > 0, text_w > 0
    w = idf(text_hits, text_batches)
    shares = [float(u[batch_top_rows(u, w, rows)].sum() / u.sum()) for u in facts]
    return {
        "experts": int(f_w.numel()),
        "facts_experts": int(f_used.sum()),
        "text_experts": int(t_used.sum()),
        "facts_experts_text_retrieves": float((f_used & t_used).sum() / f_used.sum()),
        "facts_weight_on_text_experts": float(f_w[t_used].sum() / f_w.sum()),
        "text_weight_on_facts_experts": float(text_w[f_used].sum() / text_w.sum()),
        "top_rows_share": sum(shares) / len(shares),
    }


def summarize(
    chosen: dict[str, float], runs: dict[str, list[dict]], bases: dict[str, dict], judge: bool = True
) -> dict:
    """Per method (at its chosen lr, over the report seeds): recall, bits, forgetting on every split; and the
    target: a sparse method with recall >= the reference's and forgetting <= FORGET_SHARE of it (means)."""
    table = {}
    for m, rs in runs.items():
        base = bases[METHODS[m][0]]
        splits = sorted(set.intersection(*(set(r["loss"]) for r in rs)) & set(base["loss"])) if rs else []
        table[m] = {
            "lr": chosen[m],
            "seeds": [r["seed"] for r in rs],
            "recall": _ms([r["recall"] for r in rs]),
            "bits": _ms([r["bits"] for r in rs]),
            "forgetting": {s: _ms([forgetting(r, base, s) for r in rs]) for s in splits},
        }
    ref = table.get(REFERENCE)
    target = {}
    if ref and judge:
        for m in SPARSE_METHODS:
            if m in table:
                t = table[m]
                f, f_ref = t["forgetting"]["val"]["mean"], ref["forgetting"]["val"]["mean"]
                target[m] = {
                    "recall_vs_reference": t["recall"]["mean"] - ref["recall"]["mean"],
                    "forgetting_share": f / f_ref if f_ref > 0 else math.nan,
                    "met": t["recall"]["mean"] >= ref["recall"]["mean"] and f <= FORGET_SHARE * f_ref,
                }
    return {"methods": table, "target": target, "reference": REFERENCE, "steps": STEPS, "rows": ROWS}


def summary_markdown(
    s: dict, title: str = "# Moonshot: new facts without forgetting (generated by `python -m studies.moonshot report`)"
) -> str:
    lines = [title, "",
             f"{s['steps']} steps of 2,048 tokens per fine-tuning; sparse memory fine-tuning keeps {s['rows']} rows per batch.", "",
             "| method | lr | seeds | new-fact recall % | bits stored | forgetting: val loss rise (nats) |",
             "|---|---|---|---|---|---|"]  # fmt: skip
    for m, t in s["methods"].items():
        f = t["forgetting"].get("val", {"mean": math.nan, "std": math.nan})
        lines.append(
            f"| {m} | {t['lr']:g} | {','.join(map(str, t['seeds']))} | {100 * t['recall']['mean']:.2f} ± "
            f"{100 * t['recall']['std']:.2f} | {t['bits']['mean']:,.0f} ± {t['bits']['std']:,.0f} | "
            f"{f['mean']:+.4f} ± {f['std']:.4f} |"
        )
    if not s["target"]:
        return "\n".join([*lines, ""])
    lines += [
        "",
        "Target (recall ≥ the reference's, forgetting ≤ 25 % of it):",
        "",
        "```",
        json.dumps(s["target"], indent=1),
        "```",
        "",
    ]
    return "\n".join(lines)


def plot(seed0: dict[str, dict[float, dict]], bases: dict[str, dict], path: Path, cap: float | None = None) -> None:
    """Recall against forgetting at every rate of seed 0 (post hoc rungs starred); ``cap``: the target's
    forgetting cap, drawn as a line."""
    from peer.plots import pyplot, save_figure

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for i, (m, rs) in enumerate(seed0.items()):
        lrs = sorted(rs)
        if lrs:
            base = bases[METHODS[m][0]]
            xs, ys = [forgetting(rs[lr], base) for lr in lrs], [100 * rs[lr]["recall"] for lr in lrs]
            ax.plot(xs, ys, marker="o", color=f"C{i}", label=m)
            for x, y, lr in zip(xs, ys, lrs, strict=True):
                star = "*" if lr not in METHODS[m][2] else ""
                ax.annotate(f"{lr:g}{star}", (x, y), fontsize=6, xytext=(2, 2), textcoords="offset points")
    if cap is not None:
        ax.axvline(cap, color="0.5", linestyle=":", linewidth=1, label="forgetting cap (25 % of the reference)")
    ax.set_xscale("symlog", linthresh=0.01)
    ax.set_xlim(left=-0.005)  # forgetting is >= 0 up to noise: no empty negative decades
    ax.set_xlabel("forgetting: rise of starter val loss (nats)")
    ax.set_ylabel("new-fact recall (%)")
    ax.set_title("Learning vs forgetting, every learning rate (seed 0; * post hoc)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, path)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m studies.moonshot", description=__doc__.split("\n\n")[0])
    p.add_argument("action", choices=["run", "choose", "report", "posthoc", "overlap"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--parallel", type=int, default=2, help="fine-tunings side by side, one thread each (default 2)")
    args = p.parse_args(argv)
    if args.parallel < 1:
        p.error(f"--parallel: must be >= 1, got {args.parallel}")

    torch.set_num_threads(1)  # each fine-tuning trains in its own one-thread process and is scored on one thread

    def fine_tune_all(todo: list[tuple[str, float]], seed: int, root: Path | None = None) -> list[dict]:
        with ThreadPoolExecutor(max_workers=args.parallel) as pool:
            return list(pool.map(lambda t: fine_tune(t[0], t[1], seed, root), todo))

    if not (ROOT / FACTS / "facts.jsonl").is_file():
        raise SystemExit(f"{FACTS} is missing: build it with `{FACTS_CMD}`")
    for b, path in BASES.items():
        if not (ROOT / path / "checkpoints").is_dir():
            raise SystemExit(
                f"base model {b} ({path}) has no checkpoint: run `peer sweep configs/confirm_screen.toml --only {path.split('/')[3]}/`"
            )
    bases = {b: base_eval(b) for b in BASES}
    if args.action == "run" and args.seed == 0:
        while want := needed(results(0), bases):
            todo = [(m, lr) for m, lrs in want.items() for lr in lrs]
            for (m, lr), r in zip(todo, fine_tune_all(todo, 0), strict=True):
                print(f"seed 0 {m} lr {lr:g}: recall {100 * r['recall']:.2f}%, forgetting "
                      f"{forgetting(r, bases[METHODS[m][0]]):+.4f}", flush=True)  # fmt: skip
    elif args.action == "run":
        if args.seed not in REPORT_SEEDS:
            raise SystemExit(f"--seed: seed 0 chooses, seeds {REPORT_SEEDS} report; got {args.seed}")
        chosen = json.loads((OUT / "choice.json").read_text()) if (OUT / "choice.json").is_file() else None
        if chosen is None:
            raise SystemExit("no choice yet: `python -m studies.moonshot choose` (after seed 0), and commit it")
        todo = list(chosen.items())
        for (m, lr), r in zip(todo, fine_tune_all(todo, args.seed), strict=True):
            print(f"seed {args.seed} {m} lr {lr:g}: recall {100 * r['recall']:.2f}%", flush=True)
    elif args.action == "choose":
        atomic_write_text(OUT / "choice.json", json.dumps(choice(bases), indent=1) + "\n")
        print(f"wrote {OUT / 'choice.json'}")
    elif args.action == "report":
        chosen = json.loads((OUT / "choice.json").read_text())
        runs = {m: [json.loads(f.read_text()) for s in REPORT_SEEDS if (f := run_dir(m, lr, s) / "moonshot.json").is_file()]
                for m, lr in chosen.items()}  # fmt: skip
        s = summarize(chosen, runs, bases)
        atomic_write_text(OUT / "summary.json", json.dumps(s, indent=1) + "\n")
        atomic_write_text(OUT / "summary.md", summary_markdown(s))
        ref = results(0)[REFERENCE][chosen[REFERENCE]]
        cap = FORGET_SHARE * forgetting(ref, bases[METHODS[REFERENCE][0]])
        plot(results(0, posthoc=True), bases, ROOT / "docs" / "img" / "moonshot.png", cap=cap)
        print(summary_markdown(s))
    elif args.action == "overlap":  # descriptive: why the row updates forget (docs/knowledge.md)
        import itertools

        from peer import data
        from peer.train import load_run
        from peer.train.memory_rows import retrievals

        model, cfg, _ = load_run(ROOT / BASES["peer"])
        B, T, n = cfg.train.batch_size, cfg.train.seq_len, cfg.train.eval_batches  # peer_smf's background sample

        def sample(corpus: str) -> list:
            return list(itertools.islice(iter(data.Batcher(data.open_tokens(ROOT / corpus, "train"), B, T, seed=0)), n))

        text = retrievals(model, sample(TEXT))
        per_batch = [retrievals(model, [b]) for b in sample(FACTS)]
        out = {
            name: overlap_stats([r[name][0] for r in per_batch], w, hits, count, ROWS)
            for name, (w, hits, count) in text.items()
        }
        out = {"base": BASES["peer"], "batches": n, "tokens_per_batch": B * T, "rows": ROWS, "layers": out}
        atomic_write_text(OUT / "overlap.json", json.dumps(out, indent=1) + "\n")
        print(json.dumps(out, indent=1))
    else:  # addendum 2: post hoc, after the report; decides nothing
        if not (OUT / "summary.json").is_file():
            raise SystemExit(
                "post hoc runs come after the registered report: `python -m studies.moonshot report` first"
            )
        todo = [(m, lr) for m, lrs in posthoc_choice(bases)[1].items() for lr in lrs]
        for (m, lr), r in zip(todo, fine_tune_all(todo, 0, posthoc_dir()), strict=True):
            print(f"post hoc seed 0 {m} lr {lr:g}: recall {100 * r['recall']:.2f}%, forgetting "
                  f"{forgetting(r, bases[METHODS[m][0]]):+.4f}", flush=True)  # fmt: skip
        chosen, _ = posthoc_choice(bases)
        atomic_write_text(posthoc_dir() / "choice.json", json.dumps(chosen, indent=1) + "\n")
        capped_runs: dict[str, list[dict]] = {m: [] for m in chosen}
        for seed in REPORT_SEEDS:
            for (m, _), r in zip(chosen.items(), fine_tune_all(list(chosen.items()), seed, posthoc_dir()), strict=True):
                capped_runs[m].append(r)
        summary = summarize(chosen, capped_runs, bases, judge=False)  # no target: every method is capped
        title = ("# Moonshot, addendum 2 (post hoc, decides nothing): every method held to the forgetting cap "
                 "(generated by `python -m studies.moonshot posthoc`)")  # fmt: skip
        atomic_write_text(posthoc_dir() / "summary.json", json.dumps(summary, indent=1) + "\n")
        atomic_write_text(posthoc_dir() / "summary.md", summary_markdown(summary, title))
        print(summary_markdown(summary, title))
    return 0


if __name__ == "__main__":
    sys.exit(main())
