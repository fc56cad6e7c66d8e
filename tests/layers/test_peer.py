"""The PEER layer against the paper's equations: brute-force retrieval, a per-token reference loop,
gradient sparsity, the shared pool, query BatchNorm behaviour, argument validation."""

import math

import pytest
import torch
import torch.nn.functional as F

from peer import PEER

ACT = {"gelu": F.gelu, "relu": F.relu}


def make(dim=16, n=8, heads=3, topk=4, key_dim=8, seed=0, **kw):
    torch.manual_seed(seed)
    return PEER(dim, num_experts=n * n, heads=heads, topk=topk, key_dim=key_dim, **kw)


def brute_force(layer, x):
    """Top-k of q_h(x) . k_i over ALL N keys, per head, straight from product_keys()."""
    q = layer.query(x)  # [T, h, key_dim]
    K = layer.product_keys()  # [1 or h, N, key_dim]
    scores = torch.einsum("thd,hnd->thn", q, K.expand(layer.heads, -1, -1))
    return scores.topk(layer.topk, dim=-1)


def reference_loop(layer, x):
    """Eqs. 1-7 written token by token, head by head, expert by expert."""
    layer_eval_q = layer.query(x)
    K = layer.product_keys().expand(layer.heads, -1, -1)
    act = ACT[layer.activation]
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for h in range(layer.heads):
            s = K[h] @ layer_eval_q[t, h]  # eq. 1: q(x)^T k_i for all i
            top, ids = s.topk(layer.topk)
            g = {"softmax": lambda t: t.softmax(0), "sigmoid": torch.sigmoid, "relu": torch.relu}[layer.score](
                top
            )  # eq. 2
            for j, i in enumerate(ids.tolist()):
                if layer.glu:
                    e = act(layer.gate[i] @ x[t]) * (layer.u[i] @ x[t]) * layer.v[i]
                else:
                    e = act(layer.u[i] @ x[t]) * layer.v[i]  # eq. 6
                out[t] += g[j] * e  # eqs. 3 and 7: sum over heads and their experts
    return out


@pytest.mark.parametrize("shared_keys", [True, False])
@pytest.mark.parametrize("norm", ["batchnorm", "layernorm", "none"])
def test_retrieval_equals_brute_force(shared_keys, norm):
    layer = make(n=12, heads=4, topk=6, shared_keys=shared_keys, query_norm=norm).eval()
    x = torch.randn(50, 16)
    g, idx = layer.retrieve(x)
    top, ids = brute_force(layer, x)
    assert torch.equal(torch.sort(idx, -1).values, torch.sort(ids, -1).values)
    # weights are softmax of the retrieved scores, in the same order as the ids
    assert torch.allclose(g, top.softmax(-1), atol=1e-6)
    assert idx.min() >= 0 and idx.max() < layer.num_experts


def test_sigmoid_weights():
    layer = make(score="sigmoid").eval()
    x = torch.randn(20, 16)
    g, idx = layer.retrieve(x)
    top, ids = brute_force(layer, x)
    assert torch.equal(idx, ids)
    assert torch.allclose(g, top.sigmoid(), atol=1e-6)


def test_relu_weights_and_output():
    """score="relu": g = max(0, q . k) of the retrieved scores, and the output follows eqs. 3, 6, 7 with it."""
    layer = make(n=3, topk=3, score="relu").eval()  # top 3 of 9: some retrieved scores are negative
    x = torch.randn(20, 16)
    g, idx = layer.retrieve(x)
    top, ids = brute_force(layer, x)
    assert torch.equal(idx, ids)
    assert torch.allclose(g, top.relu(), atol=1e-6)
    assert (g == 0).any() and (g > 0).any()  # some retrieved scores are negative at init
    assert torch.allclose(layer(x), reference_loop(layer, x), atol=1e-5)


def test_value_init_scale_scales_only_v():
    a, b = make(n=16, seed=3), make(n=16, seed=3, value_init_scale=0.25)
    assert torch.equal(a.u, b.u) and torch.equal(a.query_proj.weight, b.query_proj.weight)
    assert torch.allclose(b.v, 0.25 * a.v)


