"""``peer bench gpu``: what only a GPU can show, in one command (built to finish within 8 minutes on an H100).

Three parts, each printed as it finishes and all saved to one JSON file (``--out``):

(a) **ops**: the Triton expert mix against the reference at small shapes: ``torch.library.opcheck``
    of the forward and both backward ops, and values and every gradient against
    :func:`peer.ops.reference_expert_mix` (fp32 and bf16 tables, GELU and GLU, dense and sparse
    table gradients).
(b) **layer**: the PEER layer at the paper's shape (N = 1024^2, h = 8, k = 16, key_dim 128) for
    each width of ``--dims`` (1024, 2048), ``--tokens`` tokens (16k), fp32 and bf16 tables:
    forward and forward+backward time (CUDA events, median of ``--rounds``), beside peer-pytorch
    (when installed; fp32 tables only), a dense FFW d -> 4d -> d and the PKM layer (N memories,
    h = 8, k = 32, key_dim 256). PEER's forward is also given as the bandwidth it achieves on the
    expert rows it reads, ``2 (tables u, v) x T x h x k x d x bytes``, against the device's HBM
    bandwidth (its datasheet figure where the device is known, and a measured copy).
(c) **step**: a PeerLM training step (d = 512, 8 blocks, PEER 512^2 in the middle block, 32 x 512
    tokens) against the dense LM, through the training loop's own step function
    (:class:`peer.train.parts.Stepper`: forward, backward, clipping, AdamW): tokens/s, peak memory,
    and the number of host syncs per step counted by ``torch.cuda.set_sync_debug_mode``; eager
    and, unless ``--no-compile``, under ``torch.compile(fullgraph=True)``.

Every implementation runs alone (built, warmed up, timed, freed), so the largest shapes fit in
one 80 GB device. Out of memory is recorded as such, not fatal.

On the CPU with ``TRITON_INTERPRET=1`` and tiny shapes (``--tiny``) the same code runs through the
Triton interpreter: that is how the tests check it, so that on a GPU it only has to be run.
"""

from __future__ import annotations

import contextlib
import gc
import statistics
import time
import warnings

import torch

from .common import machine_info

__all__ = ["bench_gpu", "print_gpu", "HBM_GBPS", "TINY"]

# datasheet HBM bandwidth, GB/s (10^9 bytes), by a substring of torch.cuda.get_device_name()
HBM_GBPS = {
    "H200": 4800,
    "H100 SXM": 3350,
    "H100 80GB HBM3": 3350,
    "H100 NVL": 3900,
    "H100 PCIe": 2000,
    "H100": 3350,
    "A100-SXM4-80GB": 2039,
    "A100 80GB PCIe": 1935,
    "A100": 1555,
    "L40S": 864,
    "L4": 300,
    "A10G": 600,
    "RTX 4090": 1008,
    "B200": 8000,
}

# the full run's shapes, and the tiny ones the tests run under the Triton interpreter
FULL = dict(
    dims=(1024, 2048),
    n=1024,
    heads=8,
    topk=16,
    key_dim=128,
    tokens=16384,
    rounds=10,
    lm=dict(d_model=512, n_layers=8, n_heads=8, n=512, batch=32, seq=512, vocab=32768, steps=10),
)
TINY = dict(
    dims=(32,),
    n=8,
    heads=2,
    topk=4,
    key_dim=8,
    tokens=64,
    rounds=2,
    lm=dict(d_model=32, n_layers=2, n_heads=2, n=8, batch=2, seq=16, vocab=64, steps=2),
)


