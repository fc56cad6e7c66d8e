"""The knowledge-capacity study (issue 29; protocol in docs/knowledge.md, committed before its runs).

Mechanical from start to end, like the confirmation study::

    python -m studies.knowledge corpora    # the commands that build the study's four corpora (data/knowledge/)
    python -m studies.knowledge tune       # (re)writes configs/knowledge_tune.toml: 3 learning rates per
                                           # method, plus one step outward where a finished bracket's best is
                                           # at its edge; run it with `peer sweep`, then call `tune` again
    python -m studies.knowledge freeze     # once tuning is complete: configs/knowledge_3e12.toml,
                                           # knowledge_1e13.toml (the main grid, seeds 1 and 2) and
                                           # knowledge_seed3.toml (seed 3 at the decisive points)
    python -m studies.knowledge score      # knowledge.json in every finished run (recall, bits stored)
    python -m studies.knowledge report     # results/knowledge/summary.{json,md} and docs/img/knowledge_bits.png

Two designs (``--design``, default v2): v1, registered first, and v2, the addendum of 2026-12-07 that gives
every facts corpus enough statements that no run reads one twice (``Design``; docs/knowledge.md says why).
They differ only in the facts corpora and where their sweep files and results go.

Methods share one backbone (d16, 2 blocks, vocab 2048) except the two larger dense models (d24, d32), which
are there so that "the best dense model" is the best of three sizes at equal FLOPs, not one. Every method
is tuned the same way (learning rate only, on 8,000 facts at 3e12 FLOPs, seed 0); seeds 1 and 2, used by no
tuning run, are reported.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from peer.experiments.sweep.plan import budget_label
from peer.fsutil import atomic_write_text
from peer.metrics import mean_std_record

from .confirmation import gap_stats

ROOT = Path(__file__).resolve().parents[1]

BACKBONE = [
    "model.vocab_size=2048", "model.d_model=16", "model.n_layers=2", "model.n_heads=2", "model.d_ff=64",
    "model.peer.heads=4", "model.peer.topk=8", "model.peer.key_dim=16",
    "optim.sparse_experts=true", "optim.expert_weight_decay=0.0",  # no decay on the tables (idle rows stay)
    "train.eval_every=0", "train.ckpt_every=500", "train.keep_last=1", "train.tensorboard=false",
    "train.progress=false",
]  # fmt: skip
PEER_SIDES = {"peer128": 128, "peer256": 256, "peer512": 512, "peer1024": 1024}
METHODS: dict[str, list[str]] = {
    "dense": ["model.sparse_layer=none"],
    "dense_d24": ["model.sparse_layer=none", "model.d_model=24", "model.d_ff=96"],
    "dense_d32": ["model.sparse_layer=none", "model.d_model=32", "model.d_ff=128"],
    "moe": ["model.sparse_layer=moe", "model.moe.routing=dropless", "model.moe.num_experts=8", "model.moe.topk=1",
            "model.moe.aux_loss_weight=0.01"],
    "pkm": ["model.sparse_layer=pkm", "model.pkm.num_memories=65536", "model.pkm.heads=4", "model.pkm.topk=8",
            "model.pkm.key_dim=16", "model.pkm.value_init_scale=0.03"],
    **{m: ["model.sparse_layer=peer", f"model.peer.num_experts={s * s}"] for m, s in PEER_SIDES.items()},
}  # fmt: skip
DENSE = ("dense", "dense_d24", "dense_d32")


def _facts(n: int, repeats: int | None = None) -> tuple[str, str]:
    """(folder, command) of the study's corpus of ``n`` facts (seed 0, text2k's tokenizer); ``repeats``
    statements per fact in train (default 3), in the folder ``facts<n/1000>k[_r<repeats>]``."""
    out = f"data/knowledge/facts{f'{n // 1000}k' if n >= 1000 else n}" + (f"_r{repeats}" if repeats else "")
    rep = f" --repeats {repeats}" if repeats else ""
    return out, f"peer data facts --out {out} --num-facts {n} --seed 0{rep} --tokenizer data/knowledge/text2k"


_TEXT = ("data/knowledge/text2k", "peer data prepare --out data/knowledge/text2k --vocab-size 2048")
_MIX = ("data/knowledge/mix8k", "peer data facts --out data/knowledge/mix8k --num-facts 8000 --seed 0 --repeats 46 "
        "--mix-text data/knowledge/text2k")  # fmt: skip


@dataclass(frozen=True)
class Design:
    """One version of the study's protocol: its corpora (tag -> (folder, command)), where its sweep files
    and results go. Everything else (methods, grid, tuning rule, targets) is the same in every version."""

    name: str
    prefix: str  # of its sweep files and sweep names: configs/<prefix>_tune.toml, <prefix>_3e12.toml, ...
    corpora: dict[str, tuple[str, str]]
    tune_dir: str
    main_dir: str
    plot: str  # docs/img/<plot>

    @property
    def grid_corpora(self) -> tuple[str, ...]:
        """The corpora every method runs at 3e12 (the larger dense models: DECISIVE only): every facts corpus."""
        return tuple(t for t in self.corpora if t != "text")

    @property
    def tune_file(self) -> Path:
        return ROOT / "configs" / f"{self.prefix}_tune.toml"

    def main_file_path(self, key: str) -> Path:
        return ROOT / "configs" / f"{self.prefix}_{key}.toml"

    @property
    def capacity_plot(self) -> str:
        """docs/img/<this>: what each method stores against how many facts it is offered (plot_capacity)."""
        return self.plot.replace("bits", "capacity")

    @property
    def mix_plot(self) -> str:
        """docs/img/<this>: recall against text loss on the facts + text mix, per method and budget (plot_mix)."""
        return self.plot.replace("bits", "mix")


# v1, registered first: 3 statements per fact, so a run passes over a facts corpus's fixed training stream
# many times (2,000 facts at 1e13: ~290 times) and a model can learn the stream's order, which the probes
# (out of context) do not reward. v2 (the addendum of 2026-12-07, docs/knowledge.md): the same facts, probes
# and val, with enough statements per fact that no run of the grid reads one twice (the longest, dense at
# 1e13, reads 38.7 M tokens); the mix (46 statements per fact, at most 2.4 passes) is unchanged.
V1 = Design(
    "v1", "knowledge",
    {"text": _TEXT, "f2k": _facts(2000), "f8k": _facts(8000), "f32k": _facts(32000), "mix": _MIX},
    "results/knowledge/tune", "results/knowledge/main", "knowledge_bits_v1.png",
)  # fmt: skip
V2 = Design(
    "v2", "knowledge_v2",
    {"text": _TEXT, "f100": _facts(100, 18000),  # 100 facts: below the d16 dense model's capacity (addendum 3)
     "f300": _facts(300, 6000),  # 300 facts: near it (addendum 4)
     "f2k": _facts(2000, 900), "f8k": _facts(8000, 230), "f32k": _facts(32000, 60), "mix": _MIX},
    "results/knowledge/v2/tune", "results/knowledge/v2/main", "knowledge_bits.png",
)  # fmt: skip
DESIGNS = {d.name: d for d in (V1, V2)}
CURRENT = V2
# every design's, in the report's order; "s32k": f32k with its values shuffled (studies.memorization's pilot)
STUDY_CORPORA = ("f100", "f300", "f2k", "f8k", "f32k", "mix", "s32k")
FACTS_CORPORA = {  # tag -> facts offered: "f300" 300, "f2k" 2,000 (the mix is not a facts corpus)
    t: int(t[1:-1]) * 1000 if t.endswith("k") else int(t[1:]) for t in STUDY_CORPORA if t.startswith("f")
}
DECISIVE = ("f32k", "mix")  # where the targets are judged: beyond dense's capacity, and the mix with text
PER_RELATION = (*DECISIVE, "s32k")  # the corpora whose bits the report breaks down per relation


# the main grid, one sweep file per budget, seeds 1 and 2: at 3e12 every method on every corpus (the two
# larger dense models only on the decisive corpora); at 1e13 (3.3x the cost) the decisive corpora only.
# Then seed 3 at the decisive points, both budgets: every PEER size and dense size beyond dense's capacity
# (the rise with N, the 2x), PEER 1024^2 and the dense sizes on the mix.
def grid(design: Design) -> dict[float, dict[str, tuple[str, ...]]]:
    every = design.grid_corpora
    return {
        3e12: {m: (DECISIVE if m in ("dense_d24", "dense_d32") else every) for m in METHODS},
        1e13: {m: DECISIVE for m in METHODS},
    }


DECISIVE_POINTS = {
    **{m: ("f32k",) for m in PEER_SIDES},
    **{m: DECISIVE for m in (*DENSE, "peer1024")},
}
TUNE_BUDGET, TUNE_CORPUS, TUNE_SEED = 3e12, "f8k", 0
SEEDS = (1, 2)
MAIN_FILES = {  # key -> (budgets, seeds, grid budget or None: DECISIVE_POINTS); configs/<design prefix>_<key>.toml
    "3e12": ((3e12,), SEEDS, 3e12),
    "1e13": ((1e13,), SEEDS, 1e13),
    "seed3": ((3e12, 1e13), (3,), None),
}


LR_LADDER = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1)  # the bracket starts at 1e-3, 3e-3, 1e-2
FIRST_BRACKET = (1e-3, 3e-3, 1e-2)


def lr_name(lr: float) -> str:
    return f"{lr:.0e}".replace("e-0", "e-")


def _sweep_head(
    name: str,
    out_dir: str,
    budgets: Sequence[float],
    seeds: Sequence[int],
    note: str,
    made_by: str = "python -m studies.knowledge` (studies/knowledge.py",
) -> list[str]:
    return [
        f"# GENERATED by `{made_by}): do not edit by hand, rerun it.",
        f"# {note}",
        "[sweep]",
        f'name = "{name}"',
        f'out_dir = "{out_dir}"',
        f"budgets = [{', '.join(f'{b:g}' for b in budgets)}]",
        f"seeds = [{', '.join(map(str, seeds))}]",
        'base = "recipe/base_knowledge.toml"',
        "set = [" + ", ".join(f'"{s}"' for s in BACKBONE) + "]",
        "min_steps = 50",
        "parallel = 2",
        "threads = 1",
        "eval_batches = 64  # every val token (facts: 2,048 statements; the mix's text val: 111,569 tokens)",
        "",
        "[[sizes]]",
        'name = "d16_l2"',
        "set = []",
        "",
    ]


def _variant(name: str, sets: Sequence[str]) -> list[str]:
    return [f"[variants.{name}]", "set = [" + ", ".join(f'"{s}"' for s in sets) + "]"]


def _val_loss(run: Path) -> float | None:
    f = run / "result.json"
    return math.log(json.loads(f.read_text())["perplexity"]["val"]) if f.is_file() else None


def tune_losses(root: Path = ROOT, design: Design = CURRENT) -> dict[str, dict[float, float | None]]:
    """method -> lr -> val loss of the tuning run (None: not finished), for every lr the tuning has asked for."""
    out: dict[str, dict[float, float | None]] = {}
    base = root / design.tune_dir / budget_label(TUNE_BUDGET)  # the sweep's folder name: "3e12", not "3e+12"
    for m in METHODS:
        out[m] = {}
        for lr in LR_LADDER:
            run = base / f"{m}_lr{lr_name(lr)}" / "d16_l2" / f"seed{TUNE_SEED}"
            if lr in FIRST_BRACKET or run.exists():
                out[m][lr] = _val_loss(run)
    return out


def next_lrs(losses: dict[float, float | None]) -> list[float]:
    """The learning rates a method's tuning needs now: its bracket, plus one step outward while the best
    finished one is at the edge of what was tried (and the ladder goes on)."""
    tried = sorted(losses)
    if any(v is None for v in losses.values()):
        return tried
    best = min(tried, key=lambda lr: (losses[lr], lr))
    i = LR_LADDER.index(best)
    if best == tried[0] and i > 0:
        return [LR_LADDER[i - 1], *tried]
    if best == tried[-1] and i < len(LR_LADDER) - 1:
        return [*tried, LR_LADDER[i + 1]]
    return tried


def tuned_lr(losses: dict[float, float | None]) -> float | None:
    """The method's learning rate once its tuning is complete (None while a run is missing or the best is
    still at an edge the ladder can extend)."""
    if next_lrs(losses) != sorted(losses):
        return None
    if any(v is None for v in losses.values()):
        return None
    return min(sorted(losses), key=lambda lr: (losses[lr], lr))


def tune_file(root: Path = ROOT, design: Design = CURRENT) -> str:
    losses = tune_losses(root, design)
    lines = _sweep_head(
        f"{design.prefix}_tune",
        design.tune_dir,
        [TUNE_BUDGET],
        [TUNE_SEED],
        f"Tuning of the knowledge study: learning rate only, on {TUNE_CORPUS} at {TUNE_BUDGET:g} FLOPs, seed {TUNE_SEED}.",
    )
    for m, sets in METHODS.items():
        for lr in next_lrs(losses[m]):
            lines += _variant(
                f"{m}_lr{lr_name(lr)}", [*sets, f"data.corpus={design.corpora[TUNE_CORPUS][0]}", f"optim.lr={lr:g}"]
            )
    return "\n".join(lines) + "\n"


def main_file(key: str, root: Path = ROOT, design: Design = CURRENT) -> str:
    """The sweep file ``key`` of :data:`MAIN_FILES`, every method at its tuned learning rate."""
    losses = tune_losses(root, design)
    lrs = {m: tuned_lr(losses[m]) for m in METHODS}
    missing = [m for m, lr in lrs.items() if lr is None]
    if missing:
        raise SystemExit(f"tuning is not complete for {missing}: run `python -m studies.knowledge tune` and its sweep")
    budgets, seeds, which = MAIN_FILES[key]
    points = grid(design)[which] if which is not None else DECISIVE_POINTS
    name = f"{design.prefix}_{key}"
    lines = _sweep_head(
        name,
        design.main_dir,
        budgets,
        seeds,
        f"The knowledge study's runs ({name}; docs/knowledge.md): each method at its tuned learning rate.",
    )
    for m, sets in METHODS.items():
        for c in points.get(m, ()):
            lines += _variant(f"{m}_{c}", [*sets, f"data.corpus={design.corpora[c][0]}", f"optim.lr={lrs[m]:g}"])
    return "\n".join(lines) + "\n"


# ---- scoring and the report -------------------------------------------------------------------------------


def parse_variant(variant: str) -> tuple[str, str]:
    method, _, corpus = variant.rpartition("_")
    if method not in METHODS or corpus not in STUDY_CORPORA:
        raise ValueError(f"not a variant of the knowledge grid: {variant!r}")
    return method, corpus


def is_scored(run: Path) -> bool:
    """Whether ``run`` has a knowledge.json with every measure (one written before the addendum's bits over
    prior existed is scored again)."""
    out = run / "knowledge.json"
    return out.is_file() and "bits_over_prior" in json.loads(out.read_text())


def score_run(run: Path, force: bool = False) -> dict:
    """knowledge.json of a finished run: every probe of its corpus scored (peer.knowledge)."""
    out = run / "knowledge.json"
    if is_scored(run) and not force:
        return json.loads(out.read_text())
    import torch

    from peer.data.tokenizer import load_tokenizer
    from peer.flops import count_params
    from peer.knowledge import knowledge_report, load_probes, score_facts
    from peer.train import load_run

    torch.set_num_threads(1)
    model, cfg, meta = load_run(run)
    model.eval()
    corpus = Path(cfg.data.corpus)
    probes = load_probes(corpus)
    scores = score_facts(model, load_tokenizer(corpus), probes, batch_size=64)
    params = count_params(cfg.model)
    report = {
        "facts_file": str(corpus / "facts.jsonl"),
        **knowledge_report(scores, probes, int(params.total), meta.get("flops") if isinstance(meta, dict) else None),
    }
    atomic_write_text(out, json.dumps(report, indent=1) + "\n")
    return report


def finished_runs(root: Path) -> list[Path]:
    return sorted(p.parent for p in root.glob("*/*/*/seed*/result.json"))


RELATION_FIELDS = ("facts", "recall", "bits_over_prior", "bits_over_prior_available")  # knowledge.json's, per relation


def collect(root: Path) -> list[dict]:
    """One row per finished and scored run: budget, method, corpus, seed, losses per split, knowledge."""
    rows = []
    for run in finished_runs(root):
        k = run / "knowledge.json"
        if not k.is_file():
            continue
        r = json.loads((run / "result.json").read_text())
        method, corpus = parse_variant(r["variant"])
        know = json.loads(k.read_text())
        rows.append(
            {
                "budget": float(r["budget"]),
                "method": method,
                "corpus": corpus,
                "seed": int(r["seed"]),
                "loss": {s: math.log(p) for s, p in r["perplexity"].items()},
                "bits": know["bits"],
                "recall": know["recall"],
                "bits_available": know["bits_available"],
                "bits_over_prior": know["bits_over_prior"],
                "bits_over_prior_available": know["bits_over_prior_available"],
                "params_total": int(r["params_total"]),
                "retrievals_per_expert": retrievals_per_expert(method, int(r["tokens"])),
                "relations": {
                    rel: {key: v[key] for key in RELATION_FIELDS} for rel, v in know.get("relations", {}).items()
                },
            }
        )
    return rows


PEER_HK = 4 * 8  # heads x top-k of every PEER method (BACKBONE)


def retrievals_per_expert(method: str, tokens: int) -> float | None:
    """R = T h k / N: how often each expert of a PEER layer is retrieved over a run of T tokens, on average
    (the quantity docs/knowledge.md relates loss to); None for the other methods."""
    side = PEER_SIDES.get(method)
    return tokens * PEER_HK / side**2 if side else None


def _ms(xs: Sequence[float]) -> dict:
    return {**mean_std_record(xs), "values": list(xs)}


def _gap(a: dict, b: dict) -> dict:
    """a - b with its standard error and 95 % interval (studies.confirmation.gap_stats: Welch; NaN with fewer
    than two seeds on a side)."""
    s = gap_stats(a["values"], b["values"])
    return {k: s[k] for k in ("gap", "se", "ci95")}


def summarize(rows: Sequence[dict]) -> dict:
    """Per (budget, corpus, method): mean ± std over seeds of bits, recall, val loss (and the mix's text
    loss), and the issue's targets, judged as pre-registered in docs/knowledge.md."""
    points: dict = {}
    for r in rows:
        points.setdefault((r["budget"], r["corpus"], r["method"]), []).append(r)
    table: dict = {}
    order = {m: i for i, m in enumerate(METHODS)}  # budgets ascending, corpora and methods in the protocol's order
    for (b, c, m), rs in sorted(
        points.items(), key=lambda kv: (kv[0][0], STUDY_CORPORA.index(kv[0][1]), order[kv[0][2]])
    ):
        entry = {
            "seeds": sorted(r["seed"] for r in rs),
            "bits": _ms([r["bits"] for r in rs]),
            "recall": _ms([r["recall"] for r in rs]),
            "val_loss": _ms([r["loss"]["val"] for r in rs]),
            "bits_available": rs[0]["bits_available"],
            "bits_over_prior": _ms([r["bits_over_prior"] for r in rs]),
            "bits_over_prior_available": rs[0]["bits_over_prior_available"],
            "params_total": rs[0]["params_total"],
            "retrievals_per_expert": rs[0].get("retrievals_per_expert"),
        }
        if all("eval_text" in r["loss"] for r in rs):
            entry["text_loss"] = _ms([r["loss"]["eval_text"] for r in rs])
        shared = set.intersection(*(set(r.get("relations", {})) for r in rs))  # relations every seed scored
        entry["relations"] = {
            rel: {
                "facts": rs[0]["relations"][rel]["facts"],
                "bits_over_prior_available": rs[0]["relations"][rel]["bits_over_prior_available"],
                "bits_over_prior": _ms([r["relations"][rel]["bits_over_prior"] for r in rs]),
                "recall": _ms([r["relations"][rel]["recall"] for r in rs]),
            }
            for rel in sorted(shared)
        }
        table.setdefault(budget_label(b), {}).setdefault(c, {})[m] = entry
    targets: dict = {}
    for b, by_corpus in table.items():
        f32, mix = by_corpus.get("f32k", {}), by_corpus.get("mix", {})
        t: dict = {}
        sizes = [m for m in PEER_SIDES if m in f32]
        if len(sizes) == len(PEER_SIDES):
            steps = {
                f"{lo}->{hi}": _gap(f32[hi]["bits"], f32[lo]["bits"]) for lo, hi in zip(sizes, sizes[1:], strict=False)
            }
            t["bits_rise_with_N"] = {"met": all(s["gap"] > 0 for s in steps.values()), "steps": steps}
        # judged only once every dense size is in: the best dense model of a partial grid is not the registered one
        dense = [m for m in DENSE if m in f32]
        if len(dense) == len(DENSE) and "peer1024" in f32:  # the best dense: the lowest mean val loss of the three
            best = min(dense, key=lambda m: f32[m]["val_loss"]["mean"])
            ratio = f32["peer1024"]["bits"]["mean"] / max(f32[best]["bits"]["mean"], 1e-9)
            t["peer1024_2x_dense_bits"] = {"met": ratio >= 2.0, "ratio": ratio, "best_dense": best}
        dense = [m for m in DENSE if m in mix and "text_loss" in mix[m]]
        if len(dense) == len(DENSE) and "peer1024" in mix and "text_loss" in mix["peer1024"]:
            best = min(dense, key=lambda m: mix[m]["text_loss"]["mean"])  # the best dense model on text
            rec, txt = (
                _gap(mix["peer1024"]["recall"], mix[best]["recall"]),
                _gap(mix["peer1024"]["text_loss"], mix[best]["text_loss"]),
            )
            t["mix_recall_and_text"] = {
                "met": rec["gap"] > 0 and txt["gap"] <= 0,
                "best_dense": best,
                "recall_gap": rec,
                "text_loss_gap": txt,
            }
        targets[b] = t
    return {"points": table, "targets": targets}


