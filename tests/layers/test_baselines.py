"""The paper's baselines: DenseFFN, MoE (expert / token choice), PKM, each against a slow reference."""

import math

import pytest
import torch
import torch.nn.functional as F

from peer.layers import PKM, DenseFFN, MoE


# ---------------------------------------------------------------------------- DenseFFN
@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
def test_dense_matches_formula(activation):
    m = DenseFFN(8, 20, activation=activation, bias=True)
    x = torch.randn(2, 3, 8)
    h = m.w1(x)
    h = F.silu(h) * m.w3(x) if activation == "swiglu" else F.gelu(h)
    want = h @ m.w2.weight.t() + m.w2.bias
    torch.testing.assert_close(m(x), want)
    assert (m.w3 is None) == (activation == "gelu")
    assert m.w1.bias is not None


def test_dense_errors():
    with pytest.raises(ValueError, match="activation.*'gelu', 'swiglu'"):
        DenseFFN(8, 16, activation="relu6")
    with pytest.raises(ValueError, match="hidden"):
        DenseFFN(8, 0)
    with pytest.raises(ValueError, match=r"dim=8"):
        DenseFFN(8, 16)(torch.randn(3, 7))
    assert DenseFFN(8, 16).w1.bias is None


# ---------------------------------------------------------------------------- MoE
def _expert(m: MoE, e: int, x: torch.Tensor) -> torch.Tensor:
    """Expert e on tokens x [.., d], the obvious way."""
    h = x @ m.w1[e]
    h = F.silu(h) * (x @ m.w3[e]) if m.activation == "swiglu" else F.gelu(h)
    return h @ m.w2[e]


@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
def test_expert_choice_each_expert_takes_exactly_capacity_tokens(activation):
    m = MoE(8, 12, num_experts=4, routing="expert_choice", capacity_factor=1.0, activation=activation)
    x = torch.randn(2, 10, 8)  # T = 20
    assert m.capacity(20) == 5  # round(1.0 * 20 * 1 / 4)
    slots, gates, probs = m.route(x.reshape(-1, 8))
    assert slots.shape == gates.shape == (4, 5)
    for e in range(4):
        # exactly C distinct real tokens, and they are the C highest-probability tokens for e
        assert len(set(slots[e].tolist())) == 5 and slots[e].max() < 20
        top = probs[:, e].topk(5).indices
        assert set(slots[e].tolist()) == set(top.tolist())
        torch.testing.assert_close(gates[e], probs[slots[e], e])
    # output = sum over experts that chose token t of p[t, e] * expert_e(x_t)
    y = m(x)
    xf = x.reshape(-1, 8)
    want = torch.zeros(20, 8)
    for e in range(4):
        for t in slots[e].tolist():
            want[t] += probs[t, e] * _expert(m, e, xf[t])
    torch.testing.assert_close(y.reshape(-1, 8), want, rtol=1e-5, atol=1e-6)
    assert y.shape == x.shape
    assert float(m.forward_with_aux(x)[1]) == 0.0  # expert choice: balanced by construction


def test_expert_choice_capacity_rounding_and_clamps():
    m = MoE(4, 8, num_experts=8, routing="expert_choice", capacity_factor=1.0, topk=2)
    assert m.capacity(20) == 5  # 1.0 * 20 * 2 / 8 = 5
    assert m.capacity(3) == 1  # 0.75 rounds to 1
    assert m.capacity(1) == 1
    big = MoE(4, 8, num_experts=2, routing="expert_choice", capacity_factor=4.0)
    assert big.capacity(10) == 10  # 20 clamped to T
    slots, _, _ = big.route(torch.randn(10, 4))
    assert all(sorted(s.tolist()) == list(range(10)) for s in slots)


def test_expert_choice_is_non_causal_across_the_batch():
    """Documented property: a token's routing depends on later tokens in the flattened batch."""
    m = MoE(4, 8, num_experts=4, routing="expert_choice")
    x = torch.randn(16, 4)
    y = m(x)
    x2 = x.clone()
    x2[8:] = 10 * torch.randn(8, 4)  # change only the second half
    assert not torch.allclose(m(x2)[:8], y[:8])


def _token_choice_reference(m: MoE, xf: torch.Tensor, capacity: int | None):
    """Per-token loop: tokens in order, each takes its top-k experts while they have room."""
    probs = m.router(xf).softmax(-1)
    load = [0] * m.num_experts
    y = torch.zeros_like(xf)
    for t in range(xf.shape[0]):
        p, es = probs[t].topk(m.topk)
        for pe, e in zip(p, es.tolist(), strict=True):
            if capacity is None or load[e] < capacity:
                load[e] += 1
                y[t] += pe * _expert(m, e, xf[t])
    return y, load


