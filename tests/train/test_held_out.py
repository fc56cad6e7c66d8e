"""Held-out ``test_*`` splits: never trained or chosen on, scored only when asked (``peer eval --test``)."""

from __future__ import annotations

import json
import shutil

import pytest

from peer.cli import main
from peer.config import ConfigError
from peer.data.tokens import eval_splits, write_split
from peer.eval import evaluate
from peer.train import train
from tests.train.conftest import VOCAB


@pytest.fixture
def corpus_with_test(corpus, tmp_path):
    c = tmp_path / "corpus"
    shutil.copytree(corpus, c)
    write_split(c, "test_x", ["x/0"], [[(i % (VOCAB - 1)) + 1 for i in range(300)]], eos_id=0, vocab_size=VOCAB)
    return c


def test_test_splits_are_scored_only_on_request(tiny, corpus_with_test, capsys):
    assert "test_x" not in eval_splits(corpus_with_test)
    assert eval_splits(corpus_with_test, test=True)[-1] == "test_x"
    run = train(tiny("train.steps=2", f"data.corpus='{corpus_with_test}'"))
    assert "test_x" not in evaluate(run)["sets"]
    sets = evaluate(run, test=True)["sets"]
    assert "test_x" in sets and sets["test_x"]["tokens"] > 0
    assert main(["eval", str(run), "--json", "--no-progress", "--test"]) == 0
    assert "test_x" in json.loads(capsys.readouterr().out)["sets"]


@pytest.mark.parametrize("field", ["data.val_split", "data.train_split"])
def test_a_run_cannot_train_or_select_on_a_test_split(tiny, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.") + ".*test_"):
        tiny(f"{field}=test_x")
