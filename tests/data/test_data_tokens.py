"""Token storage: EOS-separated packing, dtype by vocab size, memmap round trip, split listing."""

import os

import numpy as np
import pytest

from peer.data import DataError, eval_splits, list_splits, open_tokens, split_info, token_dtype
from peer.data.tokens import pack_documents, write_split

DOCS = [[5, 6, 7], [8], [], [9, 10]]


def test_pack_documents_eos_after_each():
    assert pack_documents(DOCS, eos_id=0).tolist() == [5, 6, 7, 0, 8, 0, 0, 9, 10, 0]


@pytest.mark.parametrize(
    "vocab,dtype", [(300, np.uint16), (65535, np.uint16), (65536, np.uint32), (200_000, np.uint32)]
)
def test_write_and_open(tmp_path, vocab, dtype):
    big = vocab - 1
    docs = [[1, 2, big], [3], [big, 4, 5, 6]]
    info = write_split(tmp_path, "train", ["a", "b", "c"], docs, eos_id=0, vocab_size=vocab, doc_sha256=["x", "y", "z"])
    assert token_dtype(vocab) == dtype and info["dtype"] == np.dtype(dtype).name
    toks = open_tokens(tmp_path, "train")
    assert isinstance(toks, np.memmap) and toks.dtype == dtype
    assert toks.tolist() == [1, 2, big, 0, 3, 0, big, 4, 5, 6, 0]
    meta = split_info(tmp_path, "train")
    assert meta["num_tokens"] == 11 and meta["eos_id"] == 0
    for d, rec in zip(docs, meta["documents"], strict=True):  # each document sits at its offset, followed by EOS
        o, n = rec["offset"], rec["tokens"]
        assert toks[o : o + n].tolist() == d and toks[o + n] == 0
    assert sorted(p.name for p in (tmp_path / "splits").iterdir()) == ["train.bin", "train.json"]
    mask = os.umask(0)
    os.umask(mask)
    assert (tmp_path / "splits" / "train.bin").stat().st_mode & 0o777 == 0o666 & ~mask  # not mkstemp's 0600


def test_id_out_of_range(tmp_path):
    with pytest.raises(DataError, match="token id 300 >= vocab_size 300"):
        write_split(tmp_path, "train", ["a"], [[1, 300]], eos_id=0, vocab_size=300)


def test_list_and_eval_splits(tmp_path):
    for name in ("eval_b", "train", "val", "eval_a", "extra"):
        write_split(tmp_path, name, ["d"], [[1, 2]], eos_id=0, vocab_size=300)
    assert list_splits(tmp_path) == ["train", "val", "eval_a", "eval_b", "extra"]
    assert eval_splits(tmp_path) == ["val", "eval_a", "eval_b"]


def test_missing_and_truncated(tmp_path):
    write_split(tmp_path, "train", ["d"], [[1, 2, 3]], eos_id=0, vocab_size=300)
    with pytest.raises(FileNotFoundError, match=r"split 'val'.*splits in .*\['train'\]"):
        open_tokens(tmp_path, "val")
    with open(tmp_path / "splits" / "train.bin", "r+b") as f:
        f.truncate(4)
    with pytest.raises(DataError, match="has 4 bytes, expected 4 x 2"):
        open_tokens(tmp_path, "train")
