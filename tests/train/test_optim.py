"""Parameter groups: every trainable tensor in exactly one group, with its group's lr multiplier and decay."""

import math
from pathlib import Path

import pytest
import torch

from peer.config import load_config
from peer.model import PeerLM
from peer.train.optim import build_optimizer, param_groups
from peer.train.schedule import Schedule

ROOT = Path(__file__).resolve().parents[2]


def _cfg(*overrides):
    return load_config(ROOT / "configs" / "tiny.toml", ["model.vocab_size=8192", *overrides])


def _groups_by_name(groups):
    return {g["name"]: g for g in groups}


@pytest.mark.parametrize("layer", ["none", "peer", "pkm", "moe"])
def test_each_parameter_in_exactly_one_group(layer):
    cfg = _cfg(f"model.sparse_layer={layer}")
    torch.manual_seed(0)
    model = PeerLM(cfg.model)
    groups = param_groups(model, cfg.optim)
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids))
    assert set(ids) == {id(p) for p in model.parameters() if p.requires_grad}
    by = _groups_by_name(groups)
    # the tied embedding / lm_head matrix appears once, in the decayed group
    assert any(p is model.tok_emb.weight for p in by["decay"]["params"])
    assert all(p.ndim < 2 for p in by["no_decay"]["params"])
    assert by["no_decay"]["weight_decay"] == 0.0


def test_peer_tables_and_keys_get_their_settings():
    cfg = _cfg(
        "model.sparse_layer=peer",
        "optim.expert_lr_mult=5.0",
        "optim.expert_weight_decay=0.01",
        "optim.key_lr_mult=0.5",
        "optim.key_weight_decay=0.0",
        "optim.weight_decay=0.1",
        "optim.lr=1e-3",
    )
    model = PeerLM(cfg.model)
    peer = model.sparse_layers()["blocks.1.ffn"]
    by = _groups_by_name(param_groups(model, cfg.optim))
    experts = {id(p) for p in by["experts"]["params"]}
    assert experts == {id(peer.u), id(peer.v)}
    assert [id(p) for p in by["keys"]["params"]] == [id(peer.index.keys)]
    assert by["experts"]["lr_mult"] == 5.0 and by["experts"]["weight_decay"] == 0.01
    assert by["experts"]["lr"] == pytest.approx(5e-3)
    assert by["keys"]["lr_mult"] == 0.5 and by["keys"]["weight_decay"] == 0.0
    assert by["decay"]["weight_decay"] == 0.1
    # BatchNorm affine parameters of the query network are vectors: no decay
    assert id(peer.query_norm.weight) in {id(p) for p in by["no_decay"]["params"]}
    assert id(peer.query_proj.weight) in {id(p) for p in by["decay"]["params"]}


def test_pkm_values_are_expert_tables():
    cfg = _cfg("model.sparse_layer=pkm")
    model = PeerLM(cfg.model)
    by = _groups_by_name(param_groups(model, cfg.optim))
    assert "experts" in by and "keys" in by
    (pkm,) = model.sparse_layers().values()
    assert [id(p) for p in by["experts"]["params"]] == [id(pkm.values)]
    assert [id(p) for p in by["keys"]["params"]] == [id(pkm.index.keys)]


def test_multipliers_act_on_the_update():
    """expert_lr_mult=0 freezes u and v while the rest of the model moves (schedule applied)."""
    cfg = _cfg("model.sparse_layer=peer", "optim.expert_lr_mult=0.0", "optim.expert_weight_decay=0.0")
    torch.manual_seed(0)
    model = PeerLM(cfg.model)
    opt = build_optimizer(model, cfg.optim)
    Schedule.from_config(cfg.optim, 10).apply(opt, 3)
    peer = model.sparse_layers()["blocks.1.ffn"]
    u0, v0, w0 = peer.u.detach().clone(), peer.v.detach().clone(), model.tok_emb.weight.detach().clone()
    x = torch.randint(0, cfg.model.vocab_size, (2, 16))
    model(x, x).loss.backward()
    assert peer.u.grad is not None and peer.u.grad.abs().sum() > 0
    opt.step()
    assert torch.equal(peer.u, u0) and torch.equal(peer.v, v0)
    assert not torch.equal(model.tok_emb.weight, w0)


def test_fused_adamw_on_cpu_and_fallback_flag():
    cfg = _cfg()
    model = PeerLM(cfg.model)
    assert build_optimizer(model, cfg.optim).defaults.get("fused") is True
    cfg = _cfg("optim.fused=false")
    assert not build_optimizer(model, cfg.optim).defaults.get("fused")


def test_sparse_experts_uses_row_wise_optimizer_when_available():
    from peer.train.optim import MultiOptimizer

    cfg = _cfg("model.sparse_layer=peer", "optim.sparse_experts=true")
    model = PeerLM(cfg.model)
    opt = build_optimizer(model, cfg.optim)
    assert isinstance(opt, MultiOptimizer)
    names = [g["name"] for g in opt.param_groups]
    assert sorted(names) == sorted(set(names)) and "experts" in names
    peer = model.sparse_layers()["blocks.1.ffn"]
    x = torch.randint(0, cfg.model.vocab_size, (2, 16))
    model(x, x).loss.backward()
    if peer.u.grad.is_sparse:  # the fused kernel hands row gradients to the row-wise optimizer
        rows = peer.u.grad.coalesce().indices()[0]
        assert 0 < rows.numel() <= 2 * 16 * cfg.model.peer.heads * cfg.model.peer.topk
    u0 = peer.u.detach().clone()
    opt.step()
    changed = (peer.u != u0).any(dim=1)
    assert changed.any()
    if peer.u.grad.is_sparse:
        assert set(changed.nonzero().flatten().tolist()) <= set(peer.u.grad.coalesce().indices()[0].tolist())


@pytest.mark.parametrize("max_norm", [0.5, math.inf])
def test_clip_grad_norm_with_sparse_row_gradients_matches_dense(max_norm):
    from peer.train.optim import clip_grad_norm

    torch.manual_seed(0)
    table, w = torch.nn.Parameter(torch.randn(10, 4)), torch.nn.Parameter(torch.randn(3, 4))
    rows = torch.tensor([[1, 7, 1]])  # row 1 twice: uncoalesced
    sparse = torch.sparse_coo_tensor(rows, torch.randn(3, 4), (10, 4), check_invariants=True)
    dense_w = torch.randn(3, 4)
    table.grad, w.grad = sparse.clone(), dense_w.clone()
    ref_t, ref_w = torch.nn.Parameter(table.detach().clone()), torch.nn.Parameter(w.detach().clone())
    ref_t.grad, ref_w.grad = sparse.to_dense(), dense_w.clone()
    n_ref = torch.nn.utils.clip_grad_norm_([ref_t, ref_w], max_norm)
    n = clip_grad_norm([table, w], max_norm)
    assert n.item() == pytest.approx(n_ref.item(), rel=1e-6)
    assert torch.allclose(table.grad.to_dense(), ref_t.grad, atol=1e-6)
    assert torch.allclose(w.grad, ref_w.grad, atol=1e-6)
