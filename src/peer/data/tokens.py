"""Token storage of a corpus directory: one flat memmapped array per split.

    corpus/
      manifest.json           sources, licenses, archive hashes, per-split counts
      tokenizer.json
      splits/<split>.bin      token ids, documents each followed by the EOS id
      splits/<split>.json     {"dtype", "eos_id", "num_tokens", "documents": [{"id", "offset", "tokens", "sha256"}]}

The array is ``uint16`` when the vocabulary fits (<= 65535 ids) and ``uint32`` otherwise; a
document's tokens are ``tokens[offset : offset + tokens]`` and ``tokens[offset + tokens]`` is EOS.
Splits: ``train``, ``val`` (in-domain) and out-of-domain ``eval_*``.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ..errors import disk_full_as_error
from ..fsutil import atomic_write_text, publish
from .sources import DataError

__all__ = ["token_dtype", "write_split", "open_tokens", "split_info", "list_splits", "eval_splits", "pack_documents"]


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size <= 65535 else np.uint32)


def pack_documents(docs_ids: Sequence[Sequence[int]], eos_id: int, dtype=np.int64) -> np.ndarray:
    """Concatenate documents, each followed by ``eos_id``."""
    total = sum(len(d) + 1 for d in docs_ids)
    out = np.empty(total, dtype=dtype)
    pos = 0
    for d in docs_ids:
        out[pos : pos + len(d)] = d
        out[pos + len(d)] = eos_id
        pos += len(d) + 1
    return out


def write_split(
    corpus_dir: str | Path,
    split: str,
    doc_ids: Sequence[str],
    docs_tokens: Sequence[Sequence[int]],
    eos_id: int,
    vocab_size: int,
    doc_sha256: Sequence[str] | None = None,
) -> dict:
    """Write ``splits/<split>.bin`` and ``.json`` atomically; returns the json dict (without documents)."""
    if len(doc_ids) != len(docs_tokens):
        raise ValueError(f"split {split!r}: {len(doc_ids)} ids for {len(docs_tokens)} documents")
    if not doc_ids:
        raise DataError(f"split {split!r}: no documents")
    dtype = token_dtype(vocab_size)
    top = max((int(np.max(d)) for d in docs_tokens if len(d)), default=0)
    if max(top, eos_id) >= vocab_size:
        raise DataError(f"split {split!r}: token id {max(top, eos_id)} >= vocab_size {vocab_size}")
    arr = pack_documents(docs_tokens, eos_id, dtype)
    sdir = Path(corpus_dir) / "splits"
    sdir.mkdir(parents=True, exist_ok=True)
    with disk_full_as_error(sdir / f"{split}.bin", f"split {split!r}"):
        fd, tmp = tempfile.mkstemp(dir=sdir, prefix=f".{split}.bin.")
        try:
            with os.fdopen(fd, "wb") as f:
                arr.tofile(f)
            publish(tmp, sdir / f"{split}.bin")
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    documents, offset = [], 0
    for i, (did, toks) in enumerate(zip(doc_ids, docs_tokens, strict=True)):
        entry = {"id": did, "offset": offset, "tokens": len(toks)}
        if doc_sha256 is not None:
            entry["sha256"] = doc_sha256[i]
        documents.append(entry)
        offset += len(toks) + 1
    info = {
        "split": split,
        "dtype": dtype.name,
        "eos_id": int(eos_id),
        "vocab_size": int(vocab_size),
        "num_tokens": int(arr.size),
        "num_documents": len(documents),
    }
    atomic_write_text(sdir / f"{split}.json", json.dumps({**info, "documents": documents}, indent=1) + "\n")
    return info


def split_info(corpus_dir: str | Path, split: str) -> dict:
    """The ``splits/<split>.json`` record (dtype, counts, documents)."""
    path = Path(corpus_dir) / "splits" / f"{split}.json"
    if not path.is_file():
        have = list_splits(corpus_dir) if Path(corpus_dir).is_dir() else []
        raise FileNotFoundError(f"split {split!r}: {path} does not exist (splits in {corpus_dir}: {have or 'none'})")
    return json.loads(path.read_text(encoding="utf-8"))


def open_tokens(corpus_dir: str | Path, split: str) -> np.memmap:
    """The split's tokens as a read-only memmap (dtype from ``splits/<split>.json``)."""
    info = split_info(corpus_dir, split)
    path = Path(corpus_dir) / "splits" / f"{split}.bin"
    dtype = np.dtype(info["dtype"])
    size = path.stat().st_size if path.is_file() else -1
    if size != info["num_tokens"] * dtype.itemsize:
        raise DataError(
            f"split {split!r}: {path} has {size} bytes, expected {info['num_tokens']} x "
            f"{dtype.itemsize} (re-run `peer data prepare` / `peer data tokenize`)"
        )
    return np.memmap(path, dtype=dtype, mode="r", shape=(info["num_tokens"],))


def list_splits(corpus_dir: str | Path) -> list[str]:
    """Split names present in the corpus dir: ``train``, ``val``, then ``eval_*`` and others, sorted."""
    sdir = Path(corpus_dir) / "splits"
    names = sorted(p.stem for p in sdir.glob("*.json") if (sdir / f"{p.stem}.bin").is_file()) if sdir.is_dir() else []
    order = {"train": 0, "val": 1}
    return sorted(names, key=lambda n: (order.get(n, 2), n))


def eval_splits(corpus_dir: str | Path, test: bool = False) -> list[str]:
    """The splits to evaluate on: ``val`` (in-domain) first, then every ``eval_*``; with ``test=True``
    also the held-out ``test_*`` splits, last (only a final, pre-registered comparison should ask)."""
    return [
        n for n in list_splits(corpus_dir) if n == "val" or n.startswith("eval_") or (test and n.startswith("test_"))
    ]
