"""The real starter corpus (slow: fetches ~60 MB once into data/cache, then ~1-2 minutes of work)."""

import shutil
import time
from collections import Counter
from pathlib import Path

import pytest

from peer.data import check_disjoint, eval_splits, list_splits, load_tokenizer, open_tokens, prepare, split_info
from peer.data.sources import SOURCES, clean_text

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not all(shutil.which(t) for t in ("npm", "apt-get", "dpkg-deb")),
        reason="needs npm, apt-get and dpkg-deb to fetch the sources",
    ),
]

CACHE = Path(__file__).resolve().parents[2] / "data" / "cache"


@pytest.fixture(scope="module")
def starter(tmp_path_factory):
    out = tmp_path_factory.mktemp("starter")
    manifest = prepare(out, CACHE, log=lambda *_: None)
    return out, manifest


def test_splits_and_counts(starter):
    out, m = starter
    assert list_splits(out) == [
        "train",
        "val",
        "eval_brown_fiction",
        "eval_brown_nonfiction",
        "eval_pydoc",
        "eval_shakespeare",
        "test_moby_dick",
        "test_sotu",
    ]
    assert eval_splits(out)[0] == "val" and not any(s.startswith("test_") for s in eval_splits(out))
    by = {s: Counter(d["id"].split("/")[0] for d in split_info(out, s)["documents"]) for s in list_splits(out)}
    assert by["val"] == {"sotu": 11} and by["test_sotu"] == {"sotu": 10}  # 2001-2011 | 2012-2021
    assert by["test_moby_dick"] == {"moby_dick": 136}  # 135 chapters and the epilogue
    assert by["eval_shakespeare"] == {"shakespeare": 6}
    assert by["eval_brown_fiction"]["brown"] + by["eval_brown_nonfiction"]["brown"] == 500
    assert by["train"]["sotu"] == 212 and by["train"]["shakespeare"] == 36 and "brown" not in by["train"]
    assert by["train"]["pydoc"] + by["eval_pydoc"]["pydoc"] == m["sources"][3]["documents"]
    assert m["splits"]["train"]["tokens"] > 5_000_000 and m["tokenizer"]["vocab_size"] == 8192


def test_no_document_in_two_splits(starter):
    out, _ = starter
    infos = {s: split_info(out, s)["documents"] for s in list_splits(out)}
    check_disjoint(infos)
    ids = [d["id"] for docs in infos.values() for d in docs]
    shas = [d["sha256"] for docs in infos.values() for d in docs]
    assert len(ids) == len(set(ids)) and len(shas) == len(set(shas))


def test_stored_tokens_decode_to_the_source_text(starter):
    out, m = starter
    tok = load_tokenizer(out)
    src = SOURCES["sotu"]()
    want = {d.id: clean_text(d.text) for d in src.documents(src.fetch(CACHE)) if d.meta["year"] >= 2001}
    toks = open_tokens(out, "val")
    for rec in split_info(out, "val")["documents"]:
        assert tok.decode(toks[rec["offset"] : rec["offset"] + rec["tokens"]]) == want[rec["id"]]


def test_rerun_is_a_noop(starter):
    out, m = starter
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    t0 = time.perf_counter()
    assert prepare(out, CACHE, log=lambda *_: None) == m
    assert time.perf_counter() - t0 < 10
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before
