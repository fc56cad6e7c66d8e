"""The memory figures of docs/benchmarks.md ("Evaluation outside the command line; oneDNN's kernel cache").

Each measurement runs in this process only; compare settings by running it again with another
environment (the settings are process-wide and read once)::

    ONEDNN_PRIMITIVE_CACHE_CAPACITY=1024 python tools/mem_bench.py train moe 200 /tmp/a   # oneDNN's default
    python tools/mem_bench.py train moe 200 /tmp/b                                        # peer's cap (16)
    PEER_RETAIN_FREED_MEMORY=0 python tools/mem_bench.py eval RUN                         # faults per batch
    python tools/mem_bench.py eval RUN

``train METHOD STEPS OUT``: STEPS steps of the confirmation study's frozen recipe for METHOD
(configs/confirm_final.toml), 1 thread; prints the peak RSS, the cache capacity in effect and the
sha256 of the final weights (equal across settings: the same computation). ``eval RUN``: 30 batches
of RUN's ``eval_brown_nonfiction`` through ``peer.eval.evaluate_tokens``, 1 thread; prints tokens/s,
user/system CPU seconds and minor page faults.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import resource
import time
from pathlib import Path

import torch


def _usage() -> str:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return f"user {ru.ru_utime:.1f} s, sys {ru.ru_stime:.1f} s, {ru.ru_minflt:,} minor faults, peak RSS {ru.ru_maxrss >> 10:,} MiB"


def train(method: str, steps: int, out: str) -> None:
    from peer.config import load_config
    from peer.experiments.sweep.plan import load_sweep
    from peer.memory import KERNEL_CACHE_ENV
    from peer.train import train as run_training
    from peer.train.checkpoint import latest_checkpoint

    spec = load_sweep("configs/confirm_final.toml")
    extra = [f"train.out_dir='{out}'", f"train.steps={steps}", "train.flops=0", "train.threads=1", "train.seed=7"]
    run = run_training(load_config(spec.base or None, [*spec.overrides, *spec.variants[method], *extra]))
    last = latest_checkpoint(run)
    assert last is not None, f"{run}: no checkpoint"
    weights = Path(last) / "model.safetensors"
    print(f"cache capacity {os.environ.get(KERNEL_CACHE_ENV, '(oneDNN default)')}: {_usage()}")
    print(f"weights sha256 {hashlib.sha256(weights.read_bytes()).hexdigest()[:16]}")


def evaluate(run: str) -> None:
    from peer.data import open_tokens
    from peer.eval import evaluate_tokens
    from peer.train import load_run

    model, cfg, _ = load_run(run)
    tokens = open_tokens(cfg.data.corpus, "eval_brown_nonfiction")[: 30 * 16 * 128 + 1]
    t = time.perf_counter()
    r = evaluate_tokens(model, tokens, cfg.train.seq_len, 16)
    dt = time.perf_counter() - t
    print(f"{r['tokens'] / dt:,.0f} tokens/s, loss {r['loss']:.6f}; process: {_usage()}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="what", required=True)
    t = sub.add_parser("train")
    t.add_argument("method", choices=["dense", "moe", "pkm", "peer"])
    t.add_argument("steps", type=int)
    t.add_argument("out")
    e = sub.add_parser("eval")
    e.add_argument("run")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.what == "train":
        train(args.method, args.steps, args.out)
    else:
        evaluate(args.run)


if __name__ == "__main__":
    main()
