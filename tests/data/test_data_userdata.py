"""User text: files, directories, JSONL, hf: datasets; bad input errors; the tokenize command."""

import sys
import types

import numpy as np
import pytest
from data_fakes import fake_text

from peer.cli import main as peer_main
from peer.data import (
    DataError,
    build_corpus,
    encode_texts,
    list_splits,
    load_manifest,
    load_tokenizer,
    open_tokens,
    read_documents,
    split_info,
)
from peer.data.userdata import split_train_val


def write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    (path.write_bytes if isinstance(text, bytes) else path.write_text)(text)
    return path


def test_directory_walk_and_empty_files(tmp_path, capsys):
    write(tmp_path / "d/b.txt", "bee")
    write(tmp_path / "d/sub/a.md", "ay")
    write(tmp_path / "d/sub/c.rst", "sea")
    write(tmp_path / "d/skip.py", "not text")
    write(tmp_path / "d/empty.txt", "  \n")
    docs = read_documents(tmp_path / "d")
    assert [d.text for d in docs] == ["bee", "ay", "sea"]
    err = capsys.readouterr().err
    assert "skipped 1 empty file(s)" in err and "empty.txt" in err
    write(tmp_path / "e/empty.txt", "")
    with pytest.raises(DataError, match=r"e: no text in this directory .*1 found, 1 empty"):
        read_documents(tmp_path / "e")


def test_empty_file_named_explicitly(tmp_path):
    write(tmp_path / "ok.txt", "text")
    write(tmp_path / "empty.txt", "\n\n")
    with pytest.raises(DataError, match=r"empty\.txt: file is empty"):
        read_documents([tmp_path / "ok.txt", tmp_path / "empty.txt"])
    with pytest.raises(FileNotFoundError, match="missing.txt does not exist"):
        read_documents(tmp_path / "missing.txt")


def test_non_utf8_names_file_and_offset(tmp_path):
    bad = write(tmp_path / "bad.txt", "héllo ".encode() + b"\xff\xfe rest")
    with pytest.raises(DataError, match=r"bad\.txt: not valid UTF-8 at byte offset 7 \(byte 0xff\).*--replace-errors"):
        read_documents(bad)
    assert read_documents(bad, replace_errors=True)[0].text == "héllo \ufffd\ufffd rest"
    bom = write(tmp_path / "bom.txt", b"\xef\xbb\xbfab\xc3")
    with pytest.raises(DataError, match="byte offset 5"):  # offsets count the BOM
        read_documents(bom)


def test_jsonl(tmp_path):
    f = write(tmp_path / "x.jsonl", '{"text": "one"}\n\n{"text": "two", "id": 2}\n{"text": ""}\n')
    assert [(d.id.rsplit(":", 1)[1], d.text) for d in read_documents(f)] == [("1", "one"), ("3", "two")]
    g = write(tmp_path / "y.jsonl", '{"body": "one"}\n')
    with pytest.raises(DataError, match=r"y\.jsonl:1: no string field 'text' \(choose the field with --text-field\)"):
        read_documents(g)
    assert read_documents(g, text_field="body")[0].text == "one"
    h = write(tmp_path / "z.jsonl", '{"text": "ok"}\n{"text": broken\n')
    with pytest.raises(DataError, match=r"z\.jsonl:2: not valid JSON"):
        read_documents(h)


def test_split_train_val():
    from peer.data import Document

    docs = [Document(str(i), f"doc {i}") for i in range(20)]
    s = split_train_val(docs, 0.1, seed=0)
    assert len(s["val"]) == 2 and len(s["train"]) == 18
    assert {d.id for d in s["train"]} | {d.id for d in s["val"]} == {d.id for d in docs}
    assert not {d.id for d in s["train"]} & {d.id for d in s["val"]}
    assert [d.id for d in split_train_val(docs, 0.1, seed=0)["val"]] == [d.id for d in s["val"]]
    one = Document("f", "line one\nline two\nline three\nline four\nline five\n")
    s = split_train_val([one], 0.2)
    assert s["train"][0].text + s["val"][0].text == one.text
    assert s["val"][0].text == "line five\n" and s["val"][0].id == "f#val"


