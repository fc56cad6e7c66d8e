"""Fine-tuning (the lifelong-learning moonshot's mechanism, issue 29): ``train.init_from`` starts a new run
from another run's weights; ``train.trainable = "experts"`` trains only the expert tables, and with
``optim.sparse_experts`` only the rows a step retrieved (sparse memory fine-tuning)."""

from __future__ import annotations

import pytest
import torch

from peer.config import ConfigError
from peer.train import load_run, train
from peer.train.loop import Trainer


def test_init_from_starts_from_the_source_weights(tiny):
    src = train(tiny("train.steps=3", out="src"))
    source, _, _ = load_run(src)
    trainer = Trainer(tiny("train.steps=2", f"train.init_from='{src}'", out="ft"))
    try:
        got = trainer.model.state_dict()
        assert trainer.start == 0  # a new run: step 0, a fresh optimizer
        for k, v in source.state_dict().items():
            assert torch.equal(got[k], v), k
    finally:
        trainer.close()
    fresh = Trainer(tiny("train.steps=2", out="fresh"))
    try:  # without init_from: the seed's initialisation, not the source's weights
        assert not all(torch.equal(fresh.model.state_dict()[k], v) for k, v in source.state_dict().items())
    finally:
        fresh.close()


def test_a_missing_source_fails_before_the_run_folder_exists(tiny, tmp_path):
    with pytest.raises(ConfigError, match="train.init_from"):
        train(tiny("train.steps=2", f"train.init_from='{tmp_path / 'nope'}'", out="ft"))
    assert not (tmp_path / "ft").exists()


def test_trainable_experts_changes_only_the_retrieved_rows(tiny):
    src = train(tiny("train.steps=3", "model.sparse_layer=peer", out="src"))
    source, _, _ = load_run(src)
    ft = train(
        tiny(
            "train.steps=3",
            "model.sparse_layer=peer",
            f"train.init_from='{src}'",
            "train.trainable='experts'",
            "optim.sparse_experts=true",
            out="ft",
        )
    )
    tuned, _, _ = load_run(ft)
    before, after = source.state_dict(), tuned.state_dict()
    tables = {n for n, m in tuned.sparse_layers().items() for n in (f"{n}.u", f"{n}.v")}
    for k in before:
        if k in tables:
            rows = (after[k] != before[k]).any(dim=1)
            assert 0 < int(rows.sum()) < rows.numel(), k  # some rows moved, not all: only those retrieved
        else:
            assert torch.equal(after[k], before[k]), k  # frozen, the query BatchNorm's statistics included


def test_trainable_experts_needs_expert_tables(tiny):
    with pytest.raises(ConfigError, match="train.trainable"):
        tiny("train.trainable='experts'", "model.sparse_layer=none")


def test_expert_rows_trains_only_the_rows_the_data_retrieves_above_the_background(tiny, corpus):
    src = train(tiny("train.steps=3", "model.sparse_layer=peer", out="src"))
    source, _, _ = load_run(src)
    ft = train(
        tiny(
            "train.steps=3",
            "model.sparse_layer=peer",
            f"train.init_from='{src}'",
            "train.trainable='experts'",
            "optim.sparse_experts=true",
            "train.expert_rows=5",
            f"train.background='{corpus}'",
            out="ft",
        )
    )
    keep = torch.load(ft / "expert_rows.pt")
    tuned, _, _ = load_run(ft)
    before, after = source.state_dict(), tuned.state_dict()
    assert set(keep) == set(tuned.sparse_layers())
    for name, rows in keep.items():
        assert rows.numel() == 5
        for t in ("u", "v"):
            moved = (after[f"{name}.{t}"] != before[f"{name}.{t}"]).any(dim=1).nonzero().flatten()
            assert 0 < moved.numel() and set(moved.tolist()) <= set(rows.tolist()), (name, t)


def test_expert_rows_needs_its_settings(tiny):
    with pytest.raises(ConfigError, match="train.expert_rows"):
        tiny("model.sparse_layer=peer", "train.trainable='experts'", "train.expert_rows=5")