@pytest.mark.parametrize("topk", [1, 2])
def test_token_choice_large_capacity_equals_per_token_loop(topk):
    m = MoE(8, 12, num_experts=4, routing="token_choice", topk=topk, capacity_factor=100.0)
    x = torch.randn(3, 5, 8)
    want, _ = _token_choice_reference(m, x.reshape(-1, 8), capacity=None)
    torch.testing.assert_close(m(x).reshape(-1, 8), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("topk", [1, 2])
def test_token_choice_drops_over_capacity_in_token_order(topk):
    m = MoE(8, 12, num_experts=4, routing="token_choice", topk=topk, capacity_factor=0.5)
    with torch.no_grad():  # skew the router so some experts overflow
        m.router.weight[0] += 2.0 * torch.randn(8)
    xf = torch.randn(24, 8)
    C = m.capacity(24)
    assert C == math.ceil(0.5 * 24 * topk / 4)
    slots, gates, probs = m.route(xf)
    real = slots < 24
    assert (real.sum(1) <= C).all()  # no expert over capacity
    want, load = _token_choice_reference(m, xf, capacity=C)
    assert max(load) == C and sum(load) < 24 * topk  # this example really drops something
    assert real.sum(1).tolist() == load
    torch.testing.assert_close(m(xf), want, rtol=1e-5, atol=1e-6)
    assert (gates[~real] == 0).all()


def test_token_choice_aux_loss_hand_computed():
    m = MoE(2, 4, num_experts=2, routing="token_choice", aux_loss_weight=0.1)
    with torch.no_grad():
        m.router.weight.copy_(torch.eye(2))
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, 0.0]])  # logits = x
    _, aux = m.forward_with_aux(x)
    s = lambda a, b: math.exp(a) / (math.exp(a) + math.exp(b))  # noqa: E731
    p0 = [s(1, 0), s(0, 1), s(2, 0)]  # prob of expert 0 per token
    P0 = sum(p0) / 3
    P1 = 1 - P0
    f0, f1 = 2 / 3, 1 / 3  # tokens 0 and 2 pick expert 0, token 1 picks expert 1
    want = 0.1 * 2 * (f0 * P0 + f1 * P1)
    assert aux.shape == ()
    assert math.isclose(aux.item(), want, rel_tol=1e-6)
    aux.backward()  # differentiable through P
    assert m.router.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("topk", [1, 3])
def test_token_choice_aux_loss_uniform_routing_equals_weight(topk):
    m = MoE(6, 8, num_experts=4, routing="token_choice", topk=topk, aux_loss_weight=0.01)
    with torch.no_grad():
        m.router.weight.zero_()  # p = 1/E for every token
    _, aux = m.forward_with_aux(torch.randn(10, 6))
    assert math.isclose(aux.item(), 0.01, rel_tol=1e-6)


def test_moe_gradients_reach_router_and_experts():
    for routing in ("expert_choice", "token_choice"):
        m = MoE(8, 12, num_experts=4, routing=routing)
        y, aux = m.forward_with_aux(torch.randn(12, 8))
        (y.square().sum() + aux).backward()
        for p in (m.router.weight, m.w1, m.w2):
            assert p.grad is not None and p.grad.abs().sum() > 0, routing


def test_moe_errors():
    with pytest.raises(ValueError, match="routing"):
        MoE(8, 16, routing="hash")
    with pytest.raises(ValueError, match="topk"):
        MoE(8, 16, num_experts=4, topk=5)
    with pytest.raises(ValueError, match="capacity_factor"):
        MoE(8, 16, capacity_factor=0)
    with pytest.raises(ValueError, match="activation"):
        MoE(8, 16, activation="tanh")
    with pytest.raises(ValueError, match="num_experts"):
        MoE(8, 16, num_experts=0)
    with pytest.raises(ValueError, match=r"dim=8"):
        MoE(8, 16, num_experts=4)(torch.randn(2, 3, 9))


# ---------------------------------------------------------------------------- PKM
def _pkm(**kw):
    args = dict(dim=16, num_memories=16**2, heads=2, topk=4, key_dim=8, query_norm="batchnorm")
    args.update(kw)
    return PKM(**args)


