"""The ``peer`` command line. Each subcommand lives in its own module, imported only when used.

A subcommand module exposes ``add_arguments(parser)`` and ``run(args) -> int``.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("peer.demo", "build a small PEER LM, train a few steps on random tokens, print params/FLOPs"),
    "data": ("peer.data.cli", "prepare the starter corpus, tokenize user text"),
    "train": ("peer.train.cli", "train a model from a TOML config (--set key=value overrides)"),
    "eval": ("peer.eval", "perplexity on every evaluation set, expert usage and unevenness"),
    "generate": ("peer.generate", "sample text from a trained run"),
    "plot": ("peer.plots", "training curves (loss vs tokens and FLOPs) as PNG"),
    "bench": ("peer.bench.cli", "benchmark PEER layers and training steps"),
    "sweep": ("peer.experiments.sweep.cli", "isoFLOP sweeps and ablations"),
    "export": ("peer.hf.cli", "export a run to a Hugging Face transformers directory"),
    "main": (
        "peer.experiments.mainjob",
        "the main job: prepare data, train dense and PEER at equal FLOPs, evaluate, compare",
    ),
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    top = argparse.ArgumentParser(prog="peer", description="PEER: a million tiny experts for PyTorch.")
    sub = top.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, help_) in COMMANDS.items():
        sub.add_parser(name, help=help_, add_help=False)
    if argv[:1] in (["--version"], ["-V"]):
        from importlib.metadata import PackageNotFoundError, version

        try:
            print(f"peer {version('peer-experts')}")
        except PackageNotFoundError:  # run from a source tree without installing
            print("peer (not installed)")
        return 0
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        top.parse_args(argv or ["--help"])
        return 0
    name = argv[0]
    from .memory import apply_memory_settings

    apply_memory_settings()  # before any tensor: buffers reuse mapped pages, kernel cache bounded (peer.memory)
    module = importlib.import_module(COMMANDS[name][0])
    parser = argparse.ArgumentParser(prog=f"peer {name}", description=COMMANDS[name][1])
    module.add_arguments(parser)
    args = parser.parse_args(argv[1:])
    from .errors import PeerError, disk_full, is_disk_full

    try:
        return int(module.run(args) or 0)
    except (PeerError, FileNotFoundError, NotADirectoryError, IsADirectoryError, FileExistsError, PermissionError) as e:
        # the project's own error types and bad paths: one line; anything else is a bug (traceback)
        msg = f"{e.strerror}: {e.filename!r}" if isinstance(e, OSError) and e.filename and e.strerror else str(e)
        print(f"peer {name}: error: {msg}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `peer ... | head`: the reader left; no traceback
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except KeyboardInterrupt:  # Ctrl-C (peer train handles its own signals and saves a checkpoint first)
        print(f"peer {name}: interrupted", file=sys.stderr)
        return 130
    except OSError as e:  # a full disk anywhere a command writes: one line naming where
        if not is_disk_full(e):
            raise
        print(f"peer {name}: error: {disk_full(e.filename or os.getcwd(), 'its output')}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
