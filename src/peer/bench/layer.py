"""``peer bench layer``: forward and forward+backward of one layer, implementations side by side.

For every N = n^2 of ``--experts``, in one process: the implementations are built once (the PEER
variants and peer-pytorch share the same u, v tables), warmed up once, then timed in
``--rounds`` interleaved rounds (the order rotates every round); we report medians, tokens/s, the
peak resident memory above the resident memory before the call, and ratios against peer-pytorch
and the dense FFW. Implementations:

    dense         DenseFFN d -> 4d -> d (GELU): more FLOPs per token than this PEER layer
    pkm           PKM (Lample et al.), N memories, h=8, k=32, key_dim=256 (the paper's baseline)
    reference     PEER with the plain-PyTorch index and the gather/einsum expert mix
    fused         PEER with the fused kernels (C++ on CPU, Triton on CUDA); dense [N, d] table gradients
    fused-sparse  PEER with the fused kernels; sparse row gradients (for SparseRowAdamW)
    peer-pytorch  PyPI ``peer-pytorch`` (the ``bench`` extra), non_competing_scores=False (paper),
                  its dim_key = key_dim (its sub-keys are key_dim wide); fp32 tables only

``--table-dtype bfloat16`` stores the PEER tables in bf16 (fp32 arithmetic).
"""

from __future__ import annotations

import functools
import gc

import torch

from peer.layers import PEER

from ..errors import UsageError
from .common import fmt_bytes, machine_info, measure, median

__all__ = ["IMPLS", "bench_layer", "print_layer", "check_targets"]

IMPLS = ("dense", "pkm", "reference", "fused", "fused-sparse", "peer-pytorch")


def _peer_pytorch(layer: PEER, device="cpu"):
    """peer-pytorch's PEER sharing ``layer``'s tables (no second copy of 2 x N x d floats); None if not installed."""
    try:
        from PEER_pytorch import PEER as PP
    except ImportError:
        return None
    with torch.device("meta"):
        pp = PP(
            dim=layer.dim,
            heads=layer.heads,
            num_experts=layer.num_experts,
            num_experts_per_head=layer.topk,
            dim_key=layer.key_dim,
            non_competing_scores=False,
        )
    pp.to_empty(device=device)  # untouched empty tables: no memory until written
    pp.weight_down_embed.weight = layer.u  # its "down" (input) projection is our u, "up" our v
    pp.weight_up_embed.weight = layer.v
    with torch.no_grad():
        pp.keys.normal_(0, 0.02)
        pp.to_queries[0].reset_parameters()
    return pp.train()


class _Runner:
    """One implementation: a module plus what to switch on before running it."""

    def __init__(self, name, module, setup=None):
        self.name, self.module, self.setup = name, module, setup or (lambda: None)

    def fwd(self, x):
        self.setup()
        with torch.no_grad():
            self.module(x)

    def fwd_bwd(self, x, dy):
        self.setup()
        xg = x.detach().requires_grad_()
        self.module(xg).backward(dy)
        for p in self.module.parameters():
            p.grad = None


def _peer_setup(layer: PEER, backend: str, sparse: bool, reference_index: bool):
    def setup():
        layer.backend = backend
        layer.sparse_grad = sparse
        if reference_index:
            layer.index.topk = lambda q, k, backend="auto": layer.index.topk_reference(q, k)
        else:
            layer.index.__dict__.pop("topk", None)

    return setup


def build_runners(
    impls, n: int, dim: int, heads: int, topk: int, key_dim: int, table_dtype: str = "float32", device: str = "cpu"
) -> dict[str, _Runner]:
    """The requested implementations at N = n^2 (missing optional ones are skipped)."""
    runners: dict[str, _Runner] = {}
    fast = "triton" if str(device).startswith("cuda") else "fused"  # the fused kernels of the device
    layer = None
    if any(i in impls for i in ("reference", "fused", "fused-sparse", "peer-pytorch")):
        layer = PEER(dim, n * n, heads, topk, key_dim, table_dtype=table_dtype).to(device).train()
    for name in impls:
        if name == "dense":
            from peer.layers.dense import DenseFFN

            runners[name] = _Runner(name, DenseFFN(dim, 4 * dim, activation="gelu").to(device))
        elif name == "pkm":
            from peer.layers.pkm import PKM

            runners[name] = _Runner(name, PKM(dim, n * n, heads=8, topk=min(32, n), key_dim=256).to(device).train())
        elif name == "reference":
            runners[name] = _Runner(name, layer, _peer_setup(layer, "reference", False, True))
        elif name == "fused":
            runners[name] = _Runner(name, layer, _peer_setup(layer, fast, False, False))
        elif name == "fused-sparse":
            runners[name] = _Runner(name, layer, _peer_setup(layer, fast, True, False))
        elif name == "peer-pytorch":
            if table_dtype != "float32":  # it cannot share bf16 tables; compare against fp32 runs
                continue
            pp = _peer_pytorch(layer, device)
            if pp is not None:
                runners[name] = _Runner(name, pp)
        else:
            raise UsageError(f"--impls: unknown implementation {name!r}; choose from {', '.join(IMPLS)}")
    return runners


