"""``peer train CONFIG.toml [--set key=value ...] [--resume] [--out DIR]``.

CONFIG may also be a run directory: its ``config.toml`` is used and the run continues in place, e.g.
``peer train runs/x --resume --set train.flops=0 train.steps=2000`` (with a FLOP budget set, an explicit
train.steps is an error: the budget decides the length).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from dataclasses import replace
from pathlib import Path

__all__ = ["add_arguments", "run"]


def _noncausal_layers(cfg) -> list[str]:
    """The layers of ``cfg``'s model whose outputs depend on other positions (built on the meta device:
    no memory, no init), as :meth:`peer.model.PeerLM.noncausal_layers` says."""
    import torch

    from ..model import PeerLM

    model_cfg = replace(cfg.model, vocab_size=cfg.model.vocab_size or 1)  # 0: the corpus's, resolved later
    try:
        with torch.device("meta"):
            return PeerLM(model_cfg).noncausal_layers()
    except ValueError:  # an invalid model: training refuses it itself, with the field named
        return []


def _facts_stream_note(cfg, steps: int) -> str | None:
    """A note when ``cfg`` trains on a facts corpus (``peer data facts``) and reads its fixed training stream
    more than about once: a model can learn the stream's order instead of the facts, and the probes (read
    out of context) do not reward that (docs/knowledge.md, addendum 2). None otherwise, or when the corpus
    cannot be read here (training then says why itself)."""
    import math

    from ..data import DataError, load_manifest

    try:
        manifest = load_manifest(cfg.data.corpus)
        facts, tokens = manifest["facts"], int(manifest["splits"]["train"]["tokens"])
    except (DataError, OSError, KeyError, TypeError, ValueError):
        return None
    passes = steps * cfg.train.tokens_per_step / max(tokens, 1)
    if passes <= 1.5:
        return None
    repeats = int(facts.get("repeats", 3))
    return (
        f"reads the training stream of the facts corpus {cfg.data.corpus} {passes:.1f} times, always in the same "
        "order: a model can learn the order instead of the facts, which out-of-context probes do not reward; "
        f"rebuild it with --repeats {math.ceil(repeats * passes)} (now {repeats}) to read each statement about once"
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="TOML config (e.g. configs/peer.toml), or a run directory")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="extend",
        nargs="+",
        default=[],
        metavar="KEY=VALUE",
        help="override a setting, e.g. --set train.flops=3e13 model.peer.topk=8 (repeatable)",
    )
    parser.add_argument(
        "--resume", action="store_true", help="continue the run in the output directory from its latest checkpoint"
    )
    parser.add_argument(
        "--from",
        dest="from_checkpoint",
        default=None,
        metavar="CHECKPOINT",
        help="with --resume: continue from this checkpoint dir instead of the latest",
    )
    parser.add_argument("--out", default=None, help="run directory (overrides train.out_dir)")


def run(args: argparse.Namespace) -> int:
    from ..config import ConfigError, load_config
    from ..distributed.env import DistributedError
    from .loop import TrainingDiverged, resolve_steps, train
    from .signals import Interrupted

    path, out = Path(args.config), args.out
    if path.is_dir():  # a run directory: its config, and (unless --out says otherwise) the run itself
        path, out = path / "config.toml", out if out is not None else str(path)
    cfg = load_config(path, args.overrides)
    explicit_steps = [o for o in args.overrides if o.split("=", 1)[0].strip() == "train.steps"]
    if explicit_steps and cfg.train.flops > 0:
        raise ConfigError(
            f"--set {explicit_steps[-1]}: train.flops={cfg.train.flops:g} sets the length of this run "
            "(steps = budget / FLOPs per step), so train.steps would be ignored; add --set train.flops=0 "
            "to train for train.steps steps, or drop train.steps"
        )
    if out is not None:
        cfg = replace(cfg, train=replace(cfg.train, out_dir=str(out)))
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    steps = resolve_steps(cfg)
    main = os.environ.get("RANK", "0") == "0"  # under torchrun only rank 0 reports
    if main:
        print(
            f"peer train: {steps} steps of {cfg.train.tokens_per_step} tokens -> {cfg.train.out_dir}", file=sys.stderr
        )
        noncausal = _noncausal_layers(cfg)
        if noncausal:
            print(
                f"peer train: note: {', '.join(noncausal)} route over the whole batch (model.moe.routing="
                f'{cfg.model.moe.routing!r}): its losses are not causal LM losses; "dropless" is causal',
                file=sys.stderr,
            )
        if note := _facts_stream_note(cfg, steps):
            print(f"peer train: note: this run {note}", file=sys.stderr)
    try:
        if args.from_checkpoint and not args.resume:
            raise ConfigError("--from: only with --resume (it names the checkpoint to continue from)")
        run_dir = train(cfg, resume=args.resume, from_checkpoint=args.from_checkpoint)
    except (TrainingDiverged, DistributedError) as e:  # diverged; a rank died or timed out
        print(f"peer train: error: {e}", file=sys.stderr)
        return 1
    except Interrupted as e:  # SIGINT / SIGTERM: a checkpoint of the last step was saved
        print(f"\npeer train: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        from .checkpoint import latest_checkpoint

        last = latest_checkpoint(cfg.train.out_dir)
        print(
            f"\npeer train: interrupted; last checkpoint: {last or 'none'}"
            + (f"; continue with: peer train {cfg.train.out_dir} --resume" if last else ""),
            file=sys.stderr,
        )
        return 130
    if main:
        print(run_dir)
    return 0