# ------------------------------------------------------------------------------ timing
class _Clock:
    """Wall time of a call: CUDA events on a GPU (no host wait inside the timed region), else perf_counter."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def time(self, fn, rounds: int, warmup: int = 2) -> float:
        """Median seconds of ``fn()`` over ``rounds`` calls after ``warmup`` calls."""
        for _ in range(warmup):
            fn()
        self.sync()
        times = []
        for _ in range(rounds):
            if self.cuda:
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                fn()
                b.record()
                b.synchronize()
                times.append(a.elapsed_time(b) / 1e3)
            else:
                t0 = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t0)
        return statistics.median(times)

    def reset_peak(self) -> None:
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()

    def peak(self) -> int | None:
        return torch.cuda.max_memory_allocated() if self.cuda else None


def _free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


@contextlib.contextmanager
def _oom_as_record(row: dict):
    """Out of device memory: note it in ``row`` and go on."""
    try:
        yield
    except torch.OutOfMemoryError as e:
        row["error"] = "out of memory: " + str(e).splitlines()[0][:200]
        _free()


def hbm_datasheet_gbps(name: str) -> float | None:
    """The datasheet HBM bandwidth of a device name (longest matching key), or None."""
    keys = [k for k in HBM_GBPS if k in name]
    return float(HBM_GBPS[max(keys, key=len)]) if keys else None


def measured_copy_gbps(device: torch.device, clock: _Clock, nbytes: int) -> float:
    """Read+write bandwidth of a device-to-device copy of ``nbytes`` (GB/s, bytes read + written)."""
    src = torch.empty(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    return 2 * nbytes / clock.time(lambda: dst.copy_(src), rounds=10) / 1e9


# ------------------------------------------------------------------------------ (a) ops
def check_ops(device: torch.device, backend: str = "triton") -> list[dict]:
    """opcheck and the reference comparison of the Triton expert mix; one row per case."""
    from torch.library import opcheck

    from peer.ops import expert_mix, reference_expert_mix

    rows = []
    T, N, m, d = 9, 23, 6, 40
    for table_dtype in (torch.float32, torch.bfloat16):
        for glu in (False, True):
            for sparse in (False, True):
                torch.manual_seed(0)
                row = {"table_dtype": str(table_dtype).removeprefix("torch."), "glu": glu, "sparse_grad": sparse}
                x = torch.randn(T, d, device=device, requires_grad=True)
                g = torch.randn(T, m, device=device).softmax(-1).requires_grad_()
                idx = torch.randint(0, N, (T, m), device=device)
                idx[:, 1] = idx[:, 0]  # a repeated expert: its gradient rows add up
                tabs = [
                    (torch.randn(N, d, device=device) / d**0.5).to(table_dtype).requires_grad_()
                    for _ in range(3 if glu else 2)
                ]
                u, v, gate = tabs[0], tabs[1], (tabs[2] if glu else None)
                try:
                    if table_dtype == torch.float32:
                        opcheck(
                            torch.ops.peer.expert_mix.default,
                            (x, g, idx, u, v, gate, "gelu", backend, sparse),
                            test_utils=("test_schema", "test_autograd_registration", "test_faketensor"),
                        )
                    y = expert_mix(x, u, v, idx, g, "gelu", gate, backend=backend, sparse_grad=sparse)
                    dy = torch.randn_like(y)
                    grads = torch.autograd.grad(y, [x, g, *tabs], dy)
                    ref_tabs = [t.detach().float().requires_grad_() for t in tabs]
                    xr, gr = x.detach().requires_grad_(), g.detach().requires_grad_()
                    yr = reference_expert_mix(
                        xr, ref_tabs[0], ref_tabs[1], idx, gr, "gelu", ref_tabs[2] if glu else None
                    )
                    rgrads = torch.autograd.grad(yr, [xr, gr, *ref_tabs], dy)
                    err = [
                        (a.to_dense() if a.is_sparse else a).float().sub(b).abs().max().item()
                        / max(b.abs().max().item(), 1e-6)
                        for a, b in zip((y, *grads), (yr, *rgrads), strict=True)
                    ]
                    row["max_rel_err"] = max(err)
                    tol = 2e-2 if table_dtype == torch.bfloat16 else 1e-4  # bf16: the gradients are rounded to bf16
                    row["ok"] = row["max_rel_err"] <= tol
                except Exception as e:
                    row["ok"], row["error"] = False, f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
                rows.append(row)
    return rows


# ------------------------------------------------------------------------------ (b) layer
def _layer_impls(
    name: str,
    dim: int,
    n: int,
    heads: int,
    topk: int,
    key_dim: int,
    table_dtype: str,
    device: torch.device,
    backend: str,
):
    """Build one implementation on the device (None: peer-pytorch is not installed)."""
    from peer.layers import PEER
    from peer.layers.dense import DenseFFN
    from peer.layers.pkm import PKM

    if name == "dense":
        return DenseFFN(dim, 4 * dim, activation="gelu").to(device)
    if name == "pkm":
        return PKM(
            dim, n * n, heads=8, topk=min(32, n), key_dim=256 if dim >= 256 else 2 * key_dim, device=device
        ).train()
    layer = PEER(dim, n * n, heads, topk, key_dim, table_dtype=table_dtype, backend=backend, device=device).train()
    if name == "peer":
        return layer
    from .layer import _peer_pytorch  # peer-pytorch sharing the layer's tables

    return _peer_pytorch(layer, device)


def bench_layers(
    device: torch.device, clock: _Clock, shapes: dict, backend: str, hbm_gbps: float | None, log=print
) -> list[dict]:
    rows = []
    T, n, h, k, kd = shapes["tokens"], shapes["n"], shapes["heads"], shapes["topk"], shapes["key_dim"]
    for dim in shapes["dims"]:
        for table_dtype in ("float32", "bfloat16"):
            # dense and PKM keep fp32 weights: measured once per width; peer-pytorch shares fp32 tables only
            for name in ("peer", "dense", "pkm", "peer-pytorch") if table_dtype == "float32" else ("peer",):
                row = {
                    "impl": name,
                    "dim": dim,
                    "table_dtype": table_dtype,
                    "tokens": T,
                    "num_experts": n * n,
                    "heads": h,
                    "topk": k,
                }
                with _oom_as_record(row):
                    torch.manual_seed(0)
                    module = _layer_impls(name, dim, n, h, k, kd, table_dtype, device, backend)
                    if module is None:
                        row["error"] = "not installed (pip install peer-pytorch)"
                    else:
                        x = torch.randn(T, dim, device=device)
                        dy = torch.randn_like(x)

                        def fwd(module=module, x=x):
                            with torch.no_grad():
                                module(x)

                        def fwd_bwd(module=module, x=x, dy=dy):
                            xg = x.detach().requires_grad_()
                            module(xg).backward(dy)
                            for p in module.parameters():
                                p.grad = None

                        row["fwd_s"] = clock.time(fwd, shapes["rounds"])
                        clock.reset_peak()
                        row["fwd_bwd_s"] = clock.time(fwd_bwd, shapes["rounds"])
                        row["peak_bytes"] = clock.peak()
                        if name == "peer":
                            elt = torch.finfo(getattr(torch, table_dtype)).bits // 8
                            rows_bytes = 2 * T * h * k * dim * elt  # u and v rows read by the forward
                            row["fwd_rows_gbps"] = rows_bytes / row["fwd_s"] / 1e9
                            if hbm_gbps:
                                row["fwd_hbm_fraction"] = row["fwd_rows_gbps"] / hbm_gbps
                    module = x = dy = None
                _free()
                rows.append(row)
                log(_layer_line(row))
    return rows


def _layer_line(r: dict) -> str:
    head = f"  {r['impl']:<13} d={r['dim']:<5} {r['table_dtype']:<9}"
    if "error" in r:
        return head + " " + r["error"]
    line = head + f" fwd {r['fwd_s'] * 1e3:8.2f} ms  fwd+bwd {r['fwd_bwd_s'] * 1e3:8.2f} ms"
    if "fwd_rows_gbps" in r:
        line += f"  rows {r['fwd_rows_gbps']:7.0f} GB/s"
        if "fwd_hbm_fraction" in r:
            line += f" ({100 * r['fwd_hbm_fraction']:.0f} % of HBM)"
    return line


def layer_ratios(rows: list[dict]) -> list[dict]:
    """PEER against the others at each (dim, table dtype): PEER's time over theirs, forward and forward+backward."""
    out = []
    for r in rows:
        if r["impl"] != "peer" or "error" in r:
            continue
        for other in ("peer-pytorch", "dense", "pkm"):
            o = next(
                (
                    x
                    for x in rows
                    if x["impl"] == other
                    and x["dim"] == r["dim"]
                    and "error" not in x
                    and (other != "peer-pytorch" or x["table_dtype"] == r["table_dtype"])
                ),
                None,
            )
            if o is not None:
                out.append(
                    {
                        "dim": r["dim"],
                        "table_dtype": r["table_dtype"],
                        "vs": other,
                        "fwd_time_ratio": r["fwd_s"] / o["fwd_s"],
                        "fwd_bwd_time_ratio": r["fwd_bwd_s"] / o["fwd_bwd_s"],
                    }
                )
    return out


