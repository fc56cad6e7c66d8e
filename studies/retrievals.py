"""Retrievals per expert over a run, and what the pool-size ablation says about them (issue 29, item 4).

Over a run of T training tokens, a PEER layer with h heads retrieving k experts each makes T*h*k
retrievals; an expert of a pool of N is retrieved R = T*h*k/N times on average. The isoFLOP study's
pool-size arms at 1e13 FLOPs (``results/isoflop_redo/1e13/n*sq``, the d32 × 4 backbone, h=4, k=8, seeds
as run) are set beside the 256² arm (``peer``): their val loss gap to it, with a Welch standard
error, against log10 of the ratio of retrievals per expert. A line through the origin,
``gap = s * log10(R_256 / R)``, is fitted to the pools larger than 256² (weighted by 1/se²)::

    python -m studies.retrievals [--root results/isoflop_redo/1e13]
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np

__all__ = ["main"]

ARMS = {"n64sq": 64**2, "n128sq": 128**2, "peer": 256**2, "n512sq": 512**2, "n1024sq": 1024**2}


def _arm(root: Path, variant: str) -> tuple[list[float], float]:
    runs = [json.loads(f.read_text()) for f in sorted(root.glob(f"{variant}/d32_l4/seed*/result.json"))]
    return [math.log(r["perplexity"]["val"]) for r in runs], float(np.mean([r["tokens"] for r in runs]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m studies.retrievals", description=__doc__.split("\n")[0])
    parser.add_argument("--root", default="results/isoflop_redo/1e13")
    parser.add_argument("--heads-topk", type=int, default=32, help="h*k of the arms (default 4*8)")
    args = parser.parse_args(argv)
    root = Path(args.root)
    ref, ref_tokens = _arm(root, "peer")
    r_ref = ref_tokens * args.heads_topk / ARMS["peer"]
    print(
        "| pool N | seeds | val loss (mean ± std) | retrievals per expert R | gap to 256² (nats) | log10(R_256 / R) |"
    )
    print("|---|---|---|---|---|---|")
    xs, ys, ws = [], [], []
    for variant, n in ARMS.items():
        losses, tokens = _arm(root, variant)
        if not losses:
            continue
        r = tokens * args.heads_topk / n
        gap = float(np.mean(losses) - np.mean(ref))
        se = (
            math.sqrt(np.var(losses, ddof=1) / len(losses) + np.var(ref, ddof=1) / len(ref))
            if len(losses) > 1
            else math.nan
        )
        x = math.log10(r_ref / r)
        sd = f"{np.std(losses, ddof=1):.4f}" if len(losses) > 1 else "—"
        print(
            f"| {int(math.isqrt(n))}² | {len(losses)} | {np.mean(losses):.4f} ± {sd} | {r:,.0f} | "
            f"{gap:+.4f} ± {se:.4f} | {x:+.2f} |"
            if variant != "peer"
            else f"| {int(math.isqrt(n))}² | {len(losses)} | {np.mean(losses):.4f} ± {sd} | {r:,.0f} | 0 | 0 |"
        )
        if n > ARMS["peer"] and math.isfinite(se) and se > 0:
            xs.append(x)
            ys.append(gap)
            ws.append(1 / se**2)
    if xs:
        x, y, w = np.array(xs), np.array(ys), np.array(ws)
        s = float((w * x * y).sum() / (w * x * x).sum())
        s_se = math.sqrt(1 / float((w * x * x).sum()))
        print(f"\nslope s = {s:.4f} ± {s_se:.4f} nats per decade fewer retrievals per expert (pools > 256², weighted)")
        print(
            f"R of the 256² arm: {r_ref:,.0f}; a 1024² pool reaches it at {r_ref * 1024**2 / args.heads_topk:,.0f} "
            "training tokens"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
