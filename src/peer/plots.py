"""Plots as PNG (matplotlib, Agg backend): training curves of runs and expert-usage distributions.

    peer plot runs/main/dense runs/main/peer --out runs/main/plots

Every plotting function returns the arrays it drew, so tests (and callers) can check them.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from .errors import UsageError
from .fsutil import publish
from .metrics import sorted_usage, usage_stats

__all__ = ["read_metrics", "curve_data", "plot_curves", "plot_usage", "add_arguments", "run", "pyplot", "save_figure"]


def pyplot():
    """matplotlib.pyplot on the Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: Path) -> None:
    """Write the figure atomically (temp file in the same folder, then os.replace) and close it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=".png")
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=120, bbox_inches="tight")
        publish(tmp, path)  # the umask's mode (mkstemp makes 0600 files)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
        pyplot().close(fig)


# ------------------------------------------------------------------ training curves
def read_metrics(run_dir: str | Path) -> list[dict]:
    """The records of ``RUN/metrics.jsonl`` (one JSON object per line); a clear error if missing/corrupt."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no metrics.jsonl here (is {str(run_dir)!r} a training run directory?)")
    records = []
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise UsageError(f"{path}:{n}: not valid JSON ({e.msg})") from None
    return records


def _num(x: Any) -> float | None:
    return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(float(x)) else None


def curve_data(run_dir: str | Path) -> dict:
    """Training and validation loss of a run against tokens and FLOPs seen.

    Returns ``{"name", "step", "tokens", "flops", "loss", "val_step", "val_tokens", "val_flops",
    "val_loss"}`` (numpy arrays). A record contributes a training point when it has ``loss`` and a
    validation point when it has ``val_loss``; each needs ``tokens`` and ``flops``.
    """
    cols: dict[str, list] = {
        k: [] for k in ("step", "tokens", "flops", "loss", "val_step", "val_tokens", "val_flops", "val_loss")
    }
    for r in read_metrics(run_dir):
        tokens, flops = _num(r.get("tokens")), _num(r.get("flops"))
        if tokens is None or flops is None:
            continue
        loss = _num(r.get("loss"))
        if loss is not None:
            cols["step"].append(r.get("step", len(cols["step"])))
            for key, v in (("tokens", tokens), ("flops", flops), ("loss", loss)):
                cols[key].append(v)
        val = _num(r.get("val_loss"))
        if val is not None:
            cols["val_step"].append(r.get("step", -1))
            for key, v in (("val_tokens", tokens), ("val_flops", flops), ("val_loss", val)):
                cols[key].append(v)
    out: dict[str, Any] = {k: np.asarray(v, dtype=np.float64) for k, v in cols.items()}
    out["name"] = Path(run_dir).resolve().name
    return out


def plot_curves(runs: Iterable[str | Path], out_dir: str | Path, names: Iterable[str] | None = None) -> dict[str, dict]:
    """Write ``loss_vs_tokens.png`` and ``loss_vs_flops.png`` in ``out_dir``: one line per run,
    validation loss as markers. Returns ``{name: curve_data(run)}``, the data that was drawn."""
    runs = [Path(r) for r in runs]
    if not runs:
        raise UsageError("runs: give at least one run directory")
    names = list(names) if names is not None else [r.resolve().name for r in runs]
    if len(names) != len(runs):
        raise UsageError("names: need one name per run")
    data: dict[str, dict] = {}
    for name, r in zip(names, runs, strict=True):
        key = name if name not in data else f"{name} ({r})"
        data[key] = curve_data(r)
        data[key]["name"] = key
    plt = pyplot()
    out_dir = Path(out_dir)
    for xkey, label, fname in (
        ("tokens", "tokens seen", "loss_vs_tokens.png"),
        ("flops", "training FLOPs", "loss_vs_flops.png"),
    ):
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for i, (name, d) in enumerate(data.items()):
            color = f"C{i % 10}"
            if len(d["loss"]):
                ax.plot(d[xkey], d["loss"], color=color, lw=1.2, label=f"{name} (train)")
            if len(d["val_loss"]):
                ax.plot(d[f"val_{xkey}"], d["val_loss"], "o--", color=color, ms=5, lw=0.8, label=f"{name} (val)")
        ax.set_xlabel(label)
        ax.set_ylabel("loss (nats/token)")
        if any(len(d[xkey]) and d[xkey].min() > 0 for d in data.values()):
            ax.set_xscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        ax.set_title(f"Loss vs {label}")
        save_figure(fig, out_dir / fname)
    return data


# ------------------------------------------------------------------ expert usage
def plot_usage(
    usage: Mapping[str, Any], path: str | Path, title: str = "Expert usage distribution"
) -> dict[str, np.ndarray]:
    """The distribution of accumulated router weight over experts: for each layer, the normalised
    weights z (= w / sum w) sorted in decreasing order against expert rank, log-scaled y, with the
    uniform level 1/N dashed. Experts with zero weight fall off the log axis; the legend gives
    usage and unevenness (paper Table 2). Returns ``{layer: sorted z}``."""
    if not usage:
        raise UsageError("usage: no sparse layers to plot")
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    drawn: dict[str, np.ndarray] = {}
    for i, (name, weights) in enumerate(usage.items()):
        w = sorted_usage(weights)
        total = w.sum()
        z = w / total if total > 0 else w
        drawn[name] = z
        s = usage_stats(weights)
        color = f"C{i % 10}"
        ranks = np.arange(1, len(z) + 1)
        zp = np.where(z > 0, z, np.nan)
        ax.plot(
            ranks,
            zp,
            color=color,
            lw=1.2,
            label=f"{name}: N={s['experts']}, usage {100 * s['usage']:.1f}%, KL {s['unevenness']:.3f}",
        )
        ax.axhline(1.0 / len(z), color=color, ls=":", lw=0.8)
    ax.set_yscale("log")
    ax.set_xlabel("expert rank (by accumulated router weight)")
    ax.set_ylabel("share of router weight (log)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    ax.set_title(title + " (dotted: uniform)")
    save_figure(fig, Path(path))
    return drawn


# ------------------------------------------------------------------ CLI
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("runs", nargs="+", help="training run directories (with metrics.jsonl)")
    parser.add_argument("--out", default=None, help="output folder (default: RUN/plots for one run, else plots/)")


def run(args: argparse.Namespace) -> int:
    out = args.out or (str(Path(args.runs[0]) / "plots") if len(args.runs) == 1 else "plots")
    data = plot_curves(args.runs, out)
    for name, d in data.items():
        last = f"{d['loss'][-1]:.4f}" if len(d["loss"]) else "-"
        val = f", last val loss {d['val_loss'][-1]:.4f}" if len(d["val_loss"]) else ""
        print(f"{name}: {len(d['loss'])} points, last train loss {last}{val}")
    print(f"wrote {Path(out) / 'loss_vs_tokens.png'} and {Path(out) / 'loss_vs_flops.png'}")
    return 0