# ------------------------------------------------------------------------------ (c) training step
class _RandomBatches:
    """The Batcher's ``next()`` contract on random tokens, made on the device up front."""

    def __init__(self, vocab: int, batch: int, seq: int, device: torch.device, count: int = 4):
        gen = torch.Generator(device="cpu").manual_seed(0)
        self.batches = [torch.randint(0, vocab, (batch, seq + 1), generator=gen).to(device) for _ in range(count)]
        self.i = 0

    def next(self):
        b = self.batches[self.i % len(self.batches)]
        self.i += 1
        return b[:, :-1], b[:, 1:]


def _count_syncs(device: torch.device, fn) -> int | None:
    """Host syncs that ``fn()`` makes, counted by torch.cuda.set_sync_debug_mode (None on the CPU)."""
    if device.type != "cuda":
        fn()
        return None
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


def bench_step(device: torch.device, clock: _Clock, lm: dict, backend: str, compile_too: bool, log=print) -> list[dict]:
    from peer.config import Config, ModelConfig, OptimConfig, PEERConfig, TrainConfig
    from peer.model import PeerLM
    from peer.train.optim import build_optimizer
    from peer.train.parts import GradClipper, Stepper
    from peer.train.schedule import Schedule

    rows = []
    for sparse in ("none", "peer"):
        for compiled in (False, True) if compile_too else (False,):
            row = {
                "model": "dense" if sparse == "none" else f"peer {lm['n']}^2",
                "compiled": compiled,
                "tokens_per_step": lm["batch"] * lm["seq"],
            }
            with _oom_as_record(row):
                mcfg = ModelConfig(
                    vocab_size=lm["vocab"],
                    d_model=lm["d_model"],
                    n_layers=lm["n_layers"],
                    n_heads=lm["n_heads"],
                    d_ff=4 * lm["d_model"],
                    max_seq_len=lm["seq"],
                    sparse_layer=sparse,
                    sparse_blocks="middle",
                    peer=PEERConfig(
                        num_experts=lm["n"] ** 2,
                        heads=8 if lm["d_model"] >= 256 else 2,
                        topk=16 if lm["n"] >= 16 else 4,
                        key_dim=128 if lm["d_model"] >= 256 else 8,
                        backend=backend,
                    ),
                )
                cfg = Config(
                    model=mcfg,
                    optim=OptimConfig(),
                    train=TrainConfig(
                        batch_size=lm["batch"], seq_len=lm["seq"], device=str(device), steps=lm["steps"] + 2
                    ),
                )
                torch.manual_seed(0)
                model = PeerLM(mcfg, device=device).train()
                fwd = torch.compile(model, fullgraph=True) if compiled else model
                opt = build_optimizer(model, cfg.optim)
                schedule = Schedule.from_config(cfg.optim, cfg.train.steps)
                batches = _RandomBatches(lm["vocab"], lm["batch"], lm["seq"], device)
                clipper = GradClipper(model, cfg.optim.grad_clip, distributed=False)
                stepper = Stepper(fwd, opt, schedule, batches, clipper, cfg, device)
                state = {"s": 0}

                def step(stepper=stepper, cfg=cfg, state=state):
                    stepper(state["s"] % cfg.train.steps)
                    state["s"] += 1

                t0 = time.perf_counter()
                step()  # first step: kernels, compilation
                clock.sync()
                row["first_step_s"] = time.perf_counter() - t0
                clock.reset_peak()
                row["step_s"] = clock.time(step, lm["steps"], warmup=1)
                row["tokens_per_s"] = row["tokens_per_step"] / row["step_s"]
                row["peak_bytes"] = clock.peak()
                row["host_syncs_per_step"] = _count_syncs(device, step)
                model = fwd = opt = None
            _free()
            rows.append(row)
            log(_step_line(row))
    base = {r["compiled"]: r for r in rows if r["model"] == "dense" and "error" not in r}
    for r in rows:
        if "error" not in r and r["compiled"] in base:
            r["step_vs_dense"] = r["step_s"] / base[r["compiled"]]["step_s"]
    return rows


