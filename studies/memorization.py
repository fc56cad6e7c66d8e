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
from peer.metrics import mean_std_record

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
        src = FACT_SOURCES[name]
        if set(src.relations) & set(relations):
            pool += [
                f
                for f in src().facts(src().fetch(cache))
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
    total and per fact, value loss per fact (nats)."""
    per_relation = Counter(p["relation"] for p in prior)
    counts = Counter((p["relation"], p["value"]) for p in prior)
    out: dict[str, dict] = {}
    for s, p in zip(scores, probes, strict=True):
        r = out.setdefault(p["relation"], {"facts": 0, "recall": 0.0, "bits_over_prior": 0.0, "value_nats": 0.0})
        surprise = math.log2(per_relation[p["relation"]] / counts[(p["relation"], p["value"])])
        r["facts"] += 1
        r["recall"] += s["recalled"]
        r["bits_over_prior"] += max(0.0, surprise - s["value_nats"] / math.log(2))
        r["value_nats"] += s["value_nats"]
    for r in out.values():
        r["recall"] /= r["facts"]
        r["value_nats"] /= r["facts"]
        r["bits_over_prior_per_fact"] = r["bits_over_prior"] / r["facts"]
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


def runs(root: Path) -> list[Path]:
    """Finished runs on 32,000 facts (the corpus beyond dense's capacity) whose checkpoint is on disk."""
    return sorted(
        p.parent
        for p in root.glob("*/*_f32k/*/seed*/result.json")
        if (p.parent / "checkpoints").is_dir() and any((p.parent / "checkpoints").iterdir())
    )


def summarize(root: Path) -> dict:
    """Per (budget, method): mean ± std over the scored seeds of seen and held-out recall and bits over prior
    per fact, per relation and over both."""
    rows: dict = {}
    for f in sorted(root.glob(f"*/*_f32k/*/seed*/{OUT}")):
        budget, variant, seed = f.parts[-5], f.parts[-4], f.parts[-2]
        method, _ = parse_variant(variant)
        rep = json.loads(f.read_text())
        rows.setdefault((budget, method), []).append((seed, rep))
    order = {m: i for i, m in enumerate(METHODS)}
    out: dict = {}
    for (budget, method), reps in sorted(rows.items(), key=lambda kv: (float(kv[0][0]), order[kv[0][1]])):
        entry: dict = {"seeds": [s.removeprefix("seed") for s, _ in reps]}
        relations = reps[0][1]["relations"]
        entry["relations"] = relations
        for name in ("seen", "held_out"):
            for rel in (*relations, "both"):

                def pick(rep: dict, key: str, rel: str = rel, name: str = name) -> float:
                    parts = [rep[name][r] for r in rep["relations"]] if rel == "both" else [rep[name][rel]]
                    return sum(p[key] * p["facts"] for p in parts) / sum(p["facts"] for p in parts)

                entry.setdefault(name, {})[rel] = {
                    key: mean_std_record([pick(rep, key) for _, rep in reps])
                    for key in ("recall", "bits_over_prior_per_fact")
                }
        out.setdefault(budget, {})[method] = entry
    return out


def report_markdown(summary: dict) -> str:
    lines = [
        "# Stored or inferred: the knowledge study's models on cities they never read",
        "",
        "Generated by `python -m studies.memorization report` (post hoc; docs/knowledge.md). Per method: recall",
        "and bits over prior per fact on a sample of the facts it trained on (seen) and on as many facts of the",
        "same relations whose subject no training statement names (held out);",
        "stored = seen - held out. Mean ± std over the seeds listed (checkpoints exist only for runs of the",
        "session that trained them).",
        "",
    ]
    for budget, methods in summary.items():
        lines += [f"## {budget} FLOPs, 32,000 facts", ""]
        lines += [
            "| method | seeds | relation | recall seen % | recall held out % | bits/fact seen | bits/fact held out | stored share of bits |",
            "|---|---|---|---|---|---|---|---|",
        ]  # fmt: skip
        for method, e in methods.items():
            for rel in (*e["relations"], "both"):
                s, h = e["seen"][rel], e["held_out"][rel]
                bs, bh = s["bits_over_prior_per_fact"]["mean"], h["bits_over_prior_per_fact"]["mean"]
                share = (bs - bh) / bs if bs > 0 else math.nan
                lines.append(
                    f"| {method} | {','.join(e['seeds'])} | {rel} | {100 * s['recall']['mean']:.1f} | "
                    f"{100 * h['recall']['mean']:.1f} | {bs:.3f} | {bh:.3f} | {100 * share:.0f} % |"
                )
        lines.append("")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m studies.memorization", description=__doc__.split("\n\n")[0])
    p.add_argument("action", nargs="?", choices=["score", "report"], default="score")
    p.add_argument("--root", default=str(ROOT / CURRENT.main_dir), help="the study's results (default: v2's grid)")
    p.add_argument("--cache", default=str(ROOT / "data" / "cache"), help="where the fact sources' wheels are")
    args = p.parse_args(argv)
    root = Path(args.root)
    if args.action == "score":
        for run in runs(root):
            if not (run / OUT).is_file():
                rep = score_run(run, Path(args.cache))
                r = rep["relations"][0]
                s, h = rep["seen"][r]["recall"], rep["held_out"][r]["recall"]
                print(f"{run.relative_to(root)}: {r} recall seen {s:.3f}, held out {h:.3f}")
    else:
        out = root.parent / "memorization.md"
        atomic_write_text(out, report_markdown(summarize(root)))
        print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
