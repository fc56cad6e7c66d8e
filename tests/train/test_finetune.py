"""Fine-tuning (the lifelong-learning moonshot's mechanism, issue 29): ``train.init_from`` starts a new run
from another run's weights; ``train.trainable = "experts"`` trains only the expert tables, and with
``optim.sparse_experts`` only the rows a step retrieved (sparse memory fine-tuning)."""

from __future__ import annotations

import json

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


def test_lora_fine_tuning_changes_only_the_factors_and_merges_exactly(tiny, tmp_path):
    from peer import count_params
    from peer.hf.export import export_run
    from peer.model import merge_lora

    src = train(tiny("train.steps=3", out="src"))
    source, _, _ = load_run(src)
    ft = train(
        tiny(
            "train.steps=3",
            "model.lora_rank=2",
            "model.lora_alpha=4",
            f"train.init_from='{src}'",
            "train.trainable='lora'",
            "optim.lr=0.05",
            out="ft",
        )
    )
    tuned, cfg, _ = load_run(ft)
    before, after = source.state_dict(), tuned.state_dict()
    lora = {k for k in after if k.endswith((".lora_a", ".lora_b"))}
    assert lora and set(after) - lora == set(before)
    assert all(torch.equal(after[k], before[k]) for k in before)  # the base weights stay what they were
    assert all(after[k].abs().sum() > 0 for k in lora if k.endswith(".lora_b"))  # B left zero: it learned
    assert sum(p.numel() for p in tuned.parameters()) == count_params(cfg.model).total
    x = torch.randint(0, cfg.model.vocab_size, (2, 16))
    merged = merge_lora(tuned.eval())
    assert merged.config.lora_rank == 0 and not any(k.endswith(".lora_a") for k in merged.state_dict())
    torch.testing.assert_close(merged(x).logits, tuned(x).logits, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(source.eval()(x).logits, tuned(x).logits)  # the fine-tune changed the function
    out = export_run(ft, tmp_path / "hf", tokenizer=False)  # exports as the plain model it equals
    from safetensors import safe_open

    assert json.loads((out / "config.json").read_text())["lora_rank"] == 0
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert not [k for k in f.keys() if "lora" in k]


def test_trainable_lora_needs_a_rank_and_a_lora_run_does_not_load_into_a_plain_model(tiny):
    with pytest.raises(ConfigError, match="model.lora_rank"):
        tiny("train.trainable='lora'")
    with pytest.raises(ConfigError, match="model.lora_rank"):
        tiny("model.lora_rank=-1")
    lora = train(tiny("train.steps=2", "model.lora_rank=2", out="lora"))
    with pytest.raises(ConfigError, match="lora_a"):  # the checkpoint has tensors a plain model does not
        train(tiny("train.steps=2", f"train.init_from='{lora}'", out="plain"))


def test_batch_row_selection_keeps_each_batchs_top_tf_idf_rows():
    from peer.config import ModelConfig, PEERConfig
    from peer.model import PeerLM
    from peer.train.memory_rows import BatchRows

    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=64, d_model=16, n_layers=2, n_heads=2, d_ff=32, max_seq_len=16, sparse_layer="peer",
                      peer=PEERConfig(num_experts=256, heads=2, topk=4, key_dim=8))  # fmt: skip
    model = PeerLM(cfg).train()
    ((name, layer),) = model.sparse_layers().items()
    idf = torch.rand(256, dtype=torch.float64)
    rows = BatchRows(model, {name: idf}, rows=5)
    for _ in range(2):  # each batch: its own rows
        x = torch.randint(0, 64, (2, 16))
        probe = PeerLM(cfg).train()  # the same forward again, counted, to know the batch's tf
        probe.load_state_dict(model.state_dict())
        ((_, pl),) = probe.sparse_layers().items()
        pl.record_usage = True
        probe(x)
        want = set((pl.usage * idf).topk(5).indices.tolist())
        model.zero_grad()
        model(x).logits.sum().backward()
        for t in (layer.u, layer.v):
            assert set(t.grad.abs().sum(dim=1).nonzero().flatten().tolist()) == want
    rows.close()
    model.zero_grad()
    model(x).logits.sum().backward()
    assert int((layer.u.grad.abs().sum(dim=1) > 0).sum()) > 5  # hooks gone: every retrieved row again