def _step_line(r: dict) -> str:
    head = f"  {r['model']:<12} {'compiled' if r['compiled'] else 'eager':<8}"
    if "error" in r:
        return head + " " + r["error"]
    mem = f"{r['peak_bytes'] / 2**30:.2f} GiB" if r.get("peak_bytes") else "-"
    syncs = "-" if r["host_syncs_per_step"] is None else str(r["host_syncs_per_step"])
    return (
        head + f" step {r['step_s'] * 1e3:8.2f} ms  {r['tokens_per_s']:10.0f} tok/s  peak {mem}"
        f"  host syncs/step {syncs}  (first step {r['first_step_s']:.1f} s)"
    )


# ------------------------------------------------------------------------------ the whole run
def bench_gpu(
    device: str = "cuda", tiny: bool = False, compile_too: bool = True, parts=("ops", "layer", "step"), log=print
) -> dict:
    """Run the parts and return {"machine", "device", "config", "ops", "layer", "layer_ratios", "step"}."""
    from peer.ops import triton as triton_engine

    dev = torch.device(device)
    if not triton_engine.available():
        from peer.errors import UsageError

        raise UsageError("peer bench gpu needs triton and a CUDA device (or TRITON_INTERPRET=1 with --tiny)")
    shapes = TINY if tiny else FULL
    backend = (
        "triton" if dev.type == "cpu" else "auto"
    )  # auto: triton on CUDA (the interpreter on the CPU needs it named)
    clock = _Clock(dev)
    info = {"type": dev.type}
    if dev.type == "cuda":
        info["name"] = torch.cuda.get_device_name(dev)
        info["datasheet_hbm_gbps"] = hbm_datasheet_gbps(info["name"])
        info["measured_copy_gbps"] = measured_copy_gbps(dev, clock, 2 << 30)
    hbm = info.get("datasheet_hbm_gbps") or info.get("measured_copy_gbps")
    res = {"machine": machine_info(), "device": info, "config": dict(shapes, tiny=tiny, backend=backend)}
    log(
        f"peer bench gpu on {info.get('name', device)}"
        + (
            f": HBM {info['datasheet_hbm_gbps']} GB/s datasheet, {info['measured_copy_gbps']:.0f} GB/s measured copy"
            if dev.type == "cuda"
            else " (Triton interpreter)"
        )
    )
    t0 = time.perf_counter()
    if "ops" in parts:
        log("(a) Triton expert mix vs the reference (opcheck; values and gradients)")
        res["ops"] = check_ops(dev, "triton")
        for r in res["ops"]:
            log(
                f"  {r['table_dtype']:<9} glu={r['glu']!s:<5} sparse={r['sparse_grad']!s:<5} "
                + ("ok" if r["ok"] else "FAILED")
                + (f"  max rel err {r['max_rel_err']:.2e}" if "max_rel_err" in r else "")
                + (f"  {r['error']}" if "error" in r else "")
            )
    if "layer" in parts:
        log(
            f"(b) layers at N = {shapes['n']}^2, h = {shapes['heads']}, k = {shapes['topk']}, {shapes['tokens']} tokens"
        )
        res["layer"] = bench_layers(dev, clock, shapes, backend, hbm, log)
        res["layer_ratios"] = layer_ratios(res["layer"])
        for r in res["layer_ratios"]:
            log(
                f"  PEER d={r['dim']} {r['table_dtype']}: {r['fwd_time_ratio']:.2f}x the forward time of {r['vs']}, "
                f"{r['fwd_bwd_time_ratio']:.2f}x its forward+backward time"
            )
    if "step" in parts:
        lm = shapes["lm"]
        log(
            f"(c) training step: d={lm['d_model']}, {lm['n_layers']} blocks, PEER {lm['n']}^2 in the middle, "
            f"{lm['batch']} x {lm['seq']} tokens"
        )
        res["step"] = bench_step(dev, clock, lm, backend, compile_too, log)
    res["seconds"] = time.perf_counter() - t0
    return res


