"""Row-wise (lazy) AdamW: equal to torch AdamW where the semantics say so, equal to a per-row brute force
elsewhere, and wired to the fused PEER kernel's sparse gradients; sparse-aware gradient clipping."""

import io

import pytest
import torch

from peer.layers import PEER
from peer.train import adamw_kernel
from peer.train.sparse_optim import SparseRowAdamW, clip_grad_norm_, coalesced

PATHS = [
    pytest.param("cpp", marks=pytest.mark.skipif(adamw_kernel.LIB.get() is None, reason="no C++ compiler")),
    "torch",
]
HP = dict(lr=1e-2, betas=(0.9, 0.95), eps=1e-8)


@pytest.fixture
def path(request, monkeypatch):
    if request.param == "torch":
        monkeypatch.setenv("PEER_NO_CPP_KERNEL", "1")
    return request.param


def _sparse(g: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    rows = torch.unique(rows)
    return torch.sparse_coo_tensor(rows[None], g[rows], g.shape, check_invariants=True).coalesce()


@pytest.mark.parametrize("path", PATHS, indirect=True)
@pytest.mark.parametrize("wd", [0.0, 0.1])
def test_all_rows_touched_equals_adamw(path, wd):
    torch.manual_seed(0)
    p1 = torch.nn.Parameter(torch.randn(40, 8))
    p2 = torch.nn.Parameter(p1.detach().clone())
    o1 = torch.optim.AdamW([p1], weight_decay=wd, **HP)
    o2 = SparseRowAdamW([p2], weight_decay=wd, **HP)
    for _ in range(6):
        g = torch.randn(40, 8)
        p1.grad, p2.grad = g.clone(), _sparse(g, torch.arange(40))
        o1.step()
        o2.step()
    assert torch.allclose(p1, p2, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("path", PATHS, indirect=True)
@pytest.mark.parametrize("wd", [0.0, 0.1])
def test_one_step_from_zero_state_equals_adamw_on_touched_rows(path, wd):
    torch.manual_seed(0)
    p1 = torch.nn.Parameter(torch.randn(30, 6))
    p2 = torch.nn.Parameter(p1.detach().clone())
    start = p1.detach().clone()
    rows = torch.tensor([0, 3, 4, 17, 29])
    g = torch.zeros(30, 6)
    g[rows] = torch.randn(5, 6)
    p1.grad, p2.grad = g.clone(), _sparse(g, rows)
    torch.optim.AdamW([p1], weight_decay=wd, **HP).step()
    SparseRowAdamW([p2], weight_decay=wd, **HP).step()
    assert torch.allclose(p2[rows], p1[rows], atol=1e-7)
    assert not torch.allclose(p2[rows], start[rows])
    untouched = torch.ones(30, dtype=torch.bool)
    untouched[rows] = False
    assert torch.equal(p2[untouched], start[untouched])  # lazy: rows absent from the gradient stay put
    if wd == 0:
        assert torch.allclose(p2, p1, atol=1e-7)  # AdamW with zero grad and zero state moves nothing either
    else:
        assert not torch.allclose(p1[untouched], start[untouched])  # AdamW decays them, lazy AdamW does not


def _lazy_adamw_brute_force(p, grads, lr, b1, b2, eps, wd, rowwise=False):
    """Per-row loop of the documented semantics (global step count; untouched rows frozen)."""
    p = p.clone().double()
    m = torch.zeros_like(p)
    v = torch.zeros(p.shape[0], dtype=torch.float64) if rowwise else torch.zeros_like(p)
    for t, (g, rows) in enumerate(grads, start=1):
        g = g.double()
        for r in torch.unique(rows).tolist():
            p[r] *= 1 - lr * wd
            m[r] = b1 * m[r] + (1 - b1) * g[r]
            if rowwise:
                v[r] = b2 * v[r] + (1 - b2) * (g[r] ** 2).mean()
            else:
                v[r] = b2 * v[r] + (1 - b2) * g[r] ** 2
            denom = (v[r] / (1 - b2**t)).sqrt() + eps
            p[r] -= lr * (m[r] / (1 - b1**t)) / denom
    return p


@pytest.mark.parametrize("path", PATHS, indirect=True)
@pytest.mark.parametrize("rowwise", [False, True])
def test_partial_rows_over_many_steps_equal_brute_force(path, rowwise):
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(25, 5))
    start = p.detach().clone()
    opt = SparseRowAdamW([p], weight_decay=0.05, rowwise=rowwise, **HP)
    grads = []
    for _ in range(7):
        rows = torch.randint(0, 25, (8,))
        g = torch.randn(25, 5)
        grads.append((g, rows))
        p.grad = _sparse(g, rows)
        opt.step()
    expected = _lazy_adamw_brute_force(start, grads, HP["lr"], *HP["betas"], HP["eps"], 0.05, rowwise)
    assert torch.allclose(p.double(), expected, atol=1e-6)
    assert opt.state[p]["exp_avg_sq"].shape == ((25,) if rowwise else (25, 5))


@pytest.mark.parametrize("path", PATHS, indirect=True)
def test_bf16_state_tracks_fp32_state(path):
    torch.manual_seed(0)
    p1 = torch.nn.Parameter(torch.randn(30, 16))
    p2 = torch.nn.Parameter(p1.detach().clone())
    start = p1.detach().clone()
    o1, o2 = SparseRowAdamW([p1], **HP), SparseRowAdamW([p2], state_dtype="bfloat16", **HP)
    for _ in range(5):
        rows = torch.randint(0, 30, (10,))
        g = torch.randn(30, 16)
        p1.grad, p2.grad = _sparse(g, rows), _sparse(g, rows)
        o1.step()
        o2.step()
    assert o2.state[p2]["exp_avg"].dtype == torch.bfloat16
    assert (p1 - start).abs().max() > 1e-2  # the parameters did move
    assert torch.allclose(p2, p1, atol=1e-3)  # bf16 moments: ~0.4% relative error on each update


def test_dense_gradient_counts_as_every_row():
    torch.manual_seed(0)
    p1 = torch.nn.Parameter(torch.randn(10, 4))
    p2 = torch.nn.Parameter(p1.detach().clone())
    o1, o2 = torch.optim.AdamW([p1], weight_decay=0.1, **HP), SparseRowAdamW([p2], weight_decay=0.1, **HP)
    for _ in range(3):
        g = torch.randn(10, 4)
        p1.grad, p2.grad = g.clone(), g.clone()
        o1.step()
        o2.step()
    assert torch.allclose(p1, p2, atol=1e-6)


@pytest.mark.parametrize("state_dtype", [None, "bfloat16"])
def test_state_dict_round_trip_resumes_exactly(state_dtype):
    torch.manual_seed(0)
    grads = [(torch.randn(20, 4), torch.randint(0, 20, (6,))) for _ in range(6)]

    def run(p, opt, gs):
        for g, rows in gs:
            p.grad = _sparse(g, rows)
            opt.step()

    p = torch.nn.Parameter(torch.randn(20, 4))
    q = torch.nn.Parameter(p.detach().clone())
    o = SparseRowAdamW([p], state_dtype=state_dtype, rowwise=True, **HP)
    run(p, o, grads)
    oq = SparseRowAdamW([q], state_dtype=state_dtype, rowwise=True, **HP)
    run(q, oq, grads[:3])
    buf = io.BytesIO()
    torch.save({"p": q.detach().clone(), "opt": oq.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf)
    r = torch.nn.Parameter(saved["p"])
    o2 = SparseRowAdamW([r], state_dtype=state_dtype, rowwise=True, **HP)
    o2.load_state_dict(saved["opt"])
    assert o2.state[r]["exp_avg"].dtype == (torch.bfloat16 if state_dtype else torch.float32)
    run(r, o2, grads[3:])
    assert torch.equal(r, p)


def test_bad_arguments_are_named():
    p = torch.nn.Parameter(torch.randn(4, 4))
    for kwargs, match in (
        (dict(lr=-1), "lr"),
        (dict(betas=(1.0, 0.9)), "betas"),
        (dict(eps=-1), "eps"),
        (dict(weight_decay=-1), "weight_decay"),
        (dict(state_dtype="float16"), "state_dtype"),
    ):
        with pytest.raises(ValueError, match=match):
            SparseRowAdamW([p], **kwargs)
    with pytest.raises(ValueError, match="2-D"):
        SparseRowAdamW([torch.nn.Parameter(torch.randn(4))])


# ---------------------------------------------------------------------------- with the PEER layer
def _peer_pair():
    torch.manual_seed(0)
    kw = dict(dim=16, num_experts=400, heads=2, topk=3, key_dim=8)
    a, b = PEER(backend="reference", **kw), PEER(backend="fused", **kw)
    b.load_state_dict(a.state_dict())
    return a, b


def test_peer_training_with_sparse_rows_equals_dense_adamw_on_retrieved_rows():
    """Fused PEER + SparseRowAdamW (wd=0, 1 step) == reference PEER + torch AdamW, and only retrieved rows move."""
    ref, fast = _peer_pair()
    x = torch.randn(2, 5, 16)
    o_ref = torch.optim.AdamW([ref.u, ref.v], weight_decay=0.0, **HP)
    o_fast = SparseRowAdamW([fast.u, fast.v], **HP)
    fast.sparse_grad = True  # the layer's choice, as nn.Embedding(sparse=True)
    start = fast.u.detach().clone()
    for layer in (ref, fast):
        layer(x).pow(2).sum().backward()
    assert fast.u.grad.is_sparse and not ref.u.grad.is_sparse
    _, idx = fast.retrieve(x)
    touched = torch.zeros(400, dtype=torch.bool)
    touched[idx.flatten()] = True
    assert torch.equal(coalesced(fast.u.grad).indices()[0], torch.nonzero(touched).squeeze(1))
    o_ref.step()
    o_fast.step()
    assert torch.allclose(fast.u, ref.u, atol=1e-6) and torch.allclose(fast.v, ref.v, atol=1e-6)
    assert torch.equal(fast.u[~touched], start[~touched])


def test_gradient_accumulation_of_sparse_grads():
    """Two backward passes add up (uncoalesced sparse grads), and the step sees their sum."""
    ref, fast = _peer_pair()
    o_ref = torch.optim.AdamW([ref.u, ref.v], weight_decay=0.0, **HP)
    o_fast = SparseRowAdamW([fast.u, fast.v], **HP)
    xs = [torch.randn(4, 16), torch.randn(4, 16)]
    for layer in (ref, fast):
        for x in xs:
            layer(x).pow(2).sum().backward()
    o_ref.step()
    o_fast.step()
    assert torch.allclose(fast.u, ref.u, atol=1e-6) and torch.allclose(fast.v, ref.v, atol=1e-6)


def test_clip_grad_norm_handles_sparse_and_dense_like_torch():
    torch.manual_seed(0)
    dense = [torch.nn.Parameter(torch.randn(5, 3)) for _ in range(2)]
    sparse = [torch.nn.Parameter(torch.randn(9, 3)) for _ in range(2)]
    ref = [torch.nn.Parameter(p.detach().clone()) for p in dense + sparse]
    for k, (p, r) in enumerate(zip(dense + sparse, ref, strict=True)):
        g = torch.randn(p.shape)
        if k >= len(dense):
            rows = torch.tensor([1, 4, 4, 7])  # uncoalesced, with a duplicate row
            p.grad = torch.sparse_coo_tensor(rows[None], g[rows], p.shape, check_invariants=True)
            r.grad = p.grad.to_dense()
        else:
            p.grad, r.grad = g.clone(), g.clone()
    n_ref = torch.nn.utils.clip_grad_norm_(ref, 0.5)
    n = clip_grad_norm_(dense + sparse, 0.5)
    assert torch.allclose(n, n_ref, atol=1e-6)
    for p, r in zip(dense + sparse, ref, strict=True):
        got = p.grad.to_dense() if p.grad.is_sparse else p.grad
        assert torch.allclose(got, r.grad, atol=1e-6)
