"""Construction on the meta device: meta -> (shard) -> to_empty -> init_weights gives exactly the eagerly
built model under the same seed, for every sparse layer and placement; the chunked table init that
lets an expert-parallel rank draw only its rows equals one normal_ call."""

import pytest
import torch

from peer.config import ModelConfig, MoEConfig, PEERConfig, PKMConfig
from peer.layers import PEER
from peer.layers.peer import normal_rows_
from peer.model import PeerLM

BASE = dict(vocab_size=96, d_model=32, n_layers=4, n_heads=2, d_ff=64, max_seq_len=16)
PEER_CFG = PEERConfig(num_experts=64, heads=2, topk=4, key_dim=8, value_init_scale=0.03)
CASES = {
    "dense": ModelConfig(**BASE),
    "peer": ModelConfig(**BASE, sparse_layer="peer", peer=PEER_CFG),
    "peer-glu-untied": ModelConfig(
        **BASE,
        sparse_layer="peer",
        tie_embeddings=False,
        peer=PEERConfig(num_experts=64, heads=2, topk=4, key_dim=8, glu=True),
    ),
    "peer-every2-shared": ModelConfig(
        **BASE, sparse_layer="peer", sparse_blocks="every:2", share_experts=True, peer=PEER_CFG
    ),
    "peer-beside": ModelConfig(**BASE, sparse_layer="peer", sparse_placement="beside", peer=PEER_CFG),
    "pkm-shared": ModelConfig(
        **BASE,
        sparse_layer="pkm",
        sparse_blocks="all",
        share_experts=True,
        pkm=PKMConfig(num_memories=64, heads=2, topk=4, key_dim=8),
    ),
    "moe": ModelConfig(**BASE, sparse_layer="moe", moe=MoEConfig(num_experts=4)),
    "peer-lora-swiglu": ModelConfig(**BASE, sparse_layer="peer", peer=PEER_CFG, lora_rank=3, ffn_activation="swiglu"),
}


def _state(model):
    return {**model.state_dict(), "rope_cos": model.rope_cos, "rope_sin": model.rope_sin}


@pytest.mark.parametrize("name", list(CASES))
def test_meta_then_init_weights_equals_eager_construction(name):
    cfg = CASES[name]
    torch.manual_seed(3)
    eager = PeerLM(cfg)
    meta = PeerLM(cfg, device="meta")
    assert all(p.is_meta for p in meta.parameters())
    meta.to_empty(device="cpu")
    torch.manual_seed(3)
    meta.init_weights()
    want, got = _state(eager), _state(meta)
    assert want.keys() == got.keys()
    for k in want:
        assert torch.equal(want[k], got[k]), k
    if cfg.tie_embeddings:
        assert meta.lm_head.weight is meta.tok_emb.weight
    if cfg.share_experts:
        layers = list(meta.sparse_layers().values())
        assert layers[1].index is layers[0].index
    # and the generator is left where eager construction leaves it
    torch.manual_seed(3)
    PeerLM(cfg)
    after_eager = torch.rand(4)
    torch.manual_seed(3)
    meta.init_weights()
    assert torch.equal(torch.rand(4), after_eager)


def test_init_weights_reinitialises_a_trained_model():
    cfg = CASES["peer"]
    torch.manual_seed(0)
    fresh = PeerLM(cfg)
    model = PeerLM(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    torch.manual_seed(0)
    model.init_weights()
    for (k, a), b in zip(fresh.state_dict().items(), model.state_dict().values(), strict=True):
        assert torch.equal(a, b), k


@pytest.mark.parametrize(
    "rows,cols,start,n",
    [
        (1000, 48, 0, 1000),
        (1000, 48, 300, 500),
        (333, 7, 331, 2),
        (100_001, 3, 99_990, 11),
        (5, 2, 1, 3),
        (70_000, 64, 65_536, 4464),
    ],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_normal_rows_equals_one_normal_call(rows, cols, start, n, dtype, monkeypatch):
    monkeypatch.setattr("peer.layers.peer._CHUNK_VALUES", 4096)  # many chunks, a ragged last one
    torch.manual_seed(1)
    full = torch.empty(rows, cols, dtype=dtype).normal_(0.0, 0.7)
    after = torch.rand(3)
    torch.manual_seed(1)
    out = torch.empty(n, cols, dtype=dtype)
    normal_rows_(out, 0.7, start, rows, cols)
    assert torch.equal(out, full[start : start + n])
    assert torch.equal(torch.rand(3), after)  # the generator advanced as by the whole table
    torch.manual_seed(1)
    normal_rows_(None, 0.7, 0, rows, cols, dtype)
    assert torch.equal(torch.rand(3), after)


def test_peer_layer_reset_parameters_replays_its_construction():
    kw = dict(dim=16, num_experts=49, heads=2, topk=3, key_dim=6, glu=True, query_norm="layernorm")
    torch.manual_seed(5)
    eager = PEER(**kw)
    meta = PEER(**kw, device="meta")
    assert meta.u.is_meta and meta.index.keys.is_meta and meta.query_proj.weight.is_meta
    meta.to_empty(device="cpu")
    torch.manual_seed(5)
    meta.reset_parameters()
    for (k, a), b in zip(eager.state_dict().items(), meta.state_dict().values(), strict=True):
        assert torch.equal(a, b), k
