"""Parameter and FLOP accounting: against built models, FlopCounterMode, and the documented formulas."""

from __future__ import annotations

import math

import pytest
import torch
from tiny_configs import tiny_model_config
from torch.utils.flop_counter import FlopCounterMode

import peer
from peer.config import Config, ModelConfig
from peer.config import load_config as load_config_fn
from peer.flops import FlopReport, ParamReport, count_params, flops, train_flops_per_step
from peer.model import PeerLM

V = 96


def tiny(sparse_layer="none", **kw) -> ModelConfig:
    return tiny_model_config(V, 32, (49, 3, 5, 6), sparse_layer, **kw)


CONFIGS = {
    "dense": tiny(),
    "dense_swiglu_untied": tiny(ffn_activation="swiglu", tie_embeddings=False, d_ff=48),
    "peer": tiny("peer"),
    "peer_ln_glu_unshared": tiny(
        "peer", sparse_blocks="all", peer__query_norm="layernorm", peer__glu=True, peer__shared_keys=False
    ),
    "peer_nonorm": tiny("peer", sparse_blocks=[0, 2], peer__query_norm="none"),
    "pkm": tiny("pkm"),
    "pkm_ln": tiny("pkm", pkm__query_norm="layernorm"),
    "moe_ec": tiny("moe"),
    "moe_tc": tiny("moe", sparse_blocks="all", moe__routing="token_choice", moe__topk=2),
    "peer_beside_every2": tiny("peer", sparse_blocks="every:2", sparse_placement="beside"),
    "peer_shared_all": tiny("peer", sparse_blocks="all", share_experts=True),
    "pkm_shared_beside": tiny("pkm", sparse_blocks=[0, 2], share_experts=True, sparse_placement="beside"),
    "dense_lora": tiny(lora_rank=4),
    "peer_lora_swiglu": tiny("peer", lora_rank=2, ffn_activation="swiglu", lora_alpha=8.0),
}


def _prefix_params(model, prefix):
    return sum(p.numel() for n, p in model.named_parameters() if n.startswith(prefix + "."))


# ------------------------------------------------------------------ parameters
@pytest.mark.parametrize("name", list(CONFIGS))
def test_param_count_matches_built_model(name):
    cfg = CONFIGS[name]
    torch.manual_seed(0)
    model = PeerLM(cfg)
    report = count_params(cfg)
    assert isinstance(report, ParamReport)
    assert report.total == sum(p.numel() for p in model.parameters())
    assert report.total == sum(t for t, _ in report.by_module.values())
    for i in range(cfg.n_layers):
        assert report.by_module[f"blocks.{i}.attn"][0] == _prefix_params(model, f"blocks.{i}.attn")
        assert report.by_module[f"blocks.{i}.ffn"][0] == _prefix_params(model, f"blocks.{i}.ffn")
        if f"blocks.{i}.mem" in report.by_module:  # a sparse layer beside the FFW
            assert report.by_module[f"blocks.{i}.mem"][0] == _prefix_params(model, f"blocks.{i}.mem") > 0
    norms = sum(p.numel() for m in model.modules() if isinstance(m, torch.nn.RMSNorm) for p in m.parameters())
    assert report.by_module["norms"][0] == norms
    # from the model == from its config
    assert count_params(model) == report
    assert flops(model, 16) == flops(cfg, 16)


def test_active_params_of_sparse_layers():
    d = 32
    p = CONFIGS["peer"].peer  # h=2, k=4, key_dim=8, N=64, batchnorm
    query, keys = d * 2 * 8 + 2 * 2 * 8, 8 * 8
    assert count_params(CONFIGS["peer"]).by_module["blocks.1.ffn"] == (
        query + keys + 64 * 2 * d,
        query + keys + p.heads * p.topk * 2 * d,
    )
    # dense layers are fully active; the sparse layer is the only difference between total and active
    r = count_params(CONFIGS["peer"])
    assert r.total - r.active == (64 - 2 * 4) * 2 * d
    # GLU experts: 3 d per retrieved expert
    g = CONFIGS["peer_ln_glu_unshared"].peer
    t, a = count_params(CONFIGS["peer_ln_glu_unshared"]).by_module["blocks.0.ffn"]
    assert t - a == (64 - g.heads * g.topk) * 3 * d
    # PKM: h k value rows active
    t, a = count_params(CONFIGS["pkm"]).by_module["blocks.1.ffn"]
    assert t - a == (49 - 3 * 5) * d
    # MoE: router + topk experts (token choice), capacity_factor * topk experts (expert choice)
    expert = 2 * d * 4 * d
    assert count_params(CONFIGS["moe_tc"]).by_module["blocks.0.ffn"] == (d * 4 + 4 * expert, d * 4 + 2 * expert)
    cfg = tiny("moe", moe__capacity_factor=2.0)
    assert count_params(cfg).by_module["blocks.1.ffn"][1] == d * 4 + 2 * expert


