"""Stored or inferred? The knowledge study's bits on facts a model never saw (issue 29; post hoc).

Bits stored (Allen-Zhu & Li, arXiv:2404.05405) count what a model knows of a fact's value beyond a prior;
they measure *storage* only if the value cannot be inferred from the subject. Their facts are synthetic
(random values). Ours are real, and in the study nearly every bit comes from two relations whose values
a subject's name often gives away: a city's country and time zone (the language of "'Alī Ābād-e Katūl" says
Iran). So score the same models on cities they never read: the same relations, the same templates, values
they have seen, subjects from the same pool (GeoNames) that no training statement names. What a model
gets right there it inferred; only the excess on the facts it was trained on is stored::

    python -m studies.memorization                 # every finished run with a checkpoint under the v2 grid's
                                                   # f32k points: memorization.json beside its knowledge.json
    python -m studies.memorization report          # results/knowledge/v2/memorization.md

The other way to the same question, a pilot (one seed, nothing tuned for it): train on facts whose values
no subject gives away, the 32,000 facts with each relation's values permuted among its subjects
(``peer data facts --shuffle-values``; the same subjects, templates and value frequencies), at 3e12 FLOPs,
every method at the learning rate the study froze for it::

    python -m studies.memorization pilot           # prints the corpus's command if it is not built; writes
                                                   # configs/knowledge_v2_shuffled.toml: run it with `peer sweep`
    python -m studies.knowledge score --root results/knowledge/v2/shuffled
    python -m studies.memorization pilot-report    # results/knowledge/v2/shuffled/summary.md, beside the
                                                   # same seed's runs on the real values

Per relation, two probe sets of equal size: ``seen`` (a seeded sample of the corpus's own probes) and
``held_out`` (GeoNames facts whose subject is in no corpus statement and whose value is one of the
relation's values in the corpus, each rendered with the template the corpus would have chosen for it).
Bits over prior use the corpus's value frequencies for both sets, so the two are on one scale. Registered
nowhere and chosen on nothing: it explains the study's totals; it changes no target.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from peer.fsutil import atomic_write_text

from . import knowledge as K
from .knowledge import CURRENT, METHODS, ROOT, parse_variant

RELATIONS = ("city_country", "city_timezone")  # the two relations that hold ~99 % of the study's bits over prior
PER_RELATION = 2000
SEED = 0
OUT = "memorization.json"


def probe_sets(
    corpus: Path,
    cache: Path,
    relations: Sequence[str] = RELATIONS,
    per_relation: int = PER_RELATION,
    seed: int = SEED,
) -> dict[str, list[dict]]:
    """{"seen": probes, "held_out": probes} for ``relations`` of the facts corpus at ``corpus`` (see the
    module docstring); deterministic in ``seed``."""
    from peer.data.facts import FACT_SOURCES, choose_facts, fact_splits
    from peer.knowledge import load_probes

    corpus_probes = load_probes(corpus)
    subjects = {p["id"].split("/", 1)[1] for p in corpus_probes}  # a subject named with any relation is seen
    values = {r: {p["value"] for p in corpus_probes if p["relation"] == r} for r in relations}
    candidates = {r: next(p["candidates"] for p in corpus_probes if p["relation"] == r) for r in relations}
    manifest = json.loads((corpus / "manifest.json").read_text())
    pool = []
    for name in manifest["facts"]["sources"]:
        src = FACT_SOURCES[name]()
        if set(src.relations) & set(relations):
            pool += [
                f
                for f in src.facts(src.fetch(cache))
                if f.relation in relations and f.subject not in subjects and f.value in values[f.relation]
            ]
    seen, held = [], []
    for r in relations:
        mine = [p for p in corpus_probes if p["relation"] == r]
        seen += random.Random(f"{seed}/{r}").sample(mine, min(per_relation, len(mine)))
        facts = choose_facts([f for f in pool if f.relation == r], per_relation, seed)
        _, probes = fact_splits(facts, manifest["facts"]["seed"], repeats=1)  # the template the corpus would pick
        held += [{**p, "candidates": candidates[r]} for p in probes]
    return {"seen": seen, "held_out": held}


def measure(scores: Sequence[dict], probes: Sequence[dict], prior: Sequence[dict]) -> dict:
    """Per relation: facts, recall, bits over the value frequencies of ``prior`` (the corpus's probes) in
    total and per fact, value loss per fact (nats); the standard errors of recall and of bits per fact over
    the sample of probes (binomial; the sample's std over sqrt(n))."""
    per_relation = Counter(p["relation"] for p in prior)
    counts = Counter((p["relation"], p["value"]) for p in prior)
    out: dict[str, dict] = {}
    for s, p in zip(scores, probes, strict=True):
        r = out.setdefault(
            p["relation"], {"facts": 0, "recall": 0.0, "bits_over_prior": 0.0, "value_nats": 0.0, "sq": 0.0}
        )
        surprise = math.log2(per_relation[p["relation"]] / counts[(p["relation"], p["value"])])
        r["facts"] += 1
        r["recall"] += s["recalled"]
        bits = max(0.0, surprise - s["value_nats"] / math.log(2))
        r["bits_over_prior"] += bits
        r["sq"] += bits * bits
        r["value_nats"] += s["value_nats"]
    for r in out.values():
        r["recall"] /= r["facts"]
        r["value_nats"] /= r["facts"]
        n, mean = r["facts"], r["bits_over_prior"] / r["facts"]
        r["bits_over_prior_per_fact"] = mean
        r["recall_se"] = math.sqrt(r["recall"] * (1 - r["recall"]) / n)
        var = max(0.0, r.pop("sq") / n - mean * mean) * n / max(n - 1, 1)
        r["bits_over_prior_per_fact_se"] = math.sqrt(var / n)
    return out


def score_run(run: Path, cache: Path, relations: Sequence[str] = RELATIONS, per_relation: int = PER_RELATION) -> dict:
    """memorization.json of a finished run with a checkpoint: its model scored on both probe sets."""
    import torch

    from peer.data.tokenizer import load_tokenizer
    from peer.knowledge import load_probes, score_facts
    from peer.train import load_run

    torch.set_num_threads(1)
    model, cfg, _ = load_run(run)
    corpus = Path(cfg.data.corpus)
    sets = probe_sets(corpus, cache, relations, per_relation)
    prior, tok = load_probes(corpus), load_tokenizer(corpus)
    report = {
        "relations": list(relations),
        "per_relation": per_relation,
        "seed": SEED,
        **{name: measure(score_facts(model, tok, probes), probes, prior) for name, probes in sets.items()},
    }
    atomic_write_text(run / OUT, json.dumps(report, indent=1) + "\n")
    return report


def is_scored(run: Path) -> bool:
    """Whether ``run`` has a memorization.json with every measure (one without standard errors is redone)."""
    f = run / OUT
    return f.is_file() and "recall_se" in f.read_text()


def runs(root: Path) -> list[Path]:
    """Finished runs on 32,000 facts (the corpus beyond dense's capacity) whose checkpoint is on disk."""
    return sorted(
        p.parent
        for p in root.glob("*/*_f32k/*/seed*/result.json")
        if (p.parent / "checkpoints").is_dir() and any((p.parent / "checkpoints").iterdir())
    )


def _combine(parts: Sequence[dict], key: str) -> tuple[float, float]:
    """(mean, standard error) of ``key`` over the probes of ``parts`` (independent samples, weighted by size)."""
    n = sum(p["facts"] for p in parts)
    mean = sum(p[key] * p["facts"] for p in parts) / n
    se = math.sqrt(sum((p["facts"] / n * p[f"{key}_se"]) ** 2 for p in parts))
    return mean, se


def summarize(root: Path) -> dict:
    """Per (budget, method, relation and "both"): seen and held-out recall and bits over prior per fact, and
    stored bits per fact (seen - held out), each the mean over the scored seeds with its standard error over
    the probes sampled (seeds: independent samples of probes and of training)."""
    rows: dict = {}
    for f in sorted(root.glob(f"*/*_f32k/*/seed*/{OUT}")):
        budget, variant, seed = f.parts[-5], f.parts[-4], f.parts[-2]
        method, _ = parse_variant(variant)
        rows.setdefault((budget, method), []).append((seed.removeprefix("seed"), json.loads(f.read_text())))
    order = {m: i for i, m in enumerate(METHODS)}
    out: dict = {}
    for (budget, method), reps in sorted(rows.items(), key=lambda kv: (float(kv[0][0]), order[kv[0][1]])):
        relations = reps[0][1]["relations"]
        entry: dict = {"seeds": [s for s, _ in reps], "relations": relations}
        for rel in (*relations, "both"):
            cell: dict = {}
            for key in ("recall", "bits_over_prior_per_fact"):
                per_seed = []
                for _, rep in reps:
                    names = relations if rel == "both" else [rel]
                    seen = _combine([rep["seen"][r] for r in names], key)
                    held = _combine([rep["held_out"][r] for r in names], key)
                    per_seed.append((seen, held, (seen[0] - held[0], math.hypot(seen[1], held[1]))))
                k = len(per_seed)
                for i, name in enumerate(("seen", "held_out", "stored")):
                    cell.setdefault(name, {})[key] = {
                        "mean": sum(x[i][0] for x in per_seed) / k,
                        "se": math.sqrt(sum(x[i][1] ** 2 for x in per_seed)) / k,
                    }
            entry[rel] = cell
        out.setdefault(budget, {})[method] = entry
    return out


def report_markdown(summary: dict) -> str:
    lines = [
        "# Stored or inferred: the knowledge study's models on cities they never read",
        "",
        "Generated by `python -m studies.memorization report` (post hoc; docs/knowledge.md). Per method: recall",
        "and bits over prior per fact on a sample of the facts it trained on (seen) and on as many facts of the",
        "same relations whose subject no training statement names (held out); stored = seen - held out, with",
        "its standard error over the probes sampled; share = stored / seen bits. Means over the seeds listed",
        "(checkpoints, which scoring needs, exist only on the machine that trained a run).",
        "",
    ]
    for budget, methods in summary.items():
        lines += [f"## {budget} FLOPs, 32,000 facts", ""]
        lines += [
            "| method | seeds | relation | recall % seen | held out | stored (points) | bits/fact seen | held out | stored | stored share of bits |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]  # fmt: skip
        for method, e in methods.items():
            for rel in (*e["relations"], "both"):
                c = e[rel]
                r, b = (
                    {n: c[n]["recall"] for n in c},
                    {n: c[n]["bits_over_prior_per_fact"] for n in c},
                )
                share = b["stored"]["mean"] / b["seen"]["mean"] if b["seen"]["mean"] > 0 else math.nan
                lines.append(
                    f"| {method} | {','.join(e['seeds'])} | {rel} | {100 * r['seen']['mean']:.1f} | "
                    f"{100 * r['held_out']['mean']:.1f} | {100 * r['stored']['mean']:+.1f} ± {100 * r['stored']['se']:.1f} | "
                    f"{b['seen']['mean']:.3f} | {b['held_out']['mean']:.3f} | "
                    f"{b['stored']['mean']:+.3f} ± {b['stored']['se']:.3f} | {100 * share:.0f} % |"
                )
        lines.append("")
    return "\n".join(lines)


_F32K, _F32K_COMMAND = K.V2.corpora["f32k"]
SHUFFLED = (f"{_F32K}_shuffled", f"{_F32K_COMMAND.replace(_F32K, f'{_F32K}_shuffled')} --shuffle-values")
PILOT_NAME, PILOT_DIR, PILOT_BUDGET, PILOT_SEED = "knowledge_v2_shuffled", "results/knowledge/v2/shuffled", 3e12, 1


def pilot_file(root: Path = ROOT) -> str:
    """The pilot's sweep file: every method of the study on the shuffled 32,000 facts, at the learning rate
    the study's tuning chose for it (on real facts), one seed: the seed whose real-value runs it is set beside."""
    losses = K.tune_losses(root, CURRENT)
    lrs = {m: K.tuned_lr(losses[m]) for m in METHODS}
    if any(lr is None for lr in lrs.values()):
        raise SystemExit("the study's tuning is not complete: the pilot uses its learning rates")
    lines = K._sweep_head(PILOT_NAME, PILOT_DIR, [PILOT_BUDGET], [PILOT_SEED],
                          "Pilot (post hoc, decides nothing; studies/memorization.py): the study's methods on "
                          "facts whose values are shuffled.",
                          made_by="python -m studies.memorization pilot` (studies/memorization.py")  # fmt: skip
    for m, sets in METHODS.items():
        lines += K._variant(f"{m}_s32k", [*sets, f"data.corpus={SHUFFLED[0]}", f"optim.lr={lrs[m]:g}"])
    return "\n".join(lines) + "\n"


def pilot_markdown(real: dict, shuffled: dict) -> str:
    """Per method: bits over prior and recall on the real and on the shuffled 32,000 facts (the pilot's seed)."""
    b = K.budget_label(PILOT_BUDGET)
    pts_r = real["points"].get(b, {}).get("f32k", {})
    pts_s = shuffled["points"].get(b, {}).get("s32k", {})
    avail_r, avail_s = (next(iter(p.values()))["bits_over_prior_available"] if p else math.nan for p in (pts_r, pts_s))
    lines = [
        "# Shuffled values: what each method stores when a subject gives nothing away (pilot)",
        "",
        "Generated by `python -m studies.memorization pilot-report` (post hoc, decides nothing; docs/knowledge.md).",
        f"{b} FLOPs, seed {PILOT_SEED}, every method at the study's frozen learning rate. Real: the study's runs on",
        "facts32k_r60; shuffled: facts32k_r60_shuffled (each relation's values permuted among its subjects).",
        "",
        f"| method | params | bits over prior, real (of {avail_r:,.0f}) | bits over prior, shuffled (of {avail_s:,.0f}) | recall %, real | recall %, shuffled | val loss, shuffled |",
        "|---|---|---|---|---|---|---|",
    ]  # fmt: skip
    for m in METHODS:
        if m not in pts_s:
            continue
        r, s = pts_r.get(m), pts_s[m]

        def cell(e: dict | None, key: str, scale: float = 1.0, fmt: str = ",.0f") -> str:
            return "" if e is None else format(scale * e[key]["mean"], fmt)

        lines.append(
            f"| {m} | {s['params_total']:,} | {cell(r, 'bits_over_prior')} | {cell(s, 'bits_over_prior')} | "
            f"{cell(r, 'recall', 100, '.1f')} | {cell(s, 'recall', 100, '.1f')} | {cell(s, 'val_loss', 1, '.4f')} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m studies.memorization", description=__doc__.split("\n\n")[0])
    p.add_argument("action", nargs="?", choices=["score", "report", "pilot", "pilot-report"], default="score")
    p.add_argument("--root", default=str(ROOT / CURRENT.main_dir), help="the study's results (default: v2's grid)")
    p.add_argument("--cache", default=str(ROOT / "data" / "cache"), help="where the fact sources' wheels are")
    args = p.parse_args(argv)
    root = Path(args.root)
    if args.action == "score":
        for run in runs(root):
            if not is_scored(run):
                rep = score_run(run, Path(args.cache))
                r = rep["relations"][0]
                s, h = rep["seen"][r]["recall"], rep["held_out"][r]["recall"]
                print(f"{run.relative_to(root)}: {r} recall seen {s:.3f}, held out {h:.3f}")
    elif args.action == "pilot":
        if not (ROOT / SHUFFLED[0] / "manifest.json").is_file():
            print(SHUFFLED[1])
        path = ROOT / "configs" / f"{PILOT_NAME}.toml"
        atomic_write_text(path, pilot_file())
        print(f"# wrote {path.relative_to(ROOT)}")
    elif args.action == "pilot-report":
        pilot = ROOT / PILOT_DIR
        shuffled = K.summarize([r for r in K.collect(pilot) if r["seed"] == PILOT_SEED])
        real = K.summarize([r for r in K.collect(root) if r["seed"] == PILOT_SEED and r["corpus"] == "f32k"])
        atomic_write_text(pilot / "summary.md", pilot_markdown(real, shuffled) + "\n" + K.summary_markdown(shuffled))
        print(f"wrote {pilot / 'summary.md'}")
    else:
        out = root.parent / "memorization.md"
        atomic_write_text(out, report_markdown(summarize(root)))
        print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
