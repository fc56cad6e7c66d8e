"""A language model's perplexity is causal: in evaluation, no logit may depend on a later token of
its sequence or on any other sequence of the batch.

For every feed-forward layer in a tiny PeerLM (eval mode: the query BatchNorm of PEER and PKM uses
its running statistics), two perturbations of a batch of 3 sequences:
  - every sequence's positions after ``t`` replaced: logits at positions <= t must not move;
  - the first sequence replaced entirely: the other sequences' logits must not move.
Dense, PKM, PEER and the dropless MoE pass. Expert choice and token choice with a binding capacity
route over the flattened batch and do not: asserted here so that the documentation's warning stays
true (their perplexities are not causal LM perplexities).
"""

from __future__ import annotations

import pytest
import torch

from peer.config import ModelConfig
from peer.model import PeerLM

V, B, T, CUT = 64, 3, 24, 9


def _model(layer: str, **moe) -> PeerLM:
    cfg = ModelConfig(vocab_size=V, d_model=32, n_layers=2, n_heads=2, d_ff=64, max_seq_len=T, sparse_layer=layer)
    cfg.peer.num_experts, cfg.peer.heads, cfg.peer.topk, cfg.peer.key_dim = 64, 2, 4, 8
    cfg.pkm.num_memories, cfg.pkm.heads, cfg.pkm.topk, cfg.pkm.key_dim = 64, 2, 4, 8
    cfg.moe.num_experts = 4
    for k, v in moe.items():
        setattr(cfg.moe, k, v)
    torch.manual_seed(0)
    model = PeerLM(cfg)
    model.train()
    with torch.no_grad():  # a few training batches, so that BatchNorm's running statistics are not the init's
        for _ in range(3):
            model(torch.randint(0, V, (B, T)))
    return model.eval()


def _moves(model: PeerLM) -> tuple[float, float]:
    """(largest change of logits at positions <= CUT when later positions change,
    largest change of sequences 1.. when sequence 0 changes)."""
    gen = torch.Generator().manual_seed(1)
    x = torch.randint(0, V, (B, T), generator=gen)
    later = x.clone()
    later[:, CUT + 1 :] = torch.randint(0, V, (B, T - CUT - 1), generator=gen)
    other = x.clone()
    other[0] = torch.randint(0, V, (T,), generator=gen)
    with torch.no_grad():
        base, a, b = (model(t).logits for t in (x, later, other))
    return ((a - base)[:, : CUT + 1].abs().max().item(), (b - base)[1:].abs().max().item())


@pytest.mark.parametrize(
    "layer,moe",
    [
        ("none", {}),
        ("peer", {}),
        ("pkm", {}),
        ("moe", {"routing": "dropless", "topk": 2}),
        ("moe", {"routing": "dropless", "topk": 1}),
        ("moe", {"routing": "token_choice", "topk": 2, "capacity_factor": 100.0}),  # capacity never binds
    ],
)
def test_eval_logits_depend_only_on_earlier_tokens_of_their_own_sequence(layer, moe):
    model = _model(layer, **moe)
    within, across = _moves(model)
    assert within == 0.0 and across == 0.0
    if moe.get("routing") != "token_choice":  # token choice is causal here only because its capacity never binds
        assert model.noncausal_layers() == []


@pytest.mark.parametrize(
    "moe", [{"routing": "expert_choice"}, {"routing": "token_choice", "topk": 1, "capacity_factor": 1.0}]
)
def test_batch_routed_moe_is_not_causal(moe):
    """The documented exception: these routings see the whole flattened batch."""
    model = _model("moe", **moe)
    within, across = _moves(model)
    assert max(within, across) > 1e-4
    assert model.noncausal_layers() == [name for name in model.sparse_layers()]  # the layer says so itself


def test_eval_report_flags_non_causal_perplexities():
    from peer.eval import format_report

    base = {"run": "r", "step": 1, "model": "moe", "params": {"total": 1, "active": 1}, "flops_per_token": 1.0}
    sets = {"val": {"kind": "split", "tokens": 10, "loss": 1.0, "perplexity": 2.7}}
    flagged = format_report({**base, "sets": sets, "experts": {}, "noncausal_layers": ["blocks.1.ffn"]})
    clean = format_report({**base, "sets": sets, "experts": {}, "noncausal_layers": []})
    assert "not causal" in flagged and "blocks.1.ffn" in flagged
    assert "not causal" not in clean


def test_dropless_moe_equals_the_per_token_sum_of_its_top_k_experts():
    from peer.layers.moe import MoE

    torch.manual_seed(0)
    m = MoE(8, 12, num_experts=4, routing="dropless", topk=2)
    x = torch.randn(40, 8)
    probs = m.router(x).softmax(-1)
    want = torch.zeros_like(x)
    for t in range(x.shape[0]):
        p, es = probs[t].topk(2)
        for pe, e in zip(p, es.tolist(), strict=True):
            want[t] += pe * (torch.nn.functional.gelu(x[t] @ m.w1[e]) @ m.w2[e])
    y, aux = m(x, return_aux=True)
    torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-6)
    assert aux.item() > 0  # the load-balancing loss, as token choice's
