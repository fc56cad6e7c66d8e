"""Seeded comparison of two methods: ``peer sweep compare A B`` (A, B: point folders or run folders).

A point is a folder holding ``result.json`` files of finished runs (``<point>/seed<S>/result.json``
of a seeded sweep, or the files given directly; several folders may be given per side, joined
with commas). Per evaluation set, in nats (log perplexity, where seed noise is additive):

    mean_A, std_A (ddof 1), mean_B, std_B, n_A, n_B
    pooled std  s_p = sqrt(((n_A - 1) s_A^2 + (n_B - 1) s_B^2) / (n_A + n_B - 2))
    gap         mean_A - mean_B (negative: A is better), and gap / s_p

The verdict "A < B by more than 2 pooled std" is what the recipe study's target asks for.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from ...errors import UsageError
from ...metrics import mean_std

__all__ = ["load_point", "compare", "format_compare"]


def load_point(spec: str) -> list[dict]:
    """Every result.json under the comma-separated folders (or files) of ``spec``."""
    out = []
    for part in spec.split(","):
        p = Path(part)
        files = [p] if p.is_file() else sorted(p.glob("result.json")) + sorted(p.glob("*/result.json"))
        if not files:
            raise UsageError(f"{part!r}: no result.json here (give a sweep point folder, e.g. results/x/1e13/peer/d64)")
        out += [json.loads(f.read_text(encoding="utf-8")) for f in files]
    return out


def _stats(runs: list[dict], s: str) -> tuple[float, float, int]:
    return mean_std(math.log(r["perplexity"][s]) for r in runs if s in r.get("perplexity", {}))


def compare(a: list[dict], b: list[dict]) -> dict[str, dict]:
    """Per set shared by both sides: means, stds, n, pooled std, gap (A - B) and gap in pooled stds."""
    sets = sorted(
        {s for r in a for s in r["perplexity"]} & {s for r in b for s in r["perplexity"]}, key=lambda s: (s != "val", s)
    )
    out = {}
    for s in sets:
        ma, sa, na = _stats(a, s)
        mb, sb, nb = _stats(b, s)
        dof = na + nb - 2
        ss = sum((n - 1) * sd**2 for sd, n in ((sa, na), (sb, nb)) if n > 1)  # one run adds no spread
        sp = math.sqrt(ss / dof) if dof > 0 else math.nan
        gap = ma - mb
        out[s] = {
            "mean_a": ma,
            "std_a": sa,
            "n_a": na,
            "mean_b": mb,
            "std_b": sb,
            "n_b": nb,
            "pooled_std": sp,
            "gap": gap,
            "gap_in_std": gap / sp if sp and math.isfinite(sp) and sp > 0 else math.nan,
            "ppl_a": math.exp(ma),
            "ppl_b": math.exp(mb),
        }
    return out


def format_compare(res: dict[str, dict], name_a: str = "A", name_b: str = "B") -> str:
    lines = [
        f"| set | {name_a}: ppl (ln ± std, n) | {name_b}: ppl (ln ± std, n) | gap A-B (nats) | pooled std | gap / std |",
        "|---|---|---|---|---|---|",
    ]
    for s, r in res.items():
        lines.append(
            f"| {s} | {r['ppl_a']:.1f} ({r['mean_a']:.3f} ± {_num(r['std_a'], '.3f')}, {r['n_a']}) | "
            f"{r['ppl_b']:.1f} ({r['mean_b']:.3f} ± {_num(r['std_b'], '.3f')}, {r['n_b']}) | {r['gap']:+.3f} | "
            f"{_num(r['pooled_std'], '.3f')} | {_num(r['gap_in_std'], '+.1f')} |"
        )
    return "\n".join(lines)


def _num(v: float, fmt: str) -> str:
    """``v`` formatted, or "-" when undefined (one seed on each side has no pooled std)."""
    return format(v, fmt) if math.isfinite(v) else "-"
