"""Evaluation of a trained run: perplexity on every evaluation set, expert usage and unevenness.

    peer eval runs/main/peer [--text notes.txt]... [--json] [--batches N] [--plot-dir DIR]

Perplexity is exp(total NLL / predicted tokens) over the full non-overlapping windows of
``train.seq_len`` tokens (model in eval mode, no grad; ``--batches`` caps the batches of
``train.batch_size`` windows). Sets: the run corpus's validation split, its ``eval_*`` splits, and
each ``--text`` file (reported under its file name; documents joined by the EOS token).

For each PEER / PKM layer, router weights are accumulated per expert (``record_usage``) and
reported as usage and unevenness (paper Table 2, see ``peer.metrics``), on the validation split
(the paper's protocol) and per set; ``--plot-dir`` draws the distribution on the validation split.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch

from .errors import UsageError
from .layers.router import ProductKeyRouter
from .metrics import perplexity, usage_stats
from .model import summed_nll

__all__ = [
    "evaluate",
    "evaluate_tokens",
    "run_tokenizer",
    "check_corpus_tokenizer",
    "format_report",
    "add_arguments",
    "run",
]


# ------------------------------------------------------------------ pieces
def run_dir_of(path: str | Path) -> Path:
    """The run directory of a run or checkpoint path: the nearest folder (itself or above) with config.toml."""
    p = Path(path).resolve()
    for d in (p, *p.parents):
        if (d / "config.toml").is_file():
            return d
    return p


def run_tokenizer(path: str | Path, cfg):
    """The run's tokenizer: RUN/tokenizer.json if saved there, else ``data.tokenizer``, else the corpus's."""
    from .data import load_tokenizer

    candidates = [run_dir_of(path) / "tokenizer.json"]
    if cfg.data.tokenizer:
        candidates.append(Path(cfg.data.tokenizer))
    candidates.append(Path(cfg.data.corpus) / "tokenizer.json")
    for c in candidates:
        if c.is_file():
            return load_tokenizer(c)
    raise FileNotFoundError("no tokenizer for this run: looked for " + ", ".join(str(c) for c in candidates))


def check_corpus_tokenizer(path: str | Path, corpus: str | Path) -> None:
    """ValueError when the run saved the tokenizer it was trained with (RUN/tokenizer.json) and the
    corpus's tokenizer.json differs from it: the corpus was rebuilt since and its token ids mean
    something else to this model."""
    saved, current = run_dir_of(path) / "tokenizer.json", Path(corpus) / "tokenizer.json"
    if saved.is_file() and current.is_file() and saved.read_bytes() != current.read_bytes():
        raise UsageError(
            f"{current} differs from {saved}, the tokenizer this run was trained with: the corpus "
            "was rebuilt since training; retrain the run or evaluate on --text files only"
        )


@torch.no_grad()
def evaluate_tokens(
    model,
    tokens: np.ndarray,
    seq_len: int,
    batch_size: int,
    max_batches: int | None = None,
    progress: str | None = None,
) -> dict:
    """Summed next-token NLL over non-overlapping windows; ``{"tokens", "windows", "nll", "loss", "perplexity"}``.

    The windows are ``peer.data.eval_batches``'s (the training loop's validation loss uses the same):
    every full window of ``seq_len`` targets in order, in batches of ``batch_size``; ``max_batches``
    caps the batches. A text shorter than one window is scored as one shorter window. ``progress``:
    a label for a progress bar over the batches (on stderr), or None for none."""
    from .data import eval_batches

    if len(tokens) < 2:
        raise UsageError(f"need at least 2 tokens to evaluate, got {len(tokens)}")
    if max_batches is not None and max_batches <= 0:
        raise UsageError(f"max_batches must be positive, got {max_batches}")
    device = next(model.parameters()).device
    if len(tokens) > seq_len:
        batches = eval_batches(
            tokens, batch_size, seq_len, max_tokens=None if max_batches is None else max_batches * batch_size * seq_len
        )
    else:  # shorter than one window
        t = torch.from_numpy(np.asarray(tokens, dtype=np.int64))[None]
        batches = [(t[:, :-1], t[:, 1:])]
    if progress is not None:
        from tqdm.auto import tqdm

        total = -(-max(1, (len(tokens) - 1) // seq_len) // batch_size)
        batches = tqdm(batches, desc=progress, total=min(total, max_batches or total), unit="batch", leave=False)
    nll, count, windows = summed_nll(model, batches, device)
    return {"tokens": count, "windows": windows, "nll": nll, "loss": nll / count, "perplexity": perplexity(nll, count)}


def _usage_layers(model) -> dict:
    """The sparse layers that keep usage accounts (the product-key layers: PEER, PKM); MoE layers are left out."""
    return {name: m for name, m in model.sparse_layers().items() if isinstance(m, ProductKeyRouter)}


def check_text_file(path: str | Path) -> Path:
    """``path`` as a Path if it is a readable file; else one clear error saying what it is."""
    p = Path(path)
    if p.is_dir():
        raise UsageError(
            f"--text {str(p)!r} is a folder, not a text file: give its files one by one, or build a corpus from "
            "the folder with: peer data tokenize FOLDER --out DIR"
        )
    if not p.is_file():
        raise FileNotFoundError(f"--text {str(p)!r}: no such file")
    return p


def _text_tokens(path: str | Path, tokenizer, replace_errors: bool = False) -> np.ndarray:
    from .data import encode_texts

    p = check_text_file(path)
    enc = encode_texts([p], tokenizer, replace_errors=replace_errors)
    if isinstance(enc, dict):
        enc = list(enc.values())
    if isinstance(enc, (list, tuple)):
        enc = np.concatenate([np.asarray(e, dtype=np.int64).ravel() for e in enc]) if enc else np.zeros(0, np.int64)
    return np.asarray(enc, dtype=np.int64).ravel()


def _set_names(texts: Iterable[str | Path]) -> list[tuple[str, Path]]:
    """Report names for text files: the file name, or the path as given when two names clash."""
    paths = [Path(t) for t in texts]
    names = [p.name for p in paths]
    return [(p.name if names.count(p.name) == 1 else str(p), p) for p in paths]


# ------------------------------------------------------------------ the evaluation
def evaluate(
    run_path: str | Path,
    texts: Iterable[str | Path] = (),
    max_batches: int | None = None,
    plot_dir: str | Path | None = None,
    model_and_cfg=None,
    corpus: str | Path | None = None,
    replace_errors: bool = False,
    progress: bool = False,
    test: bool = False,
    facts: str | Path | None = None,
    max_facts: int | None = None,
) -> dict:
    """Evaluate a run (or checkpoint) on its corpus's evaluation splits and on ``texts``; ``test=True``
    adds the held-out ``test_*`` splits (a final comparison only: nothing may be chosen on them).

    Returns a JSON-able dict: ``run``, ``step``, ``params`` (total/active), ``flops_per_token``,
    ``seq_len``, ``sets`` ({name: {kind, tokens, windows, nll, loss, perplexity}}), and ``experts``
    ({layer: {experts, used, usage, unevenness, set, by_set}}) measured on the validation split, and
    ``noncausal_layers`` (:meth:`PeerLM.noncausal_layers`: non-empty when the perplexities are not causal).
    ``plot_dir`` writes ``expert_usage.png`` there (``experts[layer]["plot"]`` holds its path).
    ``facts`` (a facts corpus or its facts.jsonl, :mod:`peer.data.facts`) adds ``knowledge``: recall, value
    loss and bits stored (:mod:`peer.knowledge`), over its first ``max_facts`` probes if given.
    """
    from .data import eval_splits, open_tokens
    from .flops import count_params, flops

    if model_and_cfg is None:
        from .train import load_run

        model, cfg, meta = load_run(run_path)
    else:
        model, cfg, meta = model_and_cfg
    if max_batches is not None and max_batches <= 0:
        raise UsageError(f"--batches: must be positive, got {max_batches}")
    probes = None
    if facts is not None:  # read before any evaluation: a bad file fails at once
        from .knowledge import load_probes

        probes = load_probes(facts, max_facts)
    model.eval()
    T, B = cfg.train.seq_len, cfg.train.batch_size
    text_sets = _set_names(texts)
    sets: list[tuple[str, str, object]] = []  # (name, kind, source)
    if corpus != "":  # "" (--corpus none): only the --text files
        corpus = Path(cfg.data.corpus if corpus is None else corpus)
        if not corpus.is_dir():
            raise FileNotFoundError(
                f"data.corpus {str(corpus)!r} of this run does not exist (moved? pass "
                "--corpus DIR; `peer data prepare` rebuilds the starter corpus; --corpus none "
                "evaluates only the --text files)"
            )
        check_corpus_tokenizer(run_path, corpus)
        splits = [cfg.data.val_split] + [s for s in eval_splits(corpus, test=test) if s != cfg.data.val_split]
        sets += [(s, "split", s) for s in splits]
    elif not text_sets:
        raise UsageError("--corpus none: give --text files to evaluate")
    tokenizer = run_tokenizer(run_path, cfg) if text_sets or probes is not None else None
    sets += [(name, "text", p) for name, p in text_sets]

    layers = _usage_layers(model)
    prev = {name: m.record_usage for name, m in layers.items()}
    report_sets: dict[str, dict] = {}
    by_set: dict[str, dict] = {name: {} for name in layers}
    val_usage: dict[str, np.ndarray] = {}
    try:
        for m in layers.values():
            m.record_usage = True
        for name, kind, src in sets:
            tokens = open_tokens(corpus, src) if kind == "split" else _text_tokens(src, tokenizer, replace_errors)
            if len(tokens) < 2:
                raise UsageError(f"{'split' if kind == 'split' else '--text'} {name!r} has fewer than 2 tokens")
            for m in layers.values():
                m.reset_usage()
            res = evaluate_tokens(model, tokens, T, B, max_batches, progress=name if progress else None)
            report_sets[name] = {"kind": kind, **res}
            for lname, m in layers.items():
                w = m.usage.detach().cpu().double().numpy().copy()
                s = usage_stats(w)
                by_set[lname][name] = {"usage": s["usage"], "unevenness": s["unevenness"]}
                if kind == "split" and name == cfg.data.val_split:
                    val_usage[lname] = w
    finally:
        for name, m in layers.items():
            m.record_usage = prev[name]
            m.reset_usage()
    params = count_params(cfg.model)
    report = {
        "run": str(run_path),
        "step": meta.get("step") if isinstance(meta, dict) else None,
        "model": cfg.model.sparse_layer if cfg.model.sparse_layer != "none" else "dense",
        "params": {"total": int(params.total), "active": int(params.active)},
        "flops_per_token": float(flops(cfg.model, T).forward_per_token),
        "seq_len": T,
        "sets": report_sets,
        "experts": {},
        # layers whose evaluation output depends on other positions/sequences (a batch-routed MoE): then
        # these perplexities are not causal LM perplexities
        "noncausal_layers": model.noncausal_layers(),
    }
    if probes is not None:
        from .knowledge import knowledge_report, score_facts

        scores = score_facts(model, tokenizer, probes, batch_size=B)
        train_flops = meta.get("flops") if isinstance(meta, dict) else None
        report["knowledge"] = {
            "facts_file": str(facts),
            **knowledge_report(scores, probes, int(params.total), train_flops),
        }
    for lname in layers:
        w = val_usage.get(lname)
        entry = {**usage_stats(w), "set": cfg.data.val_split} if w is not None else {"set": None}
        entry["by_set"] = by_set[lname]
        report["experts"][lname] = entry
    if plot_dir is not None and val_usage:
        from .plots import plot_usage

        path = Path(plot_dir) / "expert_usage.png"
        plot_usage(val_usage, path, title=f"Expert usage on {cfg.data.val_split}")
        for lname in val_usage:
            report["experts"][lname]["plot"] = str(path)
    return report


def format_report(report: dict) -> str:
    """A readable table of an ``evaluate`` report."""
    p = report["params"]
    lines = [
        f"run {report['run']} (step {report['step']}, {report['model']}): params {p['total']:,} total, "
        f"{p['active']:,} active; {report['flops_per_token']:.3g} forward FLOPs/token",
        "",
        f"{'set':<28} {'kind':<6} {'tokens':>10} {'loss':>8} {'perplexity':>11}",
    ]
    for name, s in report["sets"].items():
        lines.append(f"{name:<28} {s['kind']:<6} {s['tokens']:>10,} {s['loss']:>8.4f} {s['perplexity']:>11.2f}")
    if report.get("noncausal_layers"):
        lines.append(
            f"note: not causal LM perplexities: {', '.join(report['noncausal_layers'])} route over the whole "
            "batch, so a token's output depends on later tokens and other sequences (model.moe.routing="
            '"dropless" is causal; docs/training.md)'
        )
    for lname, e in report["experts"].items():
        if e.get("set") is None:
            continue
        lines += [
            "",
            f"{lname}: {e['experts']:,} experts, usage {100 * e['usage']:.2f}% ({e['used']:,} used), "
            f"unevenness KL {e['unevenness']:.4f} on {e['set']}",
        ]
        for sname, s in e["by_set"].items():
            lines.append(f"  {sname:<26} usage {100 * s['usage']:6.2f}%  unevenness {s['unevenness']:.4f}")
        if "plot" in e:
            lines.append(f"  plot: {e['plot']}")
    if "knowledge" in report:
        k = report["knowledge"]
        lines.append(
            f"facts ({k['facts_file']}): {k['facts']:,} probes, recall {100 * k['recall']:.1f}%, value loss "
            f"{k['value_nats_per_token']:.3f} nats/token, bits stored {k['bits']:,.0f} of {k['bits_available']:,.0f} "
            f"({k['bits_per_param']:.3g} per parameter); over the values' frequencies {k['bits_over_prior']:,.0f} of "
            f"{k['bits_over_prior_available']:,.0f}"
        )
        for rel, r in k["relations"].items():
            lines.append(f"  {rel:<20} {r['facts']:>8,} facts  recall {100 * r['recall']:5.1f}%  bits {r['bits']:,.0f}")
    return "\n".join(lines)


# ------------------------------------------------------------------ CLI
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run", help="run directory or checkpoint directory")
    parser.add_argument(
        "--text",
        action="append",
        default=[],
        metavar="FILE",
        help="also report perplexity on this text file (repeatable)",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--batches", type=int, default=None, help="at most N batches per set (0: all, the default)")
    parser.add_argument("--plot-dir", default=None, help="write expert_usage.png here (default: RUN/plots)")
    parser.add_argument(
        "--replace-errors",
        action="store_true",
        help="--text files: replace bytes that are not UTF-8 with U+FFFD instead of failing",
    )
    parser.add_argument(
        "--corpus", default=None, help="the corpus dir (default: the run's data.corpus); 'none': only the --text files"
    )
    parser.add_argument(
        "--no-progress", action="store_true", help="no progress bar (default: one when stderr is a terminal)"
    )
    parser.add_argument(
        "--facts", default=None, metavar="DIR", help="a facts corpus (peer data facts): recall and bits stored"
    )
    parser.add_argument("--max-facts", type=int, default=None, help="with --facts: only the first N probes")
    parser.add_argument(
        "--test",
        action="store_true",
        help="also score the held-out test_* splits (for a final, pre-registered comparison only: "
        "choosing anything on them makes them no test)",
    )


def run(args: argparse.Namespace) -> int:
    for t in args.text or []:  # before any evaluation: a wrong path fails at once
        check_text_file(t)
    plot_dir = args.plot_dir or str(run_dir_of(args.run) / "plots")
    corpus = "" if args.corpus == "none" else args.corpus
    report = evaluate(
        args.run,
        texts=args.text,
        max_batches=args.batches or None,  # 0: every batch (as peer main --eval-batches 0)
        plot_dir=plot_dir,
        corpus=corpus,
        replace_errors=args.replace_errors,
        progress=not args.no_progress and sys.stderr.isatty(),
        test=args.test,
        facts=args.facts,
        max_facts=args.max_facts,
    )
    if args.json:
        json.dump(_jsonable(report), sys.stdout)
        sys.stdout.write("\n")
    else:
        print(format_report(report))
    return 0


def _jsonable(x):
    """NaN / inf as null (strict JSON)."""
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x