def test_expert_id_convention():
    """Expert i = a*sqrt(N) + b has key [c_a; c'_b]."""
    layer = make(n=5, key_dim=6)
    K = layer.product_keys()[0]
    c, c2 = layer.index.keys[0, 0], layer.index.keys[0, 1]
    for a in range(5):
        for b in range(5):
            assert torch.equal(K[a * 5 + b], torch.cat([c[a], c2[b]]))


@pytest.mark.parametrize("activation", ["gelu", "relu"])
@pytest.mark.parametrize("score", ["softmax", "sigmoid"])
@pytest.mark.parametrize("glu", [False, True])
@pytest.mark.parametrize("shared_keys", [True, False])
def test_output_equals_reference_loop(activation, score, glu, shared_keys):
    layer = make(activation=activation, score=score, glu=glu, shared_keys=shared_keys).eval()
    x = torch.randn(7, 16)
    with torch.no_grad():
        assert torch.allclose(layer(x), reference_loop(layer, x), atol=1e-5)


@pytest.mark.parametrize("backend", ["reference", "auto"])
def test_batch_shapes_and_backends(backend):
    layer = make(backend=backend).eval()
    x = torch.randn(2, 5, 16)
    y = layer(x)
    assert y.shape == x.shape
    assert torch.allclose(y.reshape(10, 16), layer(x.reshape(10, 16)), atol=1e-6)
    g, idx = layer.retrieve(x)
    assert g.shape == idx.shape == (2, 5, 3, 4)
    assert layer.query(x).shape == (2, 5, 3, 8)


def test_gradients_reach_only_retrieved_rows():
    layer = make(n=16, heads=2, topk=3).train()
    x = torch.randn(6, 16)
    layer(x).pow(2).sum().backward()
    with torch.no_grad():
        _, idx = layer._retrieve(x)  # same batch, same mode: the ids the forward used
    touched = torch.zeros(layer.num_experts, dtype=torch.bool)
    touched[idx.flatten()] = True
    for p in (layer.u, layer.v):
        nz = p.grad.abs().sum(1) > 0
        assert not nz[~touched].any(), "gradient leaked to experts that were not retrieved"
        assert nz[touched].float().mean() > 0.9
    assert layer.index.keys.grad is not None and layer.query_proj.weight.grad is not None


def test_all_heads_index_one_pool():
    """Heads share u, v: forcing two heads to identical queries gives identical ids into the same table."""
    layer = make(heads=2, query_norm="none").eval()
    with torch.no_grad():
        w = layer.query_proj.weight.view(2, 8, 16)
        w[1] = w[0]
    x = torch.randn(5, 16)
    g, idx = layer.retrieve(x)
    assert torch.equal(idx[:, 0], idx[:, 1])
    # and the output is twice a single head's contribution
    single = make(heads=1, query_norm="none").eval()
    with torch.no_grad():
        single.query_proj.weight.copy_(w[0])
        single.index.keys.copy_(layer.index.keys)
        single.u.copy_(layer.u)
        single.v.copy_(layer.v)
    assert torch.allclose(layer(x), 2 * single(x), atol=1e-5)
    assert set(n for n, _ in layer.named_parameters()) >= {"u", "v"}
    assert layer.u.shape == (64, 16)


def test_query_batchnorm_train_and_eval():
    layer = make(query_norm="batchnorm")
    x = torch.randn(64, 16) * 3 + 1
    layer.train()
    q = layer.query(x).reshape(64, -1)
    # training mode: normalised with the batch's own statistics
    assert torch.allclose(q.mean(0), torch.zeros(q.shape[1]), atol=1e-4)
    assert torch.allclose(q.var(0, unbiased=False), torch.ones(q.shape[1]), atol=1e-2)
    assert layer.query_norm.num_batches_tracked.item() == 1
    # eval mode: running statistics, so a token's query does not depend on the rest of the batch
    layer.eval()
    a = layer.query(x)[:5]
    b = layer.query(x[:5])
    assert torch.allclose(a, b, atol=1e-6)
    layer.train()
    c = layer.query(x[:5])
    assert not torch.allclose(b, c, atol=1e-3)
    # a single token in training mode falls back to the running statistics
    layer.train()
    before = layer.query_norm.num_batches_tracked.item()
    layer(x[:1])
    assert layer.query_norm.num_batches_tracked.item() == before


