"""PeerLM: loss at init, causality, KV-cache decoding, layer choice, aux losses, gradients, input checks."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from tiny_configs import tiny_model_config

from peer.config import ModelConfig
from peer.layers import PEER
from peer.layers.dense import DenseFFN
from peer.layers.moe import MoE
from peer.layers.pkm import PKM
from peer.model import KVCache, PeerLM

V, T = 64, 12


def tiny(sparse_layer="none", **kw) -> ModelConfig:
    return tiny_model_config(V, 16, (64, 2, 4, 8), sparse_layer, **kw)


def build(cfg, seed=0) -> PeerLM:
    torch.manual_seed(seed)
    return PeerLM(cfg)


def tokens(B=2, t=T, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, V, (B, t), generator=g)


# ------------------------------------------------------------------ loss
def test_loss_at_init_is_log_vocab():
    model = build(tiny())
    out = model(tokens(8), targets=tokens(8, seed=2))
    assert out.logits.shape == (8, T, V)
    assert abs(out.loss.item() - math.log(V)) < 0.05
    assert out.aux_loss.item() == 0.0


def test_loss_is_mean_ce_with_ignore_index():
    model = build(tiny())
    x, y = tokens(), tokens(seed=2)
    y[0, :5] = -100
    out = model(x, targets=y)
    keep = y != -100
    ce = F.cross_entropy(out.logits[keep], y[keep])
    torch.testing.assert_close(out.loss, ce)
    assert model(x).loss is None


# ------------------------------------------------------------------ causality
@pytest.mark.parametrize(
    "sparse,kw,train",
    [
        ("none", {}, True),
        ("peer", {"peer__query_norm": "layernorm"}, True),
        ("peer", {}, False),  # BatchNorm in eval mode: running statistics, per token
        ("pkm", {}, False),
        ("moe", {"moe__routing": "token_choice", "moe__topk": 2}, True),
    ],
)
def test_future_tokens_do_not_change_earlier_logits(sparse, kw, train):
    model = build(tiny(sparse, **kw)).train(train)
    x = tokens()
    x2 = x.clone()
    x2[:, 7] = (x2[:, 7] + 1) % V
    a, b = model(x).logits, model(x2).logits
    torch.testing.assert_close(a[:, :7], b[:, :7], rtol=0, atol=1e-6)
    assert (a[:, 7:] - b[:, 7:]).abs().max() > 1e-4  # the change does propagate forward


# ------------------------------------------------------------------ KV cache
@pytest.mark.parametrize("sparse", ["none", "peer", "pkm"])
def test_incremental_decoding_matches_full_forward(sparse):
    model = build(tiny(sparse)).eval()
    x = tokens(B=3, t=14)
    full = model(x).logits
    cache = model.new_kv_cache(batch_size=3, max_len=16)
    with torch.no_grad():
        pieces = [model(x[:, :5], kv_cache=cache).logits]  # prompt
        pieces += [model(x[:, t : t + 1], kv_cache=cache).logits for t in range(5, 9)]  # one token at a time
        pieces.append(model(x[:, 9:14], kv_cache=cache).logits)  # a chunk after a prefix (masked path)
    assert cache.length == 14
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, rtol=1e-4, atol=1e-5)


def test_kv_cache_checks_and_reset():
    model = build(tiny()).eval()
    with pytest.raises(ValueError, match="max_len"):
        model.new_kv_cache(1, max_len=17)
    cache = model.new_kv_cache(2, max_len=8)
    assert isinstance(cache, KVCache)
    with pytest.raises(ValueError, match="batch"):
        model(tokens(B=3, t=2), kv_cache=cache)
    model(tokens(t=6), kv_cache=cache)
    with pytest.raises(ValueError, match="do not fit"):
        model(tokens(t=3), kv_cache=cache)
    cache.reset()
    x = tokens(t=8)
    torch.testing.assert_close(model(x, kv_cache=cache).logits, model(x).logits)


# ------------------------------------------------------------------ layer choice
@pytest.mark.parametrize("sparse,cls", [("peer", PEER), ("pkm", PKM), ("moe", MoE)])
@pytest.mark.parametrize("blocks,ids", [("middle", [1]), ("all", [0, 1, 2]), ([0, 2], [0, 2])])
def test_sparse_blocks_get_the_sparse_layer(sparse, cls, blocks, ids):
    model = build(tiny(sparse, sparse_blocks=blocks))
    for i, block in enumerate(model.blocks):
        assert type(block.ffn) is (cls if i in ids else DenseFFN)
    layers = model.sparse_layers()
    assert list(layers) == [f"blocks.{i}.ffn" for i in ids]
    named = dict(model.named_modules())
    assert all(named[name] is mod for name, mod in layers.items())


@pytest.mark.parametrize(
    "blocks,n_layers,ids", [("every:2", 4, [1, 3]), ("every:3", 6, [2, 5]), ("every:1", 3, [0, 1, 2])]
)
def test_every_kth_block(blocks, n_layers, ids):
    cfg = tiny("peer", sparse_blocks=blocks, n_layers=n_layers)
    assert cfg.sparse_block_ids() == ids
    assert list(build(cfg).sparse_layers()) == [f"blocks.{i}.ffn" for i in ids]


def test_beside_placement_adds_the_sparse_output_to_the_ffw():
    """sparse_placement="beside": the block keeps its dense FFW and adds mem(norm2(x)) to it."""
    model = build(tiny("peer", sparse_placement="beside")).eval()
    block = model.blocks[1]
    assert type(block.ffn) is DenseFFN and type(block.mem) is PEER
    assert list(model.sparse_layers()) == ["blocks.1.mem"] and model.sparse_layers()["blocks.1.mem"] is block.mem
    assert all(b.mem is None for i, b in enumerate(model.blocks) if i != 1)
    x = torch.randn(2, T, 32)
    cos, sin = model.rope_cos[:T], model.rope_sin[:T]
    y, _ = block(x, cos, sin)
    a = x + block.attn(block.norm1(x), cos, sin)
    h = block.norm2(a)
    torch.testing.assert_close(y, a + block.ffn(h) + block.mem(h))
    assert not torch.allclose(y, a + block.ffn(h))  # the sparse layer contributes
    # its v is scaled like the dense FFW's output (1/sqrt(2L)) and the dense FFW keeps GPT-2 init
    ref = build(tiny("peer"))
    assert math.isclose(block.mem.v.std().item(), ref.blocks[1].ffn.v.std().item(), rel_tol=0.1)


@pytest.mark.parametrize("sparse", ["peer", "pkm"])
def test_shared_pool_is_one_tensor_stepped_once(sparse):
    cfg = tiny(sparse, sparse_blocks="all", share_experts=True)
    model = build(cfg)
    layers = list(model.sparse_layers().values())
    tables = ("u", "v") if sparse == "peer" else ("values",)
    for layer in layers[1:]:
        for t in tables:
            assert getattr(layer, t) is getattr(layers[0], t)
        assert layer.index is layers[0].index
        assert layer.query_proj is not layers[0].query_proj  # each block keeps its own query network
    # the shared output table got the 1/sqrt(2L) residual scaling once, not once per block
    ref = build(tiny(sparse, sparse_blocks="all"))
    t = tables[-1]
    torch.testing.assert_close(getattr(layers[0], t), getattr(ref.blocks[0].ffn, t))
    # one parameter in the model, gradients from every block
    n_unique = len({id(p) for p in model.parameters()})
    assert n_unique == len(list(model.parameters()))
    out = model(tokens(), tokens(seed=2))
    out.loss.backward()
    g_all = getattr(layers[0], t).grad.clone()
    model.zero_grad()
    for layer in layers[1:]:  # cut the other blocks' paths: the gradient shrinks
        layer.forward_with_aux = lambda x: (torch.zeros_like(x), None)
    model(tokens(), tokens(seed=2)).loss.backward()
    assert not torch.allclose(getattr(layers[0], t).grad, g_all)


def test_share_experts_needs_a_pool():
    from peer.config import Config, ConfigError, config_from_dict, config_to_dict

    d = config_to_dict(Config())
    d["model"].update(sparse_layer="moe", share_experts=True)
    with pytest.raises(ConfigError, match="model.share_experts"):
        config_from_dict(d)
    d["model"].update(sparse_layer="peer", sparse_blocks="every:9", share_experts=False)
    with pytest.raises(ConfigError, match="model.sparse_blocks"):
        config_from_dict(d)
    d["model"].update(sparse_blocks="every:x")
    with pytest.raises(ConfigError, match="model.sparse_blocks"):
        config_from_dict(d)


def test_dense_model_has_no_sparse_layers_and_swiglu():
    model = build(tiny(ffn_activation="swiglu"))
    assert model.sparse_layers() == {}
    assert all(b.ffn.activation == "swiglu" and b.ffn.w3 is not None for b in model.blocks)


def test_sparse_layer_gets_config_fields():
    model = build(tiny("peer", peer__glu=True, peer__score="sigmoid", peer__shared_keys=False))
    layer = model.sparse_layers()["blocks.1.ffn"]
    assert layer.glu and layer.score == "sigmoid" and not layer.shared_keys and layer.topk == 4


# ------------------------------------------------------------------ aux loss
def test_token_choice_aux_loss_is_added_to_loss():
    cfg = tiny("moe", sparse_blocks="all", moe__routing="token_choice", moe__topk=2, moe__aux_loss_weight=0.5)
    model = build(cfg)
    x, y = tokens(), tokens(seed=2)
    out = model(x, targets=y)
    hs = {}  # each MoE's input in this forward, to recompute its loss alone
    for name, m in model.sparse_layers().items():
        m.register_forward_pre_hook(lambda mod, a, name=name: hs.__setitem__(name, a[0]))
    out = model(x, targets=y)
    per_layer = [m.forward_with_aux(hs[n])[1] for n, m in model.sparse_layers().items()]
    assert len(per_layer) == 3 and all(a.item() > 0 for a in per_layer)
    torch.testing.assert_close(out.aux_loss, sum(per_layer))
    ce = F.cross_entropy(out.logits.reshape(-1, V), y.reshape(-1))
    torch.testing.assert_close(out.loss, ce + out.aux_loss)
    # the aux loss carries gradient to the routers
    out.aux_loss.backward()
    assert all(m.router.weight.grad.abs().sum() > 0 for m in model.sparse_layers().values())


# ------------------------------------------------------------------ gradients, init, dropout
def test_backward_reaches_every_parameter():
    model = build(tiny(tie_embeddings=False))
    model(tokens(), targets=tokens(seed=2)).loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_gpt2_init_and_tied_head():
    cfg = tiny("peer", n_layers=8, d_model=64)
    model = build(cfg)
    assert model.lm_head.weight is model.tok_emb.weight
    scale = 1 / math.sqrt(2 * 8)
    assert abs(model.blocks[0].attn.qkv.weight.std().item() - 0.02) < 2e-3
    assert abs(model.blocks[0].attn.proj.weight.std().item() - 0.02 * scale) < 1e-3
    assert abs(model.blocks[0].ffn.w2.weight.std().item() - 0.02 * scale) < 1e-3
    assert abs(model.blocks[0].ffn.w1.weight.std().item() - 0.02) < 2e-3
    # PEER keeps its own init, with v scaled like a residual output projection
    torch.manual_seed(0)
    fresh = PEER(64, **vars(cfg.peer))
    peer = model.sparse_layers()["blocks.4.ffn"]
    ratio = peer.v.std().item() / fresh.v.std().item()
    assert abs(ratio - scale) < 0.05 * scale
    assert abs(peer.u.std().item() - fresh.u.std().item()) < 0.05 * fresh.u.std().item()


def test_untied_head_is_separate():
    model = build(tiny(tie_embeddings=False))
    assert model.lm_head.weight is not model.tok_emb.weight


def test_dropout_only_in_training():
    model = build(tiny(dropout=0.3))
    x = tokens()
    assert not torch.equal(model(x).logits, model(x).logits)
    model.eval()
    assert torch.equal(model(x).logits, model(x).logits)


# ------------------------------------------------------------------ input checks
def test_bad_inputs_raise_clear_errors():
    model = build(tiny())
    with pytest.raises(ValueError, match="dtype"):
        model(tokens().int())
    with pytest.raises(ValueError, match="2-D"):
        model(tokens()[0])
    with pytest.raises(ValueError, match="vocab_size"):
        model(torch.full((1, 4), V))
    with pytest.raises(ValueError, match="vocab_size"):
        model(torch.full((1, 4), -1))
    with pytest.raises(ValueError, match="max_seq_len"):
        model(tokens(t=17))
    with pytest.raises(ValueError, match="targets"):
        model(tokens(), targets=tokens()[:, :-1])
    with pytest.raises(ValueError, match="ModelConfig"):
        PeerLM({"d_model": 32})