def test_paper_scale_config_is_accounted_without_building():
    cfg = ModelConfig(vocab_size=32000, d_model=1024, n_layers=12, n_heads=16, max_seq_len=2048, sparse_layer="peer")
    r = count_params(cfg)  # N = 1024^2, h = 8, k = 16 (paper): a 2.1B-parameter layer, never built
    d, h, k = 1024, 8, 16
    total, active = r.by_module["blocks.6.ffn"]
    assert total - active == (1024**2 - h * k) * 2 * d
    # the paper's P_active = (2d + 1) h k counts a bias per expert; ours has none
    query_and_keys = d * h * 128 + 2 * h * 128 + 1024 * 128
    assert active - query_and_keys == (2 * d + 1) * h * k - h * k


# ------------------------------------------------------------------ FLOPs: formulas
def test_attention_score_term_is_causal_average():
    cfg = tiny()
    d = cfg.d_model
    for T in (1, 7, 32):
        fl = flops(cfg, T).by_module["blocks.0.attn"]
        brute = sum(2 * 2 * (t + 1) * d for t in range(T)) / T  # token t attends to t + 1 keys
        assert fl == 2 * 4 * d * d + brute


def test_dense_model_forward_flops_by_formula():
    cfg = CONFIGS["dense_swiglu_untied"]
    d, T, L = 32, 16, 3
    r = flops(cfg, T)
    expected = L * (8 * d * d + 2 * d * (T + 1) + 2 * 3 * d * 48) + 2 * d * V
    assert r.forward_per_token == expected
    assert r.train_per_token == 3 * expected
    assert r.by_module["tok_emb"] == 0 and r.by_module["norms"] == 0


def test_peer_flops_grow_with_sqrt_of_experts():
    def ffn(n):
        return flops(tiny("peer", peer__num_experts=n), 16).by_module["blocks.1.ffn"]

    base = ffn(16**2)
    # f(N) = a + b sqrt(N): quadrupling N adds b * sqrt(N); 16x adds 3 b sqrt(N) (linear in N would give 5x)
    assert ffn(64**2) - base == pytest.approx(3 * (ffn(32**2) - base))
    h, kd = 2, 8
    assert ffn(32**2) - base == 2 * h * kd * (32 - 16)
    # and the documented terms exactly (h=2, k=4, key_dim=8, d=32)
    assert base == 2 * 32 * h * kd + 2 * h * 16 * kd + h * 4 * 4 + h * 4 * 2 * 2 * 32
    # parameters grow linearly in N, active parameters only through the sub-keys
    p = lambda n: count_params(tiny("peer", peer__num_experts=n)).by_module["blocks.1.ffn"]  # noqa: E731
    assert p(32**2)[0] - p(16**2)[0] == (32**2 - 16**2) * 2 * 32 + (32 - 16) * kd
    assert p(32**2)[1] - p(16**2)[1] == (32 - 16) * kd


def test_moe_flops_by_routing():
    d, f = 32, 128
    ec = flops(tiny("moe", moe__capacity_factor=1.5, moe__topk=2), 16).by_module["blocks.1.ffn"]
    assert ec == 2 * d * 4 + 1.5 * 2 * 2 * 2 * d * f
    tc = flops(CONFIGS["moe_tc"], 16).by_module["blocks.0.ffn"]
    assert tc == 2 * d * 4 + 2 * 2 * 2 * d * f


def test_train_flops_per_step():
    cfg = Config(model=tiny("peer"))
    cfg.train.seq_len, cfg.train.batch_size, cfg.train.grad_accum = 16, 4, 3
    per_tok = flops(cfg.model, 16).train_per_token
    assert train_flops_per_step(cfg) == per_tok * 4 * 3 * 16
    assert train_flops_per_step(cfg, world_size=8) == 8 * train_flops_per_step(cfg)
    with pytest.raises(ValueError, match="world_size"):
        train_flops_per_step(cfg, world_size=0)


