"""``peer export RUN DIR``: a trained run as a Hugging Face transformers model + tokenizer directory."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run", metavar="RUN", help="a run directory (its latest checkpoint) or a checkpoint directory")
    parser.add_argument("out", metavar="DIR", help="output directory (config.json, model.safetensors, tokenizer)")
    parser.add_argument("--overwrite", action="store_true", help="replace DIR if it exists")
    parser.add_argument("--no-tokenizer", action="store_true", help="export the model only")


def run(args: argparse.Namespace) -> int:
    import importlib.util

    from ..errors import UsageError

    if importlib.util.find_spec("transformers") is None:
        raise UsageError('peer export needs Hugging Face transformers: pip install "peer-experts[hf]"')
    from .export import export_run

    out = export_run(args.run, args.out, tokenizer=not args.no_tokenizer, overwrite=args.overwrite)
    print(f"exported {args.run} -> {out}")
    print(
        f"  load with: from transformers import AutoModelForCausalLM, AutoTokenizer\n"
        f"             AutoModelForCausalLM.from_pretrained({str(out)!r}, trust_remote_code=True)"
        + ("" if args.no_tokenizer else f"; AutoTokenizer.from_pretrained({str(out)!r})")
    )
    return 0
