"""Before a sweep on a CUDA machine: does a planned run train there, with the CPU's numbers?

``python tools/gpu_check.py SWEEP.toml RUN_ID [STEPS] [N]`` trains the planned run RUN_ID (its model, recipe and
data) for STEPS steps three times from the same seed: on CUDA with the layer's default backend ("auto": the
Triton expert mix), on CUDA with the PyTorch reference, and on the CPU (8 steps). It prints the losses side by
side and the milliseconds per step; exit status 1 when the first steps disagree beyond float rounding (a
top-k router's trajectories split once rounding flips a pick, so only the first steps are compared).
With N > 1 it then trains N copies at once, one process each (as ``peer sweep --parallel N`` would), and
prints the steps per second of all of them together."""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

import torch

from peer.experiments.sweep import load_sweep, plan
from peer.train import train


def run(cfg, device: str, backend: str, steps: int, out: Path) -> tuple[list[float], float]:
    model = cfg.model
    if model.sparse_layer == "peer":
        model = replace(model, peer=replace(model.peer, backend=backend))
    cfg = replace(
        cfg,
        model=model,
        train=replace(
            cfg.train,
            device=device,
            steps=steps,
            flops=0,
            log_every=1,
            eval_every=0,
            ckpt_every=10**9,
            out_dir=str(out),
            threads=1,
        ),
    )
    train(cfg)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "loss" in r]
    ms = statistics.median(cfg.train.batch_size * cfg.train.seq_len / r["tokens_per_s"] * 1e3 for r in rows[2:])
    return [r["loss"] for r in rows], ms


def _copy(args) -> None:
    cfg, out = args
    torch.set_num_threads(1)
    run(cfg, cfg.train.device, "auto", cfg.train.steps, out)


def concurrent(cfg, device: str, n: int, steps: int, tmp: Path) -> float:
    """Steps per second of ``n`` copies of the run trained at once, one process each."""
    import multiprocessing as mp
    import time

    cfg = replace(cfg, train=replace(cfg.train, device=device, steps=steps))
    t0 = time.perf_counter()
    with mp.get_context("spawn").Pool(n) as pool:
        pool.map(_copy, [(cfg, tmp / f"copy{i}") for i in range(n)])
    return n * steps / (time.perf_counter() - t0)


def main() -> int:
    sweep, run_id = sys.argv[1], sys.argv[2]
    steps = int(sys.argv[3]) if len(sys.argv) > 3 else 30
    n = int(sys.argv[4]) if len(sys.argv) > 4 else 1
    torch.set_num_threads(1)
    r = next(r for r in plan(load_sweep(sweep)) if r.run_id == run_id)
    gpu = "cuda" if torch.cuda.is_available() else "cpu"  # without a GPU the script checks itself on the CPU
    print(
        f"{run_id}: torch {torch.__version__}, {torch.cuda.get_device_name() if gpu == 'cuda' else 'no GPU'}",
        flush=True,
    )
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, device, backend in (
            ("cuda auto", gpu, "auto"),
            ("cuda reference", gpu, "reference"),
            ("cpu", "cpu", "auto"),
        ):
            rows[name], ms = run(
                r.config, device, backend, steps if name != "cpu" else 8, Path(tmp) / name.replace(" ", "_")
            )
            print(
                f"{name:15s} {ms:8.1f} ms/step  losses {' '.join(f'{x:.4f}' for x in rows[name][:6])} .. "
                f"{rows[name][-1]:.4f}",
                flush=True,
            )
        if n > 1:
            print(
                f"{n} at once: {concurrent(r.config, gpu, n, 5 * steps, Path(tmp)):.1f} steps/s in all "
                "(process start included)",
                flush=True,
            )
    ok = all(
        abs(a - b) < 2e-3
        for other in ("cuda reference", "cpu")
        for a, b in zip(rows["cuda auto"][:3], rows[other][:3], strict=True)
    )
    print("engines agree on the first steps" if ok else "ENGINES DISAGREE", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