# ------------------------------------------------------------------ FLOPs: against FlopCounterMode
def _counted(model, x):
    """FlopCounterMode counts per module (matmul-type ops; SDPA on CPU is not counted here)."""
    with FlopCounterMode(display=False) as fc:
        model(x)
    counts = fc.get_flop_counts()
    return lambda name: sum(
        v for op, v in counts.get(f"PeerLM.{name}", {}).items() if "scaled_dot_product" not in str(op)
    )


@pytest.mark.parametrize("name", ["dense", "dense_swiglu_untied", "dense_lora"])
def test_dense_flops_match_flop_counter(name):
    cfg = CONFIGS[name]
    B, T = 2, 16
    model = PeerLM(cfg).eval()
    counted = _counted(model, torch.randint(0, V, (B, T)))
    r = flops(cfg, T)
    d = cfg.d_model
    scores = 2 * 2 * (T + 1) / 2 * d  # the SDPA term, not counted by FlopCounterMode
    for i in range(cfg.n_layers):
        assert counted(f"blocks.{i}.attn") == (r.by_module[f"blocks.{i}.attn"] - scores) * B * T
        assert counted(f"blocks.{i}.ffn") == r.by_module[f"blocks.{i}.ffn"] * B * T
    assert counted("lm_head") == r.by_module["lm_head"] * B * T


def test_sparse_flops_match_flop_counter():
    B, T = 2, 16
    # PEER (reference backend: query mm, sub-key bmm, expert einsums); candidate sums h k^2 are adds
    cfg = CONFIGS["peer"]
    model = PeerLM(cfg).eval()
    counted = _counted(model, torch.randint(0, V, (B, T)))
    h, k = cfg.peer.heads, cfg.peer.topk
    assert counted("blocks.1.ffn") == (flops(cfg, T).by_module["blocks.1.ffn"] - h * k * k) * B * T
    # MoE expert choice with C = capacity_factor * B*T * topk / E exactly: router mm + expert bmms
    cfg = tiny("moe", moe__capacity_factor=2.0)
    model = PeerLM(cfg).eval()
    counted = _counted(model, torch.randint(0, V, (B, T)))
    assert counted("blocks.1.ffn") == flops(cfg, T).by_module["blocks.1.ffn"] * B * T
    # PEER beside the FFW pays both; a shared pool changes no FLOPs
    for cfg in (CONFIGS["peer_beside_every2"], tiny("peer", sparse_blocks="all", share_experts=True)):
        model = PeerLM(cfg).eval()
        counted = _counted(model, torch.randint(0, V, (B, T)))
        r = flops(cfg, T).by_module
        for name in model.sparse_layers():
            assert counted(name) == (r[name] - h * k * k) * B * T
        if cfg.sparse_placement == "beside":
            assert counted("blocks.1.ffn") == r["blocks.1.ffn"] * B * T == r["blocks.0.ffn"] * B * T


# ------------------------------------------------------------------ reports
def test_table_lists_modules_aligned():
    r = flops(CONFIGS["peer"], 16)
    assert isinstance(r, FlopReport)
    text = r.table()
    lines = text.splitlines()
    for name in r.by_module:
        assert any(line.startswith(name + " ") for line in lines), name
    body = lines[:-1]  # the last line is the training-FLOPs note
    assert len({len(line) for line in body}) == 1
    assert f"{r.params.total:,}" in lines[-2] and f"{r.params.active:,}" in lines[-2]
    p = count_params(CONFIGS["peer"]).table().splitlines()
    assert len({len(line) for line in p}) == 1 and f"{count_params(CONFIGS['peer']).total:,}" in p[-1]


def test_package_exports_and_errors():
    cfg = CONFIGS["dense"]
    assert peer.count_flops(cfg, 8) == flops(cfg, 8) and peer.count_params(cfg) == count_params(cfg)
    import peer.flops as flops_module

    assert peer.flops is flops_module and callable(peer.flops.flops)  # the module is not shadowed
    assert peer.load_config is load_config_fn and callable(peer.train_or_resume) and callable(peer.evaluate)
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        peer.nope  # noqa: B018 (the attribute access is what raises)
    with pytest.raises(ValueError, match="seq_len"):
        flops(cfg, 33)
    with pytest.raises(ValueError, match="seq_len"):
        flops(cfg, 0)
    with pytest.raises(ValueError, match="ModelConfig"):
        count_params("model")
    bad = tiny("peer", peer__num_experts=50)
    with pytest.raises(ValueError, match="num_experts"):
        count_params(bad)
    assert math.isclose(flops(cfg, 8).train_per_token, 3 * flops(cfg, 8).forward_per_token)