def summary_markdown(summary: dict) -> str:
    lines = ["# Knowledge study: summary (generated by `python -m studies.knowledge report`)", ""]
    for b, by_corpus in summary["points"].items():
        for c, methods in by_corpus.items():
            lines += [f"## {b} FLOPs, {c}", "", "| method | params | retrievals per expert | seeds | bits stored | bits / param | bits over prior | recall % | val loss | text loss |", "|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
            for m, e in methods.items():
                text = f"{e['text_loss']['mean']:.4f} ± {e['text_loss']['std']:.4f}" if "text_loss" in e else ""
                rpe = e.get("retrievals_per_expert")
                lines.append(
                    f"| {m} | {e['params_total']:,} | {'' if rpe is None else f'{rpe:,.0f}'} | {','.join(map(str, e['seeds']))} | {e['bits']['mean']:,.0f} ± "
                    f"{e['bits']['std']:,.0f} (of {e['bits_available']:,.0f}) | {e['bits']['mean'] / e['params_total']:.4f} | "
                    f"{e['bits_over_prior']['mean']:,.0f} ± "
                    f"{e['bits_over_prior']['std']:,.0f} (of {e['bits_over_prior_available']:,.0f}) | {100 * e['recall']['mean']:.1f} ± "
                    f"{100 * e['recall']['std']:.1f} | {e['val_loss']['mean']:.4f} ± {e['val_loss']['std']:.4f} | {text} |"
                )
            lines.append("")
    lines += relations_markdown(summary)
    lines += ["## Targets", "", "```", json.dumps(summary["targets"], indent=1), "```", ""]
    return "\n".join(lines)


def relations_markdown(summary: dict) -> list[str]:
    """Where the bits are: per relation of the decisive corpora (and of the shuffled pilot's), each method's
    bits over prior (mean over seeds) and recall. Post hoc (docs/knowledge.md): it explains the totals, it
    judges nothing."""
    lines: list[str] = []
    for b, by_corpus in summary["points"].items():
        for c in PER_RELATION:
            methods = {m: e for m, e in by_corpus.get(c, {}).items() if e.get("relations")}
            if not methods:
                continue
            rels = sorted({rel for e in methods.values() for rel in e["relations"]})
            ref = {rel: next(e["relations"][rel] for e in methods.values() if rel in e["relations"]) for rel in rels}
            lines += [f"## {b} FLOPs, {c}: bits over prior per relation (recall %)", "",
                      "| relation | facts | bits over prior available | " + " | ".join(methods) + " |",
                      "|---|---|---|" + "---|" * len(methods)]  # fmt: skip
            for rel in rels:
                cells = [
                    f"{e['relations'][rel]['bits_over_prior']['mean']:,.0f} ({100 * e['relations'][rel]['recall']['mean']:.1f})"
                    if rel in e["relations"]
                    else ""
                    for e in methods.values()
                ]
                lines.append(
                    f"| {rel} | {ref[rel]['facts']:,} | {ref[rel]['bits_over_prior_available']:,.0f} | "
                    + " | ".join(cells)
                    + " |"
                )
            lines.append("")
    return lines


def _err(entry: dict, scale: float = 1.0) -> float:
    """The error bar of a mean ± std record: its std (0 with one seed, where std is NaN), scaled."""
    return 0.0 if math.isnan(entry["std"]) else scale * entry["std"]


def plot(summary: dict, path: Path) -> None:
    """Bits stored vs N, one line per budget, dense/MoE/PKM as reference lines (the protocol's plot, top row),
    and the same for bits over prior (addendum 1, bottom row); 32,000 and 8,000 facts."""
    from peer.plots import pyplot, save_figure

    plt = pyplot()
    fig, grid = plt.subplots(2, 2, figsize=(11, 8))
    measures = (("bits", "bits stored"), ("bits_over_prior", "bits over prior"))
    for row, (key, label) in zip(grid, measures, strict=True):
        for ax, corpus in zip(row, ("f32k", "f8k"), strict=True):
            for i, (b, by_corpus) in enumerate(summary["points"].items()):
                pts = by_corpus.get(corpus, {})
                sizes = [m for m in PEER_SIDES if m in pts]
                if sizes:
                    ys = [pts[m][key]["mean"] for m in sizes]
                    es = [_err(pts[m][key]) for m in sizes]
                    ax.errorbar([PEER_SIDES[m] ** 2 for m in sizes], ys, yerr=es, marker="os^"[i % 3], color="k",
                                ls=("-", "--", ":")[i % 3], label=f"PEER, {b} FLOPs", capsize=3)  # fmt: skip
                # reference lines: colour by method, style by budget
                for j, m in enumerate(("dense", "dense_d24", "dense_d32", "moe", "pkm")):
                    if m in pts:
                        ax.axhline(pts[m][key]["mean"], color=f"C{j}", ls=("--", ":", "-.")[i % 3], lw=1.2,
                                   label=f"{m}, {b}")  # fmt: skip
            ax.set_xscale("log", base=2)
            ax.set_xlabel("experts N")
            ax.set_ylabel(label)
            ax.set_title(f"{corpus}: {label} vs pool size (mean ± std over seeds)", fontsize=9)
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=6)
    fig.tight_layout()
    save_figure(fig, path)


