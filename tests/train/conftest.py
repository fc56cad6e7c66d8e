"""Fixtures for the training tests: a tiny synthetic corpus and the tiny preset pointed at it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from peer.config import load_config

ROOT = Path(__file__).resolve().parents[2]
VOCAB = 64


def make_corpus(path: Path, seed: int = 0, train_docs: int = 12, val_docs: int = 3) -> Path:
    """A corpus dir in the layout of docs/CONTRACTS.md: random documents over ids 1..VOCAB-1, EOS = 0.

    Documents are random walks (id + small steps) so that there is something to learn.
    """
    from peer.data.tokens import write_split

    rng = np.random.default_rng(seed)

    def doc():
        n = int(rng.integers(40, 90))
        return list((np.cumsum(rng.integers(-2, 3, n)) % (VOCAB - 1) + 1).astype(int))

    for split, n in (("train", train_docs), ("val", val_docs)):
        docs = [doc() for _ in range(n)]
        write_split(path, split, [f"{split}/{i}" for i in range(n)], docs, eos_id=0, vocab_size=VOCAB)
    return path


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> Path:
    return make_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture
def tiny(tmp_path, corpus):
    """``tiny(*overrides)`` -> Config from configs/tiny.toml on the synthetic corpus, run dir in tmp_path."""

    def make(*overrides: str, out: str = "run"):
        return load_config(
            ROOT / "configs" / "tiny.toml",
            [
                f"data.corpus='{corpus}'",
                f"train.out_dir='{tmp_path / out}'",
                f"model.vocab_size={VOCAB}",
                "train.progress=false",
                "train.tensorboard=false",
                "train.threads=1",
                *overrides,
            ],
        )

    return make
