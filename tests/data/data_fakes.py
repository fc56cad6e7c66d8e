"""Fakes for the data tests: generated text and a source that needs no network."""

from __future__ import annotations

import random
import subprocess
from pathlib import Path

from peer.data import Document, Source

WORDS = (
    "the of and to a in that is was he for it with as his on be at by this had not are but from or "
    "have an they which one you were her all she there would their we him been has when who will "
    "more no if out so said what up its about into than them can only other new some could time "
    "these two may then do first any my now such like our over man me even most made after also "
    "did many before must through back years where much your way well down should because each "
    "union congress nation people government states year war peace law power public country"
).split()


def fake_text(seed: int, n_words: int = 200) -> str:
    rng = random.Random(seed)
    sents = []
    while n_words > 0:
        k = rng.randint(5, 15)
        words = [rng.choice(WORDS) for _ in range(k)]
        sents.append(" ".join(words).capitalize() + rng.choice([".", ".", "?", "!"]))
        n_words -= k
    paras = [" ".join(sents[i : i + 4]) for i in range(0, len(sents), 4)]
    return "\n\n".join(paras)


class FakeSource(Source):
    """Documents from memory; ``fetch`` writes a small archive once and counts its calls."""

    name, package, version, license = "fake", "fake-pkg", "1.0", "CC0-1.0"
    archive_glob = "fake-*.txt"

    def __init__(self, docs: list[tuple[str, str, str]] | None = None, name: str = "fake"):
        self.name = name
        # (doc name, split, text)
        self.docs = (
            docs
            if docs is not None
            else (
                [(f"t{i}", "train", fake_text(i)) for i in range(12)]
                + [(f"v{i}", "val", fake_text(100 + i)) for i in range(3)]
                + [(f"e{i}", "eval_other", fake_text(200 + i)) for i in range(2)]
            )
        )
        self.fetch_calls = 0

    def fetch(self, cache_dir):
        self.fetch_calls += 1
        path = Path(cache_dir) / self.name / "fake-1.0.txt"
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("\n".join(n for n, _, _ in self.docs))
        return path

    def documents(self, archive):
        for name, split, text in self.docs:
            yield Document(f"{self.name}/{name}", text, {"split": split})

    def split(self, doc):
        return doc.meta["split"]

    def split_rule(self):
        return "split from meta"


def build_deb(tmp_path: Path, package: str, version: str, files: dict[str, str]) -> Path:
    """A Debian package ``<package>_<version>_all.deb`` in ``tmp_path`` holding ``files`` (path -> text),
    built with ``dpkg-deb`` (the tests that call it skip without it)."""
    root = tmp_path / f"{package}-root"
    (root / "DEBIAN").mkdir(parents=True)
    (root / "DEBIAN" / "control").write_text(
        f"Package: {package}\nVersion: {version}\nArchitecture: all\nMaintainer: x <x@y.z>\nDescription: test\n"
    )
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    deb = tmp_path / f"{package}_{version}_all.deb"
    subprocess.run(["dpkg-deb", "--build", "--root-owner-group", str(root), str(deb)], check=True, capture_output=True)
    return deb
