"""``peer bench layer``, ``train``, ``step``, ``gpu`` and ``plot``: see :mod:`peer.bench.layer`,
:mod:`peer.bench.train`, :mod:`peer.bench.step` and :mod:`peer.bench.gpu`."""

from __future__ import annotations

import argparse

import torch

from ..errors import UsageError
from .common import parse_int_list, write_json

__all__ = ["add_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="what", metavar="{layer,train,step,gpu,plot}", required=True)
    layer = sub.add_parser("layer", help="forward and forward+backward of one layer, implementations side by side")
    layer.add_argument(
        "--experts",
        default="128,256,512,1024",
        help="comma-separated n; each run uses N = n^2 experts (default 128,256,512,1024)",
    )
    layer.add_argument(
        "--impls",
        default=None,
        help="implementations (see `peer.bench.layer`; default dense,pkm,reference,fused,fused-sparse,"
        "peer-pytorch, skipping peer-pytorch when it is not installed; named explicitly, a "
        "missing one is an error)",
    )
    layer.add_argument("--modes", default="fwd,fwd+bwd", help="fwd, fwd+bwd or both")
    layer.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds (medians are reported)")
    _common(layer)
    layer.add_argument("--heads", type=int, default=8)
    layer.add_argument("--topk", type=int, default=16)
    layer.add_argument("--key-dim", type=int, default=128)
    layer.add_argument(
        "--table-dtype",
        default="float32",
        choices=["float32", "bfloat16"],
        help="storage of the PEER tables (peer-pytorch runs with float32 only)",
    )
    layer.add_argument("--device", default="cpu", help="cpu or cuda[:i] (the fused backend uses Triton on CUDA)")
    layer.add_argument("--plot", default=None, help="write tokens/s vs N (log scale) to this PNG")

    train = sub.add_parser("train", help="full training steps (fwd, bwd, optimizer) vs N, each in a fresh process")
    train.add_argument("--experts", default="128,256,512", help="comma-separated n (N = n^2)")
    train.add_argument(
        "--impls",
        default=None,
        help="implementations (see `peer.bench.train`; default fused-adamw,fused-sparse,"
        "fused-sparse-lite,peer-pytorch-adamw; named explicitly, a missing one is an error)",
    )
    train.add_argument("--steps", type=int, default=3, help="timed steps after one warm-up step")
    train.add_argument("--table-dtype", default="float32", choices=["float32", "bfloat16"])
    train.add_argument("--force", action="store_true", help="run even when the memory estimate exceeds what is free")
    train.add_argument("--plot", default=None, help="write tokens/s and peak RSS vs N (log scale) to this PNG")
    _common(train)

    step = sub.add_parser("step", help="the main job's training step, dense vs PEER presets side by side")
    step.add_argument(
        "--presets",
        default="dense,peer",
        help="comma-separated presets or TOML files; ratios are to the first (default dense,peer)",
    )
    step.add_argument("--rounds", type=int, default=10, help="interleaved timed rounds (medians are reported)")
    step.add_argument("--compile", action="store_true", help="also time each side under torch.compile(fullgraph=True)")
    step.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    step.add_argument("--out", default=None, help="write the results as JSON here")

    gpu = sub.add_parser(
        "gpu",
        help="the GPU benchmark: Triton ops vs the reference, layers at the paper's shape, "
        "PeerLM vs dense training step (within 8 min on an H100)",
    )
    gpu.add_argument("--out", default=None, help="write the results as JSON here (e.g. results/bench/gpu_h100.json)")
    gpu.add_argument(
        "--device",
        default="cuda",
        help="cuda[:i]; cpu runs the Triton interpreter (needs TRITON_INTERPRET=1 and --tiny)",
    )
    gpu.add_argument("--tiny", action="store_true", help="tiny shapes (a test of the script, not a benchmark)")
    gpu.add_argument("--parts", default="ops,layer,step", help="comma-separated: ops, layer, step (default all)")
    gpu.add_argument("--no-compile", action="store_true", help="time the training step in eager mode only")

    plot = sub.add_parser("plot", help="plot saved results (--out JSON files of `layer` or `train` runs) together")
    plot.add_argument("inputs", nargs="+", help="JSON files written by --out (all of one kind)")
    plot.add_argument("--out", required=True, help="PNG to write")


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tokens", type=int, default=4096, help="tokens per step (default 4096 = 8 x 512)")
    p.add_argument("--dim", type=int, default=512, help="model width d (default 512)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    p.add_argument("--out", default=None, help="write the results as JSON here")


def _plot(args) -> int:
    import json
    from pathlib import Path

    runs = []
    for f in args.inputs:
        try:
            runs.append(json.loads(Path(f).read_text()))
        except (OSError, ValueError) as e:
            raise UsageError(f"cannot read results file {f}: {e}") from None
    results = [r for run in runs for r in run.get("results", [])]
    if not results:
        raise UsageError("no results in " + ", ".join(args.inputs))
    if "fwd+bwd" in results[0] or "fwd" in results[0]:
        from .layer import plot_layer

        plot_layer({"results": results, "config": runs[0]["config"]}, args.out)
    else:
        from .train import plot_train

        plot_train(results, args.out)
    return 0


def _gpu(args) -> int:
    from .gpu import bench_gpu, print_gpu

    parts = tuple(p.strip() for p in args.parts.split(",") if p.strip())
    if not parts or any(p not in ("ops", "layer", "step") for p in parts):
        raise UsageError(f"--parts must list ops, layer and/or step, got {args.parts!r}")
    try:
        device = torch.device(args.device)
    except RuntimeError:
        raise UsageError(f"--device: {args.device!r} is not a device") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(
            f"--device {args.device}: no CUDA device here (on the CPU: TRITON_INTERPRET=1 "
            "peer bench gpu --device cpu --tiny)"
        )
    if device.type == "cpu" and not args.tiny:
        raise UsageError("--device cpu runs the Triton interpreter: only with --tiny")
    if device.type not in ("cpu", "cuda"):
        raise UsageError(f"--device must be cuda[:i] or cpu, got {args.device!r}")
    res = bench_gpu(args.device, tiny=args.tiny, compile_too=not args.no_compile, parts=parts)
    print_gpu(res)
    if args.out:
        write_json(args.out, res)
        print(f"wrote {args.out}")
    return 0


def run(args: argparse.Namespace) -> int:
    if args.what == "plot":
        return _plot(args)
    if args.what == "gpu":
        return _gpu(args)
    if args.threads < 0:
        raise UsageError(f"--threads must be >= 0, got {args.threads}")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.what == "step":
        from .step import bench_step, print_step

        if args.rounds <= 0:
            raise UsageError(f"--rounds must be positive, got {args.rounds}")
        res = bench_step(
            [p.strip() for p in args.presets.split(",") if p.strip()], args.rounds, compile_too=args.compile
        )
        print_step(res)
        if args.out:
            write_json(args.out, res)
        return 0
    if args.tokens <= 0 or args.dim <= 0:
        raise UsageError(f"--tokens and --dim must be positive, got {args.tokens}, {args.dim}")
    experts = parse_int_list(args.experts, "--experts")
    defaults = {
        "layer": "dense,pkm,reference,fused,fused-sparse,peer-pytorch",
        "train": "fused-adamw,fused-sparse,fused-sparse-lite,peer-pytorch-adamw",
    }
    explicit = getattr(args, "impls", None) is not None
    impls = [s.strip() for s in (args.impls if explicit else defaults.get(args.what, "")).split(",") if s.strip()]
    if explicit and any(i.startswith("peer-pytorch") for i in impls):
        import importlib.util

        if importlib.util.find_spec("PEER_pytorch") is None:
            raise UsageError(
                "--impls peer-pytorch: the PyPI package peer-pytorch is not installed "
                "(pip install peer-pytorch, or this project's 'bench' extra)"
            )
    if args.what == "layer":
        from .layer import IMPLS, bench_layer, check_targets, plot_layer, print_layer

        bad = [i for i in impls if i not in IMPLS]
        if bad:
            raise UsageError(f"--impls: unknown {', '.join(bad)}; choose from {', '.join(IMPLS)}")
        modes = tuple(m.strip() for m in args.modes.split(",") if m.strip())
        if not modes or any(m not in ("fwd", "fwd+bwd") for m in modes):
            raise UsageError(f"--modes must list fwd and/or fwd+bwd, got {args.modes!r}")
        if args.rounds <= 0:
            raise UsageError(f"--rounds must be positive, got {args.rounds}")
        if args.device.startswith("cuda") and not torch.cuda.is_available():
            raise UsageError(f"--device {args.device}: no CUDA device here")
        res = bench_layer(
            experts,
            impls,
            args.tokens,
            args.dim,
            args.heads,
            args.topk,
            args.key_dim,
            args.rounds,
            modes,
            args.table_dtype,
            args.device,
        )
        print_layer(res)
        for impl in ("fused-sparse", "fused"):
            for what, value, target, met in check_targets(res, impl):
                print(f"target: {what} = {value:.2f} (target {target}): {'MET' if met else 'NOT MET'}")
        if args.plot:
            plot_layer(res, args.plot)
    else:
        from .train import bench_train, plot_train, print_train

        if args.steps <= 0:
            raise UsageError(f"--steps must be positive, got {args.steps}")
        res = bench_train(experts, impls, args.tokens, args.dim, args.steps, args.table_dtype, args.force)
        print_train(res)
        if args.plot:
            plot_train(res["results"], args.plot)
    if args.out:
        write_json(args.out, res)
    return 0
