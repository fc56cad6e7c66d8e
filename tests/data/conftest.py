"""Fixtures for the data tests: a fake source (no network) and a tiny tokenizer."""

import pytest
from data_fakes import FakeSource, fake_text

from peer.data import train_tokenizer


@pytest.fixture
def fake_source():
    return FakeSource()


@pytest.fixture(scope="session")
def tiny_tokenizer():
    """A byte-level BPE with a 300-id vocabulary, trained on a few KB."""
    return train_tokenizer([fake_text(i) for i in range(20)] + ["héllo wörld — naïve café ✓ 日本語 😀"], vocab_size=300)
