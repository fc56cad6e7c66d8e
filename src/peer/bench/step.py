"""``peer bench step``: the main job's training step, dense vs PEER side by side in one process.

Builds each preset's model and optimizer (``configs/dense.toml``, ``configs/peer.toml``, ...: the
model, ``optim`` groups and batch of the main job), then times full steps (forward, backward,
clipping, optimizer) in interleaved rounds, so a noisy machine slows every side alike. Reported
per side: median step seconds, training FLOPs per step (:func:`peer.train_flops_per_step`), time
per TFLOP, and both ratios to the first side. ``--compile`` adds each side under
``torch.compile(fullgraph=True)`` (the custom ops make PEER one graph).
"""

from __future__ import annotations

import time

import torch

from .common import median

__all__ = ["bench_step", "print_step"]


def _side(preset: str, compiled: bool, vocab_size: int):
    from peer.config import find_preset, load_config
    from peer.flops import train_flops_per_step
    from peer.model import PeerLM
    from peer.train.optim import build_optimizer

    path = preset if preset.endswith(".toml") else f"{preset}.toml"
    cfg = load_config(find_preset(path), [f"model.vocab_size={vocab_size}"] if vocab_size else [])
    torch.manual_seed(0)
    model = PeerLM(cfg.model).train()
    opt = build_optimizer(model, cfg.optim)
    fwd = torch.compile(model, fullgraph=True) if compiled else model
    gen = torch.Generator().manual_seed(0)
    b, t = cfg.train.batch_size, cfg.train.seq_len
    batches = [torch.randint(0, cfg.model.vocab_size, (b, t + 1), generator=gen) for _ in range(4)]
    params = [p for p in model.parameters() if p.requires_grad]
    state = {"i": 0}

    def step() -> float:
        idx = batches[state["i"] % len(batches)]
        state["i"] += 1
        loss = fwd(idx[:, :-1], idx[:, 1:]).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.optim.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    name = preset + (" (compiled)" if compiled else "")
    return dict(
        name=name,
        preset=preset,
        compiled=compiled,
        flops_per_step=train_flops_per_step(cfg),
        tokens_per_step=b * t,
        step=step,
    )


def bench_step(
    presets: list[str], rounds: int = 10, warmup: int = 2, compile_too: bool = False, vocab_size: int = 8192
) -> dict:
    sides = [_side(p, c, vocab_size) for c in ([False, True] if compile_too else [False]) for p in presets]
    compile_s = {}
    for s in sides:
        t0 = time.perf_counter()
        for _ in range(warmup):  # first steps: allocation, kernel build, compilation
            s["step"]()
        compile_s[s["name"]] = time.perf_counter() - t0
    times = {s["name"]: [] for s in sides}
    for _ in range(rounds):
        for s in sides:
            t0 = time.perf_counter()
            s["step"]()
            times[s["name"]].append(time.perf_counter() - t0)
    base = sides[0]
    base_t = median(times[base["name"]])
    results = []
    for s in sides:
        t = median(times[s["name"]])
        per_tflop = t / (s["flops_per_step"] / 1e12)
        results.append(
            dict(
                name=s["name"],
                preset=s["preset"],
                compiled=s["compiled"],
                step_s=t,
                flops_per_step=s["flops_per_step"],
                tokens_per_step=s["tokens_per_step"],
                s_per_tflop=per_tflop,
                step_ratio=t / base_t,
                per_flop_ratio=per_tflop / (base_t / (base["flops_per_step"] / 1e12)),
                warmup_s=compile_s[s["name"]],
                times=times[s["name"]],
            )
        )
    return {
        "config": dict(presets=presets, rounds=rounds, warmup=warmup, threads=torch.get_num_threads()),
        "results": results,
    }


def print_step(res: dict) -> None:
    cfg = res["config"]
    print(f"training steps, {cfg['rounds']} interleaved rounds, {cfg['threads']} threads (medians)")
    print(
        f"{'side':<28} {'step s':>8} {'GFLOP/step':>11} {'s/TFLOP':>8} {'step x':>7} {'per-FLOP x':>10} "
        f"{'warm-up s':>9}"
    )
    for r in res["results"]:
        print(
            f"{r['name']:<28} {r['step_s']:>8.3f} {r['flops_per_step'] / 1e9:>11.2f} {r['s_per_tflop']:>8.1f} "
            f"{r['step_ratio']:>7.2f} {r['per_flop_ratio']:>10.2f} {r['warmup_s']:>9.1f}"
        )
