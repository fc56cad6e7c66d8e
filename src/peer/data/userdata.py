"""Your own text as a corpus directory, or as one token array for evaluation.

    peer data tokenize notes/ book.txt dump.jsonl --out data/mine [--tokenizer PATH] [--vocab-size N]
    peer data tokenize hf:wikitext:wikitext-103-raw-v1@train --max-docs 20000 --out data/wiki

Inputs: text files (one file = one document), directories (every ``*.txt``, ``*.md``, ``*.rst``
below them, sorted), JSONL files (one document per line, text in ``--text-field``) and
``hf:NAME[:CONFIG][@SPLIT]`` Hugging Face datasets (streamed; needs the ``datasets`` package
and network, imported only here).

Bad input is an error naming the file: a file named on the command line that is empty, a
directory with no text in it (empty files found inside a directory are skipped and listed),
bytes that are not UTF-8 (with the byte offset; ``--replace-errors`` substitutes U+FFFD) and
a corpus too small to train on.

Split: ``val`` gets ``val_fraction`` of the documents (at least one, chosen by a seeded shuffle),
``train`` the rest; a single document is cut in two at the line break nearest to the split point.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np

from ..fsutil import FolderLock
from .corpus import check_corpus_target, dedupe, write_corpus
from .sources import DataError, Document
from .tokenizer import Tokenizer, load_tokenizer, train_tokenizer
from .tokens import pack_documents

__all__ = ["TEXT_SUFFIXES", "read_documents", "split_train_val", "encode_texts", "build_corpus"]

TEXT_SUFFIXES = (".txt", ".md", ".rst")


def _warn(msg: str) -> None:
    print(f"warning: {msg}", file=sys.stderr)


def _read_text(path: Path, replace_errors: bool) -> str:
    data = path.read_bytes()
    bom = 3 if data.startswith(b"\xef\xbb\xbf") else 0
    try:
        return data[bom:].decode("utf-8", errors="replace" if replace_errors else "strict")
    except UnicodeDecodeError as e:
        raise DataError(
            f"{path}: not valid UTF-8 at byte offset {bom + e.start} (byte 0x{data[bom + e.start]:02x}); "
            "pass --replace-errors to replace bad bytes with U+FFFD"
        ) from None


def _jsonl_documents(path: Path, text_field: str, replace_errors: bool) -> list[Document]:
    docs, empty = [], 0
    for lineno, line in enumerate(_read_text(path, replace_errors).splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
        text = rec.get(text_field) if isinstance(rec, dict) else None
        if not isinstance(text, str):
            raise DataError(f"{path}:{lineno}: no string field {text_field!r} (choose the field with --text-field)")
        if text.strip():
            docs.append(Document(f"{path}:{lineno}", text))
        else:
            empty += 1
    if not docs:
        raise DataError(f"{path}: no non-empty {text_field!r} values in this JSONL file")
    if empty:
        _warn(f"{path}: skipped {empty} record(s) with empty {text_field!r}")
    return docs


def _hf_documents(spec: str, text_field: str, max_docs: int | None) -> Iterator[Document]:
    """Stream ``hf:NAME[:CONFIG][@SPLIT]`` with ``datasets`` (imported here, only when asked for)."""
    body = spec[3:]
    body, _, split = body.partition("@")
    name, _, config = body.partition(":")
    if not name:
        raise DataError(f"input {spec!r}: expected hf:NAME[:CONFIG][@SPLIT]")
    try:
        import datasets
    except ImportError:
        raise DataError(
            f"input {spec!r}: reading a Hugging Face dataset needs the `datasets` package "
            "(pip install datasets) and network access to the hub"
        ) from None
    try:
        ds = datasets.load_dataset(name, config or None, split=split or "train", streaming=True)
    except Exception as e:  # network, unknown name or config
        raise DataError(f"input {spec!r}: load_dataset failed: {e}") from None
    n = 0
    for i, rec in enumerate(ds):
        if max_docs is not None and n >= max_docs:
            break
        text = rec.get(text_field)
        if not isinstance(text, str):
            raise DataError(f"input {spec!r}: record {i} has no string field {text_field!r} (--text-field)")
        if text.strip():
            n += 1
            yield Document(f"{spec}#{i}", text)


def read_documents(
    inputs: str | Path | Sequence[str | Path],
    text_field: str = "text",
    replace_errors: bool = False,
    max_docs: int | None = None,
) -> list[Document]:
    """Documents from files, directories, JSONL files and ``hf:`` datasets (see the module doc)."""
    if isinstance(inputs, (str, Path)):
        inputs = [inputs]
    if not inputs:
        raise DataError("no input given (files, directories, .jsonl files or hf:NAME)")
    docs: list[Document] = []
    for inp in inputs:
        if str(inp).startswith("hf:"):
            docs += list(_hf_documents(str(inp), text_field, max_docs))
            continue
        p = Path(inp)
        if p.is_dir():
            files = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in TEXT_SUFFIXES)
            found, empty = [], []
            for f in files:
                text = _read_text(f, replace_errors)
                (found.append(Document(str(f), text)) if text.strip() else empty.append(str(f)))
            if not found:
                raise DataError(
                    f"{p}: no text in this directory (looked for non-empty {', '.join(TEXT_SUFFIXES)} "
                    f"files; {len(files)} found, {len(empty)} empty)"
                )
            if empty:
                _warn(
                    f"{p}: skipped {len(empty)} empty file(s): {', '.join(empty[:10])}"
                    + (" ..." if len(empty) > 10 else "")
                )
            docs += found
        elif p.is_file():
            if p.suffix.lower() == ".jsonl":
                docs += _jsonl_documents(p, text_field, replace_errors)
            else:
                text = _read_text(p, replace_errors)
                if not text.strip():
                    raise DataError(f"{p}: file is empty")
                docs.append(Document(str(p), text))
        else:
            raise FileNotFoundError(f"input {p} does not exist")
    return docs[:max_docs] if max_docs is not None else docs


def _cut(text: str, at: int) -> int:
    """A cut position near ``at``: after the last newline before it if there is one in the back half."""
    nl = text.rfind("\n", 0, at)
    if nl >= len(text) // 2:
        return nl + 1
    sp = text.rfind(" ", 0, at)
    return sp + 1 if sp >= len(text) // 2 else at


def split_train_val(docs: Sequence[Document], val_fraction: float = 0.1, seed: int = 0) -> dict[str, list[Document]]:
    """Whole documents into ``train`` / ``val``, the val share bounded by size (characters, a proxy
    for tokens known before the tokenizer exists): documents in a seeded random order go to val
    while val stays within ``val_fraction`` of the text. When no whole document fits (a few large
    ones, or a lone document) the largest one is cut into a train part and a val part."""
    if not 0 < val_fraction < 1:
        raise DataError(f"--val-fraction must be in (0, 1), got {val_fraction}")
    if not docs:
        raise DataError("no documents to split")
    total = sum(len(d.text) for d in docs)
    budget = val_fraction * total
    val_idx: set[int] = set()
    size = 0
    for i in np.random.default_rng(seed).permutation(len(docs)).tolist():
        if len(val_idx) < len(docs) - 1 and size + len(docs[i].text) <= budget:
            val_idx.add(i)
            size += len(docs[i].text)
    if val_idx:
        return {
            "train": [d for i, d in enumerate(docs) if i not in val_idx],
            "val": [d for i, d in enumerate(docs) if i in val_idx],
        }
    big = max(range(len(docs)), key=lambda i: len(docs[i].text))
    d = docs[big]
    at = _cut(d.text, int(len(d.text) - budget))
    if at <= 0 or at >= len(d.text):
        raise DataError(f"{d.id}: too short to split into train and val")
    rest = [x for i, x in enumerate(docs) if i != big]
    return {
        "train": [*rest, Document(f"{d.id}#train", d.text[:at], d.meta)],
        "val": [Document(f"{d.id}#val", d.text[at:], d.meta)],
    }


def _as_tokenizer(tokenizer: Tokenizer | str | Path) -> Tokenizer:
    return tokenizer if isinstance(tokenizer, Tokenizer) else load_tokenizer(tokenizer)


def encode_texts(
    paths: str | Path | Sequence[str | Path],
    tokenizer: Tokenizer | str | Path,
    text_field: str = "text",
    replace_errors: bool = False,
) -> np.ndarray:
    """User text as one int64 token array: each document followed by the EOS id (``peer eval --text``)."""
    tok = _as_tokenizer(tokenizer)
    docs = read_documents(paths, text_field=text_field, replace_errors=replace_errors)
    return pack_documents(tok.encode_arrays([d.text for d in docs]), tok.eos_id, np.int64)


def build_corpus(
    inputs: Iterable[str | Path],
    out: str | Path,
    tokenizer: Tokenizer | str | Path | None = None,
    vocab_size: int = 8192,
    text_field: str = "text",
    replace_errors: bool = False,
    val_fraction: float = 0.1,
    seed: int = 0,
    min_tokens: int = 1024,
    max_docs: int | None = None,
    log: Callable[[str], None] = print,
    overwrite: bool = False,
) -> dict:
    """A corpus directory (train/val, tokenizer.json, manifest.json) from user inputs; returns the manifest.
    An existing corpus at ``out`` is replaced only with ``overwrite``; a run or other files never."""
    check_corpus_target(out, overwrite)  # before reading any input: a refused --out costs nothing
    with FolderLock(out, "corpus"):
        check_corpus_target(out, overwrite)
        return _build_corpus(
            inputs,
            out,
            tokenizer,
            vocab_size,
            text_field,
            replace_errors,
            val_fraction,
            seed,
            min_tokens,
            max_docs,
            log,
        )


def _build_corpus(
    inputs, out, tokenizer, vocab_size, text_field, replace_errors, val_fraction, seed, min_tokens, max_docs, log
) -> dict:
    inputs = [str(i) for i in inputs]
    docs = read_documents(inputs, text_field, replace_errors, max_docs)
    splits, dropped = dedupe(split_train_val(docs, val_fraction, seed))
    if not splits["val"]:
        raise DataError("every val document is a copy of a train document; nothing is left to validate on")
    if tokenizer is not None:
        tok, how = _as_tokenizer(tokenizer), {"trained": False, "from": str(tokenizer)}
    else:
        tok, how = train_tokenizer([d.text for d in splits["train"]], vocab_size), {"trained": True}
    chars = {k: sum(len(d.text) for d in v) for k, v in splits.items()}
    log(
        f"{len(docs)} documents; split: train {len(splits['train'])} documents ({chars['train']:,} characters), "
        f"val {len(splits['val'])} ({chars['val']:,} characters, {chars['val'] / max(1, sum(chars.values())):.1%}"
        f"{'; cut from ' + splits['val'][0].id.rsplit('#', 1)[0] if splits['val'][0].id.endswith('#val') else ''}); "
        f"tokenizer with {tok.vocab_size} ids"
    )
    extra = {
        "inputs": inputs,
        "tokenizer": how,
        "duplicates_dropped": dropped,
        "split_rule": f"val: whole documents up to {val_fraction:g} of the text (seed {seed}; the largest "
        "document is cut when none fits); train: the rest",
    }
    return write_corpus(out, splits, tok, extra, log, min_train_tokens=min_tokens)