def print_gpu(res: dict, out=print) -> None:
    """The targets of the speed issue that this run decides."""
    best = [
        r
        for r in res.get("layer", [])
        if r["impl"] == "peer"
        and "fwd_hbm_fraction" in r
        and r["dim"] == max(res["config"]["dims"])
        and r["table_dtype"] == "bfloat16"
    ]
    for r in best:
        f = r["fwd_hbm_fraction"]
        out(
            f"target: forward at d={r['dim']} bf16 reads its rows at {100 * f:.0f} % of HBM bandwidth (>= 50 %, "
            f"moonshot >= 75 %): {'MET' if f >= 0.5 else 'NOT MET'}"
        )
    for r in res.get("layer_ratios", []):
        if r["vs"] == "peer-pytorch":
            speedup = 1 / r["fwd_bwd_time_ratio"]
            out(
                f"target: fwd+bwd speed-up over peer-pytorch at d={r['dim']}: {speedup:.2f}x (>= 5x): "
                f"{'MET' if speedup >= 5 else 'NOT MET'}"
            )
    for r in res.get("step", []):
        if r["model"] != "dense" and "step_vs_dense" in r:
            kind = "compiled" if r["compiled"] else "eager"
            out(
                f"target: PeerLM step / dense step ({kind}): {r['step_vs_dense']:.2f}x (<= 1.3x): "
                f"{'MET' if r['step_vs_dense'] <= 1.3 else 'NOT MET'}"
            )
    out(f"done in {res['seconds']:.0f} s")