def test_build_corpus_and_cli(tmp_path, capsys):
    for i in range(6):
        write(tmp_path / f"in/doc{i}.txt", fake_text(i, 300))
    m = build_corpus(
        [tmp_path / "in"], tmp_path / "c", vocab_size=300, val_fraction=0.2, min_tokens=100, log=lambda *_: None
    )
    assert list_splits(tmp_path / "c") == ["train", "val"]
    assert m["splits"]["train"]["documents"] == 5 and m["splits"]["val"]["documents"] == 1
    tok = load_tokenizer(tmp_path / "c")
    val = split_info(tmp_path / "c", "val")["documents"][0]
    toks = open_tokens(tmp_path / "c", "val")
    assert tok.decode(toks[: val["tokens"]]) == (tmp_path / val["id"].split(str(tmp_path) + "/")[1]).read_text()
    # the CLI: reuse the tokenizer; a too-small corpus is an error with exit code 2
    rc = peer_main(
        [
            "data",
            "tokenize",
            str(tmp_path / "in" / "doc0.txt"),
            "--out",
            str(tmp_path / "c2"),
            "--tokenizer",
            str(tmp_path / "c"),
            "--min-tokens",
            "50",
        ]
    )
    assert rc == 0 and load_manifest(tmp_path / "c2")["tokenizer"]["trained"] is False
    assert [d["id"] for d in split_info(tmp_path / "c2", "val")["documents"]][0].endswith("doc0.txt#val")
    rc = peer_main(
        [
            "data",
            "tokenize",
            str(tmp_path / "in" / "doc0.txt"),
            "--out",
            str(tmp_path / "c3"),
            "--tokenizer",
            str(tmp_path / "c"),
        ]
    )
    assert rc == 2 and "corpus too small: the train split has" in capsys.readouterr().err
    assert not (tmp_path / "c3").exists()  # nothing written


def test_encode_texts(tmp_path, tiny_tokenizer):
    a = write(tmp_path / "a.txt", "first document")
    b = write(tmp_path / "b.jsonl", '{"text": "second"}\n{"text": "third"}\n')
    arr = encode_texts([a, b], tiny_tokenizer)
    eos = tiny_tokenizer.eos_id
    want = []
    for t in ("first document", "second", "third"):
        want += tiny_tokenizer.encode(t) + [eos]
    assert arr.dtype == np.int64 and arr.tolist() == want


class FakeDatasets(types.ModuleType):
    def __init__(self):
        super().__init__("datasets")
        self.calls = []

    def load_dataset(self, name, config, split, streaming):
        self.calls.append((name, config, split, streaming))
        return iter([{"text": fake_text(i, 200)} for i in range(30)] + [{"text": ""}])


def test_hf_input(tmp_path, monkeypatch):
    fake = FakeDatasets()
    monkeypatch.setitem(sys.modules, "datasets", fake)
    docs = read_documents("hf:wikitext:wikitext-2-raw-v1@validation", max_docs=12)
    assert fake.calls == [("wikitext", "wikitext-2-raw-v1", "validation", True)]
    assert len(docs) == 12 and docs[0].text == fake_text(0, 200)
    with pytest.raises(DataError, match="record 0 has no string field 'body'"):
        read_documents("hf:x", text_field="body")


def test_hf_without_datasets(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # import raises ImportError
    with pytest.raises(DataError, match=r"needs the `datasets` package \(pip install datasets\)"):
        read_documents("hf:wikitext")


def test_split_is_bounded_by_size_not_document_count():
    """A few documents of very different sizes: val gets at most val_fraction of the text (by
    count, one of four documents could be the big one and hold ~95% of it)."""
    from peer.data.sources import Document

    big = Document("big", "word " * 20000)
    small = [Document(f"s{i}", "tiny text here. " * 20) for i in range(3)]
    for seed in range(6):
        s = split_train_val([big, *small], 0.1, seed=seed)
        val = sum(len(d.text) for d in s["val"])
        total = sum(len(d.text) for d in [big, *small])
        assert 0 < val <= 0.1 * total + 1
    # no whole document fits in 10%: the largest is cut, nothing is lost
    two = [Document("a", "alpha beta. " * 500), Document("b", "gamma delta. " * 600)]
    s = split_train_val(two, 0.1)
    assert [d.id for d in s["val"]] == ["b#val"]
    assert sum(len(d.text) for d in s["train"] + s["val"]) == sum(len(d.text) for d in two)
