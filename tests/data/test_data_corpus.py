"""prepare() on fake sources: splits by document, disjointness, dedupe, manifest, no-op re-run."""

import pytest
from data_fakes import FakeSource, fake_text

from peer.data import (
    DataError,
    Document,
    check_disjoint,
    corpus_is_complete,
    eval_splits,
    load_tokenizer,
    open_tokens,
    prepare,
    split_info,
)


def build(tmp_path, sources, **kw):
    return prepare(
        tmp_path / "corpus",
        tmp_path / "cache",
        vocab_size=kw.pop("vocab_size", 300),
        sources=sources,
        log=lambda *_: None,
        **kw,
    )


def test_prepare_splits_by_document(tmp_path, fake_source):
    m = build(tmp_path, [fake_source])
    out = tmp_path / "corpus"
    assert eval_splits(out) == ["val", "eval_other"]
    assert {k: v["documents"] for k, v in m["splits"].items()} == {"train": 12, "val": 3, "eval_other": 2}
    tok = load_tokenizer(out)
    texts = {f"fake/{n}": t for n, _, t in fake_source.docs}
    for split in ("train", "val", "eval_other"):
        toks, info = open_tokens(out, split), split_info(out, split)
        assert m["splits"][split]["tokens"] == len(toks) == info["num_tokens"]
        for rec in info["documents"]:  # every stored document decodes to its source text, EOS after it
            o, n = rec["offset"], rec["tokens"]
            assert tok.decode(toks[o : o + n]) == texts[rec["id"]] and toks[o + n] == tok.eos_id
    assert m["splits"]["train"]["source_tokens"] == {"fake": m["splits"]["train"]["tokens"]}
    src = m["sources"][0]
    assert src["name"] == "fake" and src["license"] == "CC0-1.0" and len(src["sha256"]) == 64
    assert src["documents"] == 17 and m["tokenizer"]["vocab_size"] == 300


def test_split_files_are_disjoint(tmp_path, fake_source):
    build(tmp_path, [fake_source])
    infos = {s: split_info(tmp_path / "corpus", s)["documents"] for s in ("train", "val", "eval_other")}
    check_disjoint(infos)  # by id and by content hash
    ids = [d["id"] for docs in infos.values() for d in docs]
    hashes = [d["sha256"] for docs in infos.values() for d in docs]
    assert len(ids) == len(set(ids)) == 17 and len(hashes) == len(set(hashes))


def test_duplicate_text_is_kept_only_in_evaluation(tmp_path):
    shared = fake_text(999)
    src = FakeSource(
        [
            ("a", "train", fake_text(1)),
            ("b", "train", shared),
            ("c", "train", shared),
            ("d", "val", fake_text(2)),
            ("e", "eval_x", shared + "\n"),
        ]
    )  # equal after cleaning
    m = build(tmp_path, [src])
    assert m["duplicates_dropped"] == {"val": 0, "eval_x": 0, "train": 2}
    assert [d["id"] for d in split_info(tmp_path / "corpus", "train")["documents"]] == ["fake/a"]
    assert [d["id"] for d in split_info(tmp_path / "corpus", "eval_x")["documents"]] == ["fake/e"]


def test_check_disjoint_catches_overlap():
    a, b = Document("x/1", "same text"), Document("x/2", "same text")
    with pytest.raises(DataError, match="splits 'train' and 'val' share a document \\(sha256:"):
        check_disjoint({"train": [a], "val": [b]})
    with pytest.raises(DataError, match="id:x/1"):
        check_disjoint({"train": [{"id": "x/1", "sha256": "1"}], "val": [{"id": "x/1", "sha256": "2"}]})
    check_disjoint({"train": [a, Document("x/3", "other")], "val": [Document("x/4", "more")]})


def test_bad_sources(tmp_path):
    with pytest.raises(DataError, match=r"split 'test' of 'fake/a' is not train, val, eval_\* or test_\*"):
        build(tmp_path, [FakeSource([("a", "test", "text")])])
    with pytest.raises(DataError, match="document id 'fake/a' occurs twice"):
        build(tmp_path, [FakeSource([("a", "train", "x y"), ("a", "val", "z")])])
    with pytest.raises(DataError, match="unknown source"):
        build(tmp_path, "sotu,nope")


def snapshot(d):
    return {
        p.relative_to(d).as_posix(): (p.stat().st_mtime_ns, p.read_bytes()) for p in sorted(d.rglob("*")) if p.is_file()
    }


def test_rerun_is_a_noop(tmp_path):
    src = FakeSource()
    build(tmp_path, [src])
    before = snapshot(tmp_path / "corpus")
    src2 = FakeSource()
    build(tmp_path, [src2])
    assert src2.fetch_calls == 0  # nothing fetched, read or written
    assert snapshot(tmp_path / "corpus") == before
    assert corpus_is_complete(tmp_path / "corpus")


def test_rebuild_when_recipe_or_files_change(tmp_path):
    build(tmp_path, [FakeSource()])
    out = tmp_path / "corpus"
    m = build(tmp_path, [FakeSource()], vocab_size=280)  # another recipe: rebuilt
    assert m["tokenizer"]["vocab_size"] == 280 and load_tokenizer(out).vocab_size == 280
    with open(out / "splits" / "val.bin", "r+b") as f:  # a damaged file: rebuilt
        f.truncate(10)
    assert not corpus_is_complete(out)
    src = FakeSource()
    build(tmp_path, [src], vocab_size=280)
    assert src.fetch_calls == 1 and corpus_is_complete(out)
    # fewer splits than before: the stale split files go away
    fewer = FakeSource([("a", "train", fake_text(1)), ("b", "val", fake_text(2))])
    fewer.version = "2.0"  # the recipe names source versions, not contents
    build(tmp_path, [fewer], vocab_size=280)
    assert sorted(p.name for p in (out / "splits").iterdir()) == ["train.bin", "train.json", "val.bin", "val.json"]


def test_user_tokenizer(tmp_path, tiny_tokenizer):
    tiny_tokenizer.save(tmp_path / "mine.json")
    m = build(tmp_path, [FakeSource()], tokenizer=tmp_path / "mine.json")
    assert m["tokenizer"]["trained"] is False and m["tokenizer"]["vocab_size"] == 300
    assert (tmp_path / "corpus" / "tokenizer.json").read_text() == (tmp_path / "mine.json").read_text()
    text = fake_text(0)
    toks = open_tokens(tmp_path / "corpus", "train")
    n = split_info(tmp_path / "corpus", "train")["documents"][0]["tokens"]
    assert toks[:n].tolist() == tiny_tokenizer.encode(text)
