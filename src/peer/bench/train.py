"""``peer bench train``: full training steps (forward, backward, optimizer) vs N, tokens/s and peak RSS.

Every (implementation, N) runs in its own fresh process, so its peak resident memory (VmHWM)
covers everything the step needs: tables, gradients, optimizer state and transients. Before a
run starts, its memory is estimated and the run is skipped (not attempted) when it would not fit
in the memory available now; ``--force`` overrides. Implementations (``--impls``):

    dense-adamw          DenseFFN d -> 4d -> d, torch AdamW(fused=True)
    fused-adamw          PEER (fused kernels, dense table grads), torch AdamW(fused=True)
    fused-sparse         PEER (fused, sparse row grads), SparseRowAdamW (fp32 moments) on u, v
    fused-sparse-lite    as fused-sparse, moments in bf16 and one second moment per row
    reference-adamw      PEER (plain PyTorch index and expert mix), torch AdamW(fused=True)
    peer-pytorch-adamw   PyPI peer-pytorch, torch AdamW(fused=True)
    lm-fused-adamw       a small PeerLM (4 blocks, d=256, PEER in the middle block), AdamW
    lm-fused-sparse      the same LM with optim.sparse_experts (peer.train.optim.build_optimizer)
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

import torch

from ..errors import UsageError
from .common import fmt_bytes, machine_info, median, peak_rss_bytes, rss_bytes

__all__ = ["IMPLS", "bench_train", "print_train", "plot_train", "estimate_bytes"]

IMPLS = (
    "dense-adamw",
    "fused-adamw",
    "fused-sparse",
    "fused-sparse-lite",
    "reference-adamw",
    "peer-pytorch-adamw",
    "lm-fused-adamw",
    "lm-fused-sparse",
)
LM_DIM, LM_SEQ = 256, 256


def estimate_bytes(impl: str, n: int, dim: int, table_dtype: str = "float32", tokens: int = 4096) -> int:
    """A rough upper estimate of a run's peak memory (to skip what cannot fit)."""
    d = LM_DIM if impl.startswith("lm-") else dim
    N, item = n * n, (2 if table_dtype == "bfloat16" else 4)
    if impl == "dense-adamw":
        return 1 << 30
    tables = 2 * N * d * item
    rows = min(N, tokens * 128)  # distinct rows retrieved in a step, at most
    if impl in ("fused-sparse", "lm-fused-sparse"):
        extra = 2 * tables + 2 * rows * d * 4 * 1.1  # fp32 moments + compact gradient rows
    elif impl == "fused-sparse-lite":
        extra = 2 * N * d * 2 + 2 * N * 4 + 2 * rows * d * 4 * 1.1  # bf16 first moment, row-wise second
    else:  # dense gradients + AdamW moments (+ gathered [T, h*k, d] tensors for the gather-based ones)
        extra = 3 * tables
        if impl in ("reference-adamw", "peer-pytorch-adamw"):
            extra += 4 * tokens_default_transient(d, tokens)
    return int(tables + extra) + (1 << 30)


def tokens_default_transient(dim: int, tokens: int = 4096, m: int = 128) -> int:
    """Bytes of one gathered [tokens, h*k, d] fp32 tensor (what gather-based implementations build)."""
    return tokens * m * dim * 4


def _mem_available() -> int:
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 1 << 62