def plot_capacity(summary: dict, path: Path) -> None:
    """Below, near and beyond capacity, per method: bits over prior stored (left) and recall (right) against
    the number of facts offered, at each budget where every facts corpus ran (3e12); the dotted line is
    everything there was to store."""
    from peer.plots import pyplot, save_figure

    plt = pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.4))
    for b, by_corpus in summary["points"].items():
        tags = [t for t in FACTS_CORPORA if t in by_corpus]
        if len(tags) < 2:
            continue
        for i, m in enumerate(METHODS):
            have = [t for t in tags if m in by_corpus[t]]
            if len(have) < 2:
                continue
            xs = [FACTS_CORPORA[t] for t in have]
            style = {"marker": "o", "color": f"C{i}", "label": f"{m}, {b}", "capsize": 2, "lw": 1.2}
            for ax, key, scale in ((left, "bits_over_prior", 1.0), (right, "recall", 100.0)):
                ys = [scale * by_corpus[t][m][key]["mean"] for t in have]
                es = [_err(by_corpus[t][m][key], scale) for t in have]
                ax.errorbar(xs, ys, yerr=es, **style)
        avail = [by_corpus[t][next(iter(by_corpus[t]))]["bits_over_prior_available"] for t in tags]
        left.plot([FACTS_CORPORA[t] for t in tags], avail, ":", color="k", lw=1, label=f"available, {b}")
    for ax in (left, right):
        ax.set_xscale("log")
        ax.set_xlabel("facts offered")
    left.set_yscale("log")
    left.set_ylabel("bits over prior stored")
    right.set_ylabel("recall %")
    left.set_title("what each method stores (mean ± std over seeds)", fontsize=9)
    right.set_title("share of the facts recalled", fontsize=9)
    if left.get_legend_handles_labels()[0]:
        left.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    save_figure(fig, path)