@pytest.mark.parametrize(
    "n,heads,topk,score",
    [(16, 1, 1, "softmax"), (32, 8, 16, "softmax"), (64, 4, 8, "sigmoid"), (128, 8, 16, "softmax")],
)
def test_output_variance_order_one_at_init(n, heads, topk, score):
    torch.manual_seed(0)
    layer = PEER(64, num_experts=n * n, heads=heads, topk=topk, key_dim=32, score=score)
    x = torch.randn(512, 64)
    with torch.no_grad():
        std = layer(x).std().item()
    assert 0.3 < std < 3.0, std


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(num_experts=1000), "num_experts"),
        (dict(num_experts=0), "num_experts"),
        (dict(key_dim=7), "key_dim"),
        (dict(num_experts=16, topk=5), "topk"),
        (dict(activation="tanh"), "activation"),
        (dict(score="tanh"), "score"),
        (dict(value_init_scale=0.0), "value_init_scale"),
        (dict(query_norm="groupnorm"), "query_norm"),
        (dict(heads=0), "heads"),
        (dict(backend="cuda"), "backend"),
    ],
)
def test_bad_arguments(kwargs, match):
    args = dict(num_experts=64, topk=4, key_dim=8) | kwargs
    with pytest.raises(ValueError, match=match):
        PEER(16, **args)


def test_wrong_input_width():
    layer = make()
    with pytest.raises(ValueError, match="dim=16"):
        layer(torch.randn(3, 15))


def test_usage_accumulates_router_weights():
    layer = make().eval()
    x = torch.randn(30, 16)
    layer.record_usage = True
    layer(x)
    g, idx = layer.retrieve(x)
    expected = torch.zeros(layer.num_experts, dtype=torch.float64)
    expected.index_add_(0, idx.flatten(), g.flatten().double())
    assert torch.allclose(layer.usage, expected)
    assert math.isclose(layer.usage.sum().item(), 30 * 3, rel_tol=1e-6)  # softmax: each head sums to 1


def test_million_experts_builds_and_runs():
    torch.manual_seed(0)
    layer = PEER(64, num_experts=1024**2, heads=8, topk=16, key_dim=128)
    x = torch.randn(2, 32, 64)
    y = layer(x)
    assert y.shape == x.shape and torch.isfinite(y).all()
    y.sum().backward()
    assert layer.u.grad is not None and layer.query_proj.weight.grad is not None
    g, idx = layer.eval().retrieve(x[0, :4])
    top, ids = brute_force(layer, x[0, :4])
    assert torch.equal(torch.sort(idx, -1).values, torch.sort(ids, -1).values)


def test_reference_backend_never_calls_the_fused_top_k(monkeypatch):
    """backend="reference" is plain PyTorch end to end: retrieval too, not only the expert mix."""
    from peer import ops

    def boom(*a, **k):
        raise AssertionError("the C++ top-k was called for backend='reference'")

    monkeypatch.setattr("peer.ops.product_topk", boom)
    layer = make(backend="reference")
    layer(torch.randn(7, 16)).sum().backward()
    auto = make(backend="auto")
    if ops.topk_engine("auto", torch.ones(1, 1, 2), auto.index.keys) == "cpp":  # the patch catches the kernel when used
        with pytest.raises(AssertionError, match="C\\+\\+ top-k"):
            auto(torch.randn(7, 16))


def test_float64_layer_routes_in_float64_and_passes_gradcheck():
    """A float64 layer scores keys in float64 (no float32 round trip), so gradcheck holds."""
    torch.manual_seed(0)
    layer = make(n=16, heads=2, topk=3, backend="reference").double().eval()
    x = torch.randn(4, 16, dtype=torch.float64, requires_grad=True)
    g, _ = layer.retrieve(x)
    assert g.dtype == torch.float64
    assert torch.autograd.gradcheck(lambda t: layer(t), (x,), eps=1e-6, atol=1e-5)


def test_input_dtype_mismatch_is_one_clear_error():
    layer = make()
    with pytest.raises(ValueError, match="input dtype torch.float64 differs from the layer's torch.float32"):
        layer(torch.randn(3, 16, dtype=torch.float64))
    with torch.autocast("cpu", dtype=torch.bfloat16):  # mixed dtypes are autocast's job
        assert layer(torch.randn(3, 16)).shape == (3, 16)