@pytest.mark.parametrize("query_norm", ["batchnorm", "layernorm", "none"])
def test_pkm_retrieval_equals_brute_force(query_norm):
    m = _pkm(query_norm=query_norm).eval()
    x = torch.randn(2, 7, 16)
    w, idx = m.retrieve(x)
    assert w.shape == idx.shape == (2, 7, 2, 4)
    q = m.query(x).reshape(-1, 2, 8)
    keys = m.index.full_keys()  # [heads, N, key_dim]: each head its own keys
    assert keys.shape == (2, 256, 8)
    scores = torch.einsum("thd,hnd->thn", q, keys)
    s_ref, i_ref = scores.topk(4, dim=-1)
    assert torch.equal(idx.reshape(-1, 2, 4), i_ref)
    torch.testing.assert_close(w.reshape(-1, 2, 4), s_ref.softmax(-1))


def test_pkm_output_equals_per_token_loop():
    m = _pkm()
    x = torch.randn(3, 5, 16)
    y = m(x)  # training mode: BatchNorm batch statistics
    w, idx = m.retrieve(x)  # same batch -> same statistics
    want = torch.zeros(15, 16)
    wf, idf = w.reshape(15, -1), idx.reshape(15, -1)
    for t in range(15):
        for j in range(wf.shape[1]):
            want[t] += wf[t, j] * m.values[idf[t, j]]
    assert y.shape == x.shape
    torch.testing.assert_close(y.reshape(15, 16), want, rtol=1e-5, atol=1e-6)


def test_pkm_value_gradients_only_on_retrieved_rows():
    m = _pkm().eval()
    x = torch.randn(6, 16)
    m(x).square().sum().backward()
    _, idx = m.retrieve(x)
    touched = (m.values.grad != 0).any(dim=1).nonzero().flatten()
    assert set(touched.tolist()) == set(idx.flatten().tolist())
    assert m.query_proj.weight.grad.abs().sum() > 0 and m.index.keys.grad.abs().sum() > 0


def test_pkm_usage_accumulates_router_weights():
    m = _pkm().eval()
    assert m.num_experts == 256 and m.usage.numel() == 0
    m(torch.randn(4, 16))
    assert m.usage.numel() == 0  # off by default
    m.record_usage = True
    xs = [torch.randn(5, 16), torch.randn(2, 3, 16)]
    want = torch.zeros(256, dtype=torch.float64)
    for x in xs:
        m(x)
        w, idx = m.retrieve(x)
        want.index_add_(0, idx.flatten(), w.flatten().double())
    assert m.usage.dtype == torch.float64
    torch.testing.assert_close(m.usage, want)
    assert math.isclose(m.usage.sum().item(), (5 + 6) * 2, rel_tol=1e-6)  # each head's softmax sums to 1
    m.reset_usage()
    assert m.usage.shape == (256,) and m.usage.sum() == 0


def test_pkm_parameter_roles_and_init_scale():
    m = _pkm(dim=32, heads=4, topk=8, key_dim=16)
    assert m.expert_parameters() == [m.values] and m.key_parameters() == [m.index.keys]
    assert m.index.groups == 4
    var = m(torch.randn(512, 32)).var().item()
    assert 0.3 < var < 3.0  # documented init: Var[y] ~ 1


def test_pkm_single_token_training_mode():
    m = _pkm()
    assert m(torch.randn(1, 16)).shape == (1, 16)


def test_pkm_errors():
    with pytest.raises(ValueError, match="num_memories"):
        _pkm(num_memories=200)
    with pytest.raises(ValueError, match="key_dim"):
        _pkm(key_dim=7)
    with pytest.raises(ValueError, match="topk"):
        _pkm(topk=17)
    with pytest.raises(ValueError, match="query_norm"):
        _pkm(query_norm="groupnorm")
    with pytest.raises(ValueError, match=r"dim=16"):
        _pkm()(torch.randn(4, 15))


def test_empty_input_gives_empty_output():
    """Zero tokens (e.g. an empty batch) pass through every sparse layer without error."""
    import peer
    from peer.layers import PKM, MoE

    layers = [
        peer.PEER(16, num_experts=64, heads=2, topk=4, key_dim=8),
        PKM(16, num_memories=64, heads=2, topk=4, key_dim=8),
        MoE(16, 32, num_experts=4),
        MoE(16, 32, num_experts=4, routing="token_choice"),
    ]
    for layer in layers:
        for train in (True, False):
            layer.train(train)
            y = layer(torch.randn(2, 0, 16))
            assert y.shape == (2, 0, 16)