def mix_points(summary: dict) -> dict[str, list[tuple[str, dict]]]:
    """Per method, its mix entries that have a text loss, budgets ascending: what plot_mix draws."""
    out: dict[str, list[tuple[str, dict]]] = {}
    for b, by_corpus in summary["points"].items():
        for m, e in by_corpus.get("mix", {}).items():
            if "text_loss" in e:
                out.setdefault(m, []).append((b, e))
    return out


def plot_mix(summary: dict, path: Path) -> None:
    """Target (b)'s two axes at once: on the facts + text mix, each method's recall (up is better) against its
    text loss (left is better), one marker per budget joined from the smaller budget to the larger."""
    from peer.plots import pyplot, save_figure

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.6))
    points = mix_points(summary)
    for i, m in enumerate(METHODS):
        pts = points.get(m)
        if not pts:
            continue
        xs = [e["text_loss"]["mean"] for _, e in pts]
        ys = [100 * e["recall"]["mean"] for _, e in pts]
        ax.plot(xs, ys, "-", color=f"C{i}", lw=1, alpha=0.6)
        for j, (b, e) in enumerate(pts):
            ax.errorbar(e["text_loss"]["mean"], 100 * e["recall"]["mean"], xerr=_err(e["text_loss"]),
                        yerr=_err(e["recall"], 100.0), marker="os^"[j % 3], color=f"C{i}", capsize=2,
                        label=f"{m}, {b}")  # fmt: skip
    ax.set_xlabel("text loss on the mix's eval_text (nats/token; left is better)")
    ax.set_ylabel("recall of the mix's 8,000 facts %")
    ax.set_title("facts + text mix: recall vs text loss (mean ± std over seeds)", fontsize=9)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    save_figure(fig, path)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m studies.knowledge", description=__doc__.split("\n\n")[0])
    p.add_argument("action", choices=["corpora", "tune", "freeze", "score", "report"])
    p.add_argument("--design", choices=sorted(DESIGNS), default=CURRENT.name,
                   help=f"which version of the protocol (default: {CURRENT.name}; docs/knowledge.md)")  # fmt: skip
    p.add_argument("--root", default=None, help="results folder (score/report; default: the design's main grid)")
    args = p.parse_args(argv)
    design = DESIGNS[args.design]
    if args.action == "corpora":  # the commands for the design's corpora not built yet
        print("\n".join(cmd for d, cmd in design.corpora.values() if not (ROOT / d / "manifest.json").is_file()))
    elif args.action == "tune":
        atomic_write_text(design.tune_file, tune_file(design=design))
        print(f"wrote {design.tune_file.relative_to(ROOT)}")
    elif args.action == "freeze":  # all or nothing: each refuses while tuning runs
        texts = {design.main_file_path(k): main_file(k, design=design) for k in MAIN_FILES}
        for path, text in texts.items():
            atomic_write_text(path, text)
            print(f"wrote {path.relative_to(ROOT)}")
    elif args.action == "score":
        root = Path(args.root or ROOT / design.main_dir)
        for run in finished_runs(root):
            if not is_scored(run):
                k = score_run(run)
                print(f"{run.relative_to(root)}: recall {100 * k['recall']:.1f}%, bits {k['bits']:,.0f}")
    else:
        root = Path(args.root or ROOT / design.main_dir)
        s = summarize(collect(root))
        atomic_write_text(root / "summary.json", json.dumps(s, indent=1) + "\n")
        atomic_write_text(root / "summary.md", summary_markdown(s))
        plot(s, ROOT / "docs" / "img" / design.plot)
        plot_capacity(s, ROOT / "docs" / "img" / design.capacity_plot)
        plot_mix(s, ROOT / "docs" / "img" / design.mix_plot)
        print(f"wrote {root / 'summary.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