def test_row_selection_batch_trains_and_resumes_with_its_idf(tiny, corpus):
    src = train(tiny("train.steps=2", "model.sparse_layer=peer", out="src"))
    source, _, _ = load_run(src)
    sets = ["model.sparse_layer=peer", f"train.init_from='{src}'", "train.trainable='experts'",
            "optim.sparse_experts=true", "train.expert_rows=3", "train.row_selection='batch'",
            f"train.background='{corpus}'"]  # fmt: skip
    ft = train(tiny("train.steps=2", *sets, out="ft"))
    assert (ft / "expert_idf.pt").is_file() and not (ft / "expert_rows.pt").exists()
    tuned, _, _ = load_run(ft)
    for name in tuned.sparse_layers():
        moved = (tuned.state_dict()[f"{name}.u"] != source.state_dict()[f"{name}.u"]).any(dim=1)
        assert 0 < int(moved.sum()) <= 2 * 3  # two steps of at most 3 rows each
    with pytest.raises(ConfigError, match="train.row_selection"):
        tiny("model.sparse_layer=peer", "train.row_selection='batch'")


def test_sgd_on_the_expert_tables_moves_rows_by_the_gradient_alone(tiny):
    sets = ["model.sparse_layer=peer", "train.trainable='experts'", "optim.sparse_experts=true",
            "optim.expert_optimizer='sgd'", "optim.grad_clip=0", "optim.warmup_steps=0"]  # fmt: skip
    trainer = Trainer(tiny("train.steps=1", *sets, out="sgd"))
    try:
        (sgd,) = [o for o in trainer.optimizer.optimizers if isinstance(o, torch.optim.SGD)]
        assert all(g["name"] == "experts" for g in sgd.param_groups)
        layer = next(iter(trainer.model.sparse_layers().values()))
        before = layer.u.detach().clone()
        x, y = next(iter(trainer.data.batcher))
        trainer.optimizer.zero_grad()
        out = trainer.model(x, targets=y)
        out.loss.backward()
        g = layer.u.grad.to_dense()
        lr = sgd.param_groups[0]["lr"]
        trainer.optimizer.step()
        torch.testing.assert_close(layer.u.detach(), before - lr * g)  # no momentum, no decay, no scaling
        assert 0 < int((g.abs().sum(dim=1) > 0).sum()) < g.shape[0]
    finally:
        trainer.close()
    with pytest.raises(ConfigError, match="optim.expert_weight_decay"):
        tiny(*sets, "optim.expert_weight_decay=0.1")


def test_retrievals_counts_router_weight_and_batches_per_expert():
    from peer.config import ModelConfig, PEERConfig
    from peer.model import PeerLM
    from peer.train.memory_rows import background_idf, retrievals

    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=64, d_model=16, n_layers=2, n_heads=2, d_ff=32, max_seq_len=16, sparse_layer="peer",
                      peer=PEERConfig(num_experts=256, heads=2, topk=4, key_dim=8))  # fmt: skip
    model = PeerLM(cfg).train()
    batches = [(torch.randint(0, 64, (2, 16)), None) for _ in range(3)]
    ((name, (w, hits, count)),) = retrievals(model, batches).items()
    assert model.training and count == 3  # the mode is restored
    ones = [retrievals(model, [b])[name] for b in batches]
    assert torch.allclose(w, sum(o[0] for o in ones)) and torch.equal(hits, sum((o[0] > 0).double() for o in ones))
    # softmax router weights: each token's heads give weight 1 each over their top-k experts
    assert w.sum().item() == pytest.approx(3 * 2 * 16 * cfg.peer.heads, rel=1e-6)
    assert torch.allclose(background_idf(model, batches)[name], torch.log((1.0 + 3) / (1.0 + hits)))