# ------------------------------------------------------------------------------ one run (child process)
def _build(spec: dict):
    """(module, optimizer, batch function) for one run."""
    impl, n, dim, tokens = spec["impl"], spec["n"], spec["dim"], spec["tokens"]
    torch.manual_seed(0)
    if impl.startswith("lm-"):
        from peer.config import ModelConfig, OptimConfig, PEERConfig
        from peer.model import PeerLM
        from peer.train.optim import build_optimizer

        cfg = ModelConfig(
            d_model=LM_DIM,
            n_layers=4,
            n_heads=4,
            max_seq_len=LM_SEQ,
            sparse_layer="peer",
            peer=PEERConfig(num_experts=n * n, table_dtype=spec["table_dtype"]),
        )
        model = PeerLM(cfg).train()
        opt = build_optimizer(model, OptimConfig(sparse_experts=impl == "lm-fused-sparse", weight_decay=0.0))
        idx = torch.randint(0, cfg.vocab_size, (tokens // LM_SEQ, LM_SEQ + 1))
        return model, opt, lambda: model(idx[:, :-1], targets=idx[:, 1:]).loss
    x = torch.randn(tokens // 512, 512, dim)
    target = torch.randn_like(x)
    if impl == "dense-adamw":
        from peer.layers.dense import DenseFFN

        model = DenseFFN(dim, 4 * dim, activation="gelu")
    elif impl == "peer-pytorch-adamw":
        from PEER_pytorch import PEER as PP

        model = PP(
            dim=dim, heads=8, num_experts=n * n, num_experts_per_head=16, dim_key=128, non_competing_scores=False
        ).train()
    else:
        from peer.layers import PEER

        model = PEER(
            dim,
            n * n,
            8,
            min(16, n),
            128,
            backend="reference" if impl == "reference-adamw" else "fused",
            table_dtype=spec["table_dtype"],
        ).train()
    loss_fn = lambda: torch.nn.functional.mse_loss(model(x), target)  # noqa: E731
    if impl in ("fused-sparse", "fused-sparse-lite"):
        from peer.train.optim import MultiOptimizer
        from peer.train.sparse_optim import SparseRowAdamW

        tables = [model.u, model.v]
        rest = [p for p in model.parameters() if all(p is not t for t in tables)]
        lite = impl == "fused-sparse-lite"
        opt = MultiOptimizer(
            [
                torch.optim.AdamW(rest, lr=1e-3, fused=True),
                SparseRowAdamW(tables, lr=1e-3, state_dtype="bfloat16" if lite else None, rowwise=lite),
            ]
        )
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    return model, opt, loss_fn


def run_one(spec: dict) -> dict:
    """Build, take one warm-up step and ``steps`` timed steps; report time and memory."""
    t0 = time.perf_counter()
    model, opt, loss_fn = _build(spec)
    build_s = time.perf_counter() - t0
    rss_model = rss_bytes()
    times = []
    for i in range(spec["steps"] + 1):
        t = time.perf_counter()
        loss = loss_fn()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i:
            times.append(time.perf_counter() - t)
    state = 0
    for o in getattr(opt, "optimizers", [opt]):
        for st in o.state.values():
            state += sum(v.nbytes for v in st.values() if isinstance(v, torch.Tensor))
    params = sum(p.nbytes for p in model.parameters())
    t = median(times)
    return {
        **spec,
        "seconds": t,
        "all_seconds": times,
        "tokens_per_s": spec["tokens"] / t,
        "build_s": build_s,
        "rss_after_build_bytes": rss_model,
        "peak_rss_bytes": peak_rss_bytes(),
        "param_bytes": params,
        "optimizer_state_bytes": state,
        "loss": float(loss),
    }


# ------------------------------------------------------------------------------ driver
def bench_train(
    experts,
    impls=("fused-adamw", "fused-sparse", "fused-sparse-lite", "peer-pytorch-adamw"),
    tokens=4096,
    dim=512,
    steps=3,
    table_dtype="float32",
    force=False,
    log=print,
) -> dict:
    results = []
    for n in experts:
        for impl in impls:
            if impl not in IMPLS:
                raise UsageError(f"--impls: unknown implementation {impl!r}; choose from {', '.join(IMPLS)}")
            if impl == "peer-pytorch-adamw" and not _importable("PEER_pytorch"):
                log(f"  {impl}: peer-pytorch is not installed (pip install peer-experts[bench]); skipped")
                continue
            est, avail = estimate_bytes(impl, n, dim, table_dtype, tokens), _mem_available()
            spec = {
                "impl": impl,
                "n": n,
                "dim": LM_DIM if impl.startswith("lm-") else dim,
                "tokens": tokens,
                "steps": steps,
                "table_dtype": table_dtype,
            }
            if est > avail - (2 << 30) and not force:
                log(f"  {impl} at {n}^2: needs ~{fmt_bytes(est)}, {fmt_bytes(avail)} available now; skipped")
                results.append({**spec, "skipped": f"estimated {est} bytes > available {avail}"})
                continue
            log(f"  {impl} at {n}^2 (estimated peak {fmt_bytes(est)}) ...")
            proc = subprocess.run(
                [sys.executable, "-m", "peer.bench.train", "--child", json.dumps(spec)], capture_output=True, text=True
            )
            lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
            if proc.returncode != 0 or not lines:
                log(f"    failed (exit {proc.returncode}): {proc.stderr.strip()[-800:]}")
                results.append({**spec, "error": proc.stderr.strip()[-2000:], "returncode": proc.returncode})
                continue
            row = json.loads(lines[-1])
            log(
                f"    {row['seconds']:.3f} s/step, {row['tokens_per_s']:.0f} tok/s, peak RSS {fmt_bytes(row['peak_rss_bytes'])}"
            )
            results.append(row)
    return {
        "machine": machine_info(),
        "results": results,
        "config": {
            "tokens": tokens,
            "dim": dim,
            "steps": steps,
            "experts": list(experts),
            "impls": list(impls),
            "table_dtype": table_dtype,
        },
    }


def _importable(module: str) -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def print_train(res: dict, out=print) -> None:
    out(f"{'N':>9} {'impl':<20} {'s/step':>8} {'tok/s':>8} {'peak RSS':>11} {'params':>11} {'optim state':>12}")
    for r in res["results"]:
        head = f"{str(r['n']) + '^2':>9} {r['impl']:<20}"
        if "seconds" not in r:
            out(head + "  " + ("skipped: " + r["skipped"] if "skipped" in r else "failed"))
            continue
        out(
            head + f" {r['seconds']:>8.3f} {r['tokens_per_s']:>8.0f} {fmt_bytes(r['peak_rss_bytes']):>11}"
            f" {fmt_bytes(r['param_bytes']):>11} {fmt_bytes(r['optimizer_state_bytes']):>12}"
        )


def plot_train(results: list[dict], path) -> None:
    """tokens/s and peak RSS vs N (log scales), one line per implementation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .layer import _save_fig

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
    ok = [r for r in results if "seconds" in r]
    for impl, dim in dict.fromkeys((r["impl"], r["dim"]) for r in ok):  # one line per implementation and width
        rows = sorted(
            (r["n"] ** 2, r["tokens_per_s"], r["peak_rss_bytes"] / 2**30)
            for r in ok
            if r["impl"] == impl and r["dim"] == dim
        )
        label = f"{impl} (d={dim})"
        a1.plot([a for a, _, _ in rows], [b for _, b, _ in rows], marker="o", label=label)
        a2.plot([a for a, _, _ in rows], [c for _, _, c in rows], marker="o", label=label)
    for ax, yl in ((a1, "tokens/s (full training step)"), (a2, "peak RSS (GiB)")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("experts N")
        ax.set_ylabel(yl)
        ax.grid(True, which="both", alpha=0.3)
    a1.legend(fontsize=7)
    fig.tight_layout()
    _save_fig(fig, path)


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--child", required=True)
    print(json.dumps(run_one(json.loads(p.parse_args().child))))