def bench_layer(
    experts,
    impls=IMPLS,
    tokens=4096,
    dim=512,
    heads=8,
    topk=16,
    key_dim=128,
    rounds=5,
    modes=("fwd", "fwd+bwd"),
    table_dtype="float32",
    device="cpu",
    log=print,
) -> dict:
    """Run the layer benchmark; returns {"machine", "config", "results": [row per (n, impl)]}."""
    seq = min(512, tokens)
    if tokens % seq:
        raise UsageError(f"--tokens must be a multiple of {seq}, got {tokens}")
    results = []
    for n in experts:
        torch.manual_seed(0)
        log(f"N = {n}^2 = {n * n:,}: building {', '.join(impls)}")
        runners = build_runners(impls, n, dim, heads, min(topk, n), key_dim, table_dtype, device)
        x = torch.randn(tokens // seq, seq, dim, device=device)
        dy = torch.randn_like(x)
        times = {(r, m): [] for r in runners for m in modes}
        mems = {(r, m): [] for r in runners for m in modes}
        for r in runners.values():  # warm-up: page in tables, fill the gradient workspaces
            r.fwd_bwd(x, dy)
        names = list(runners)
        for rnd in range(rounds):
            for name in names[rnd % len(names) :] + names[: rnd % len(names)]:
                r = runners[name]
                for m in modes:
                    work = functools.partial(r.fwd, x) if m == "fwd" else functools.partial(r.fwd_bwd, x, dy)
                    dt, mem = measure(work, device)
                    times[(name, m)].append(dt)
                    mems[(name, m)].append(mem)
            log(f"  round {rnd + 1}/{rounds}: " + ", ".join(f"{nm} {times[(nm, modes[-1])][-1]:.3f}s" for nm in names))
        for name in names:
            row = {"n": n, "num_experts": n * n, "impl": name, "tokens": tokens}
            for m in modes:
                t = median(times[(name, m)])
                row[m] = {
                    "seconds": t,
                    "tokens_per_s": tokens / t,
                    "all_seconds": times[(name, m)],
                    "peak_rss_above_bytes": max(mems[(name, m)]),
                }
            results.append(row)
        del runners, x, dy
        gc.collect()
    info = machine_info()
    if str(device).startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(device)
    return {
        "machine": info,
        "results": results,
        "config": {
            "device": str(device),
            "tokens": tokens,
            "dim": dim,
            "heads": heads,
            "topk": topk,
            "key_dim": key_dim,
            "rounds": rounds,
            "experts": list(experts),
            "impls": list(impls),
            "table_dtype": table_dtype,
        },
    }


def _get(res, n, impl, mode):
    for r in res["results"]:
        if r["n"] == n and r["impl"] == impl and mode in r:
            return r[mode]["seconds"]
    return None


def print_layer(res: dict, out=print) -> None:
    modes = [m for m in ("fwd", "fwd+bwd") if any(m in r for r in res["results"])]
    out(
        f"{'N':>9} {'impl':<13}"
        + "".join(f" {m + ' s':>10} {'tok/s':>9} {'mem':>10}" for m in modes)
        + f" {'x peer-pytorch':>15} {'x dense':>8}"
    )
    for r in res["results"]:
        n = r["n"]
        line = f"{str(n) + '^2':>9} {r['impl']:<13}"
        for m in modes:
            line += (
                f" {r[m]['seconds']:>10.3f} {r[m]['tokens_per_s']:>9.0f} {fmt_bytes(r[m]['peak_rss_above_bytes']):>10}"
            )
        m = modes[-1]
        pp, dense = _get(res, n, "peer-pytorch", m), _get(res, n, "dense", m)
        line += f" {pp / r[m]['seconds']:>14.2f}x" if pp else f" {'-':>15}"
        line += f" {r[m]['seconds'] / dense:>7.2f}x" if dense else f" {'-':>8}"
        out(line)


def check_targets(res: dict, impl: str = "fused-sparse") -> list[tuple[str, float, str, bool]]:
    """The issue's layer targets that this run can decide: (what, value, target, met)."""
    out = []
    fb, fw = "fwd+bwd", "fwd"
    t = _get(res, 1024, impl, fb)
    pp, dense = _get(res, 1024, "peer-pytorch", fb), _get(res, 1024, "dense", fb)
    if t and pp:
        out.append((f"{impl} fwd+bwd speed-up vs peer-pytorch at 1024^2", pp / t, ">= 8", pp / t >= 8))
    if t and dense:
        out.append((f"{impl} fwd+bwd time / dense FFW at 1024^2", t / dense, "<= 3", t / dense <= 3))
    t1, pp1 = _get(res, 1024, impl, fw), _get(res, 1024, "peer-pytorch", fw)
    if t1 and pp1:
        out.append((f"{impl} fwd speed-up vs peer-pytorch at 1024^2", pp1 / t1, ">= 3", pp1 / t1 >= 3))
    t128 = _get(res, 128, impl, fb)
    if t and t128:
        out.append((f"{impl} fwd+bwd throughput 1024^2 / 128^2", t128 / t, ">= 0.7", t128 / t >= 0.7))
    return out


def plot_layer(res: dict, path) -> None:
    """tokens/s (forward+backward) vs N, log-log, one line per implementation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for impl in dict.fromkeys(r["impl"] for r in res["results"]):
        rows = sorted(
            (r["num_experts"], r["fwd+bwd"]["tokens_per_s"])
            for r in res["results"]
            if r["impl"] == impl and "fwd+bwd" in r
        )
        if rows:
            ax.plot([a for a, _ in rows], [b for _, b in rows], marker="o", label=impl)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("experts N")
    ax.set_ylabel("tokens/s (forward + backward)")
    c = res["config"]
    ax.set_title(f"PEER layer d={c['dim']} h={c['heads']} k={c['topk']}, {c['tokens']} tokens", fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    _save_fig(fig, path)


def _save_fig(fig, path) -> None:
    import os
    from pathlib import Path

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.stem + ".tmp" + path.suffix)
    fig.savefig(tmp, dpi=120)
    os.replace(tmp, path)
    import matplotlib.pyplot as plt

    plt.close(fig)
