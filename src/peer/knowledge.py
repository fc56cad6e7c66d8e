"""What a model stores of a facts corpus (issue 29): per fact, the loss of its value given the prefix,
exact recall by greedy decoding, and the bits stored.

For a probe ``{"prefix", "value", "candidates"}`` (:mod:`peer.data.facts`), the text prefix + value is
tokenized once; the value's tokens are those that end after the prefix (a token straddling the
boundary counts as the value's). One forward pass scores them:

    value loss      L = sum over the value's tokens of -ln p(token | everything before it)   (nats)
    recalled        every value token is the argmax given the true tokens before it: exactly
                    what greedy decoding from the prefix would write
    bits stored     max(0, log2(candidates) - L / ln 2)
    bits over prior max(0, -log2 q(value) - L / ln 2), q the frequency of the value among the probes of
                    its relation (knowledge_report): what the model knows beyond which values are common

``log2(candidates)`` is the information of a fact whose value is uniform over its relation's
``candidates`` values; a model that gives the value probability p stores log2(candidates * p) bits
of it (floored at zero). This is the definition of Allen-Zhu & Li, "Knowledge Capacity Scaling
Laws" (arXiv:2404.05405), for facts drawn uniformly; for real facts (not uniform) it is an upper
bound on the information, the same for every model compared, which is what a comparison needs.
A model that has learned only how often each value occurs (most cities are in the United States)
already "stores" bits by that definition, more the more facts are probed; *bits over prior* counts
only what it knows beyond those frequencies (a secondary measure added by the knowledge study's
addendum of 2026-12-07; docs/knowledge.md).
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

from .errors import UsageError

__all__ = ["load_probes", "score_facts", "knowledge_report"]


def load_probes(path: str | Path, max_facts: int | None = None) -> list[dict]:
    """The probes of a facts corpus (its folder or its facts.jsonl); the first ``max_facts`` if given."""
    p = Path(path)
    if p.is_dir():
        p = p / "facts.jsonl"
    if not p.is_file():
        raise UsageError(f"--facts {str(path)!r}: no facts.jsonl here (build one with: peer data facts --out DIR)")
    probes = []
    with p.open(encoding="utf-8") as f:
        for i, line in enumerate(f):
            if max_facts is not None and len(probes) >= max_facts:
                break
            try:
                probe = json.loads(line)
                if not (
                    isinstance(probe["prefix"], str) and isinstance(probe["value"], str) and probe["candidates"] >= 1
                ):
                    raise ValueError
            except (ValueError, KeyError, TypeError):
                raise UsageError(f"{p}: line {i + 1} is not a probe (prefix, value, candidates)") from None
            probes.append(probe)
    return probes


def _encode(tokenizer, prefix: str, value: str) -> tuple[list[int], int]:
    """Token ids of prefix + value and the index of the value's first token."""
    enc = tokenizer.backend.encode(prefix + value, add_special_tokens=False)
    cut = len(prefix)
    start = next((i for i, (_, end) in enumerate(enc.offsets) if end > cut), len(enc.ids))
    return list(enc.ids), start


@torch.no_grad()
def score_facts(model, tokenizer, probes: Sequence[dict], batch_size: int = 64, device="cpu") -> list[dict]:
    """Per probe: ``value_nats`` (L), ``value_tokens``, ``recalled`` (bool), ``bits`` (see the module docstring)."""
    was_training = model.training
    model.eval()
    max_len = int(model.config.max_seq_len)
    eos = tokenizer.eos_id if tokenizer.eos_id is not None else 0
    rows = []
    for p in probes:
        ids, start = _encode(tokenizer, p["prefix"], p["value"])
        if start >= len(ids):
            raise UsageError(f"probe {p.get('id', p['prefix'])!r}: the value has no tokens")
        ids = [eos, *ids]  # a probe starts a document, as every document follows an end-of-text token
        start += 1
        if len(ids) > max_len + 1:  # keep the value and as much of the prefix as fits
            drop = len(ids) - (max_len + 1)
            if drop >= start:
                raise UsageError(f"probe {p.get('id', p['prefix'])!r}: its value alone exceeds max_seq_len={max_len}")
            ids, start = ids[drop:], start - drop
        rows.append((ids, start))
    out = []
    try:
        for b in range(0, len(rows), batch_size):
            chunk = rows[b : b + batch_size]
            width = max(len(ids) for ids, _ in chunk) - 1
            x = torch.full((len(chunk), width), eos, dtype=torch.long)
            y = torch.full((len(chunk), width), -100, dtype=torch.long)
            for i, (ids, start) in enumerate(chunk):
                t = torch.tensor(ids)
                x[i, : len(ids) - 1] = t[:-1]
                y[i, start - 1 : len(ids) - 1] = t[start:]  # targets: the value's tokens only
            logits = model(x.to(device)).logits.float()
            nll = F.cross_entropy(logits.flatten(0, 1), y.to(device).flatten(), reduction="none", ignore_index=-100)
            nll = nll.view(y.shape).cpu()
            hit = (logits.argmax(-1).cpu() == y) | (y == -100)
            for i, (ids, start) in enumerate(chunk):
                probe = probes[b + i]
                nats = float(nll[i].sum())
                out.append(
                    {
                        "value_nats": nats,
                        "value_tokens": len(ids) - start,
                        "recalled": bool(hit[i].all()),
                        "bits": max(0.0, math.log2(probe["candidates"]) - nats / math.log(2)),
                    }
                )
    finally:
        model.train(was_training)
    return out


def knowledge_report(scores: Sequence[dict], probes: Sequence[dict], params: int, train_flops: float | None) -> dict:
    """Totals of :func:`score_facts`: facts, recall, mean value loss per token, bits stored (total, per
    parameter, per training FLOP), bits over the values' frequencies (see the module docstring), and the
    same per relation."""
    pairs = [(p.get("relation", "?"), p["value"]) for p in probes]
    per_relation, counts = Counter(r for r, _ in pairs), Counter(pairs)
    surprise = [math.log2(per_relation[r] / counts[(r, v)]) for r, v in pairs]  # -log2 of the value's frequency

    def totals(idx: list[int]) -> dict:
        n = len(idx)
        toks = sum(scores[i]["value_tokens"] for i in idx)
        bits = sum(scores[i]["bits"] for i in idx)
        return {
            "facts": n,
            "recall": sum(scores[i]["recalled"] for i in idx) / max(n, 1),
            "value_nats_per_token": sum(scores[i]["value_nats"] for i in idx) / max(toks, 1),
            "bits": bits,
            "bits_available": sum(math.log2(probes[i]["candidates"]) for i in idx),
            "bits_over_prior": sum(max(0.0, surprise[i] - scores[i]["value_nats"] / math.log(2)) for i in idx),
            "bits_over_prior_available": sum(surprise[i] for i in idx),
        }

    every = totals(list(range(len(scores))))
    every["bits_per_param"] = every["bits"] / params if params else math.nan
    every["bits_per_train_flop"] = every["bits"] / train_flops if train_flops else math.nan
    relations: dict[str, list[int]] = {}
    for i, p in enumerate(probes):
        relations.setdefault(p.get("relation", "?"), []).append(i)
    every["relations"] = {r: totals(idx) for r, idx in sorted(relations.items())}
    return every
