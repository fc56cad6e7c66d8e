"""The fused expert mix (C++ and PyTorch paths, Triton under the interpreter) and the fast product-key
top-k against the reference implementations: outputs and every gradient."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from peer import ops
from peer.layers import PEER
from peer.layers.index import ProductKeyIndex
from peer.ops import KernelUnavailable, cpu, expert_mix, fused_mix, reference_expert_mix, topk, torch_engine

HAS_CPP = cpu.available()
ENGINES = [
    pytest.param("cpp", marks=pytest.mark.skipif(not HAS_CPP, reason="no C++ compiler: kernel not built")),
    "torch",
]
FAST = "cpp" if HAS_CPP else "torch"


@pytest.fixture
def engine(request, monkeypatch):
    """Run the test on one engine of the fused backend: the C++ kernels, or the torch engine (the
    C++ library disabled, as PEER_NO_CPP_KERNEL=1 does, so layers take the torch engine too)."""
    if request.param == "torch":
        monkeypatch.setenv("PEER_NO_CPP_KERNEL", "1")
    return request.param


def _tables(N, d, glu, dtype=torch.float32):
    ts = [torch.randn(N, d).to(dtype).requires_grad_() for _ in range(3 if glu else 2)]
    return ts[0], ts[1], (ts[2] if glu else None)


def _close(a, b, rel):
    """|a - b| <= rel * (max |b| + |b|): float tolerance relative to the scale of the expected tensor."""
    a, b = a.detach(), b.detach()
    return torch.allclose(a, b, atol=rel * float(b.abs().max()) + 1e-7, rtol=rel)


def _grads(y, params, dy):
    gs = torch.autograd.grad(y, params, dy)
    return [g.to_dense() if g.is_sparse else g for g in gs]


@pytest.mark.parametrize("engine", ENGINES, indirect=True)
@pytest.mark.parametrize("activation", ["gelu", "relu"])
@pytest.mark.parametrize("glu", [False, True])
@pytest.mark.parametrize("T,d,N,m", [(1, 8, 5, 1), (37, 24, 100, 12), (9, 64, 16, 32)])
def test_fused_equals_reference(engine, activation, glu, T, d, N, m):
    x = torch.randn(T, d, requires_grad=True)
    g = torch.rand(T, m, requires_grad=True)
    u, v, gate = _tables(N, d, glu)
    idx = torch.randint(0, N, (T, m))
    if m > 1:
        idx[:, 1] = idx[:, 0]  # the same expert twice in one token (two heads picking it)
    params = [x, g, u, v] + ([gate] if glu else [])
    y_ref = reference_expert_mix(x, u, v, idx, g, activation, gate)
    dy = torch.randn_like(y_ref)
    g_ref = _grads(y_ref, params, dy)
    y = fused_mix(x, u, v, idx, g, activation, gate, engine=engine)
    assert _close(y, y_ref, 1e-5)
    for a, b in zip(_grads(y, params, dy), g_ref, strict=True):
        assert _close(a, b, 2e-5)


@pytest.mark.parametrize("engine", ENGINES, indirect=True)
def test_sparse_table_grads_hold_exactly_the_retrieved_rows(engine):
    T, d, N, m = 20, 16, 500, 6
    x, g = torch.randn(T, d, requires_grad=True), torch.rand(T, m)
    u, v, _ = _tables(N, d, False)
    idx = torch.randint(0, N, (T, m))
    dy = torch.randn(T, d)
    dense = _grads(reference_expert_mix(x, u, v, idx, g), [u, v], dy)
    gu, gv = torch.autograd.grad(fused_mix(x, u, v, idx, g, sparse_grad=True, engine=engine), [u, v], dy)
    for sp, ref in ((gu, dense[0]), (gv, dense[1])):
        assert sp.is_sparse and sp.is_coalesced() and sp.shape == (N, d)
        assert torch.equal(sp.indices()[0], torch.unique(idx))  # every retrieved row, nothing else
        assert torch.allclose(sp.to_dense(), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("engine", ENGINES, indirect=True)
@pytest.mark.parametrize("glu", [False, True])
def test_bf16_tables_accumulate_in_fp32(engine, glu):
    """bf16 tables: exactly the fp32 computation on the bf16 values, table grads rounded once to bf16."""
    T, d, N, m = 16, 64, 64, 8  # d % 64 == 0: the AVX-512 bf16 loads of the C++ kernel
    x, g = torch.randn(T, d, requires_grad=True), torch.rand(T, m, requires_grad=True)
    u, v, gate = _tables(N, d, glu, torch.bfloat16)
    u32, v32 = u.detach().float().requires_grad_(), v.detach().float().requires_grad_()
    gate32 = gate.detach().float().requires_grad_() if glu else None
    idx = torch.randint(0, N, (T, m))
    dy = torch.randn(T, d)
    ref_params = [x, g, u32, v32] + ([gate32] if glu else [])
    y_ref = reference_expert_mix(x, u32, v32, idx, g, "gelu", gate32)
    g_ref = _grads(y_ref, ref_params, dy)
    y = fused_mix(x, u, v, idx, g, "gelu", gate, engine=engine)
    assert y.dtype == torch.float32
    assert _close(y, y_ref, 1e-5)
    got = _grads(y, [x, g, u, v] + ([gate] if glu else []), dy)
    for k, (a, b) in enumerate(zip(got, g_ref, strict=True)):
        if k < 2:  # x, g: fp32 results
            assert _close(a, b, 2e-5)
        else:  # table grads: bf16, within one bf16 rounding of the fp32 sum
            assert a.dtype == torch.bfloat16
            assert torch.allclose(a.float(), b, atol=2e-5 * float(b.abs().max()), rtol=2**-8)


@pytest.mark.parametrize("engine", ENGINES, indirect=True)
@pytest.mark.parametrize(
    "activation,score,glu,shared_keys,heads,topk",
    [
        ("gelu", "softmax", False, True, 4, 5),
        ("relu", "sigmoid", False, False, 3, 8),
        ("gelu", "softmax", True, True, 2, 3),
        ("relu", "softmax", True, False, 8, 1),
    ],
)
def test_fused_layer_equals_reference_layer(engine, activation, score, glu, shared_keys, heads, topk):
    """The whole PEER layer: outputs and the gradients of x, queries, keys, u, v, gate, BatchNorm."""
    torch.manual_seed(1)
    kw = dict(
        dim=24,
        num_experts=100,
        heads=heads,
        topk=topk,
        key_dim=8,
        activation=activation,
        score=score,
        glu=glu,
        shared_keys=shared_keys,
    )
    ref = PEER(backend="reference", **kw).train()
    fast = PEER(backend="fused", **kw).train()
    fast.load_state_dict(ref.state_dict())
    x = torch.randn(3, 7, 24)
    xs = [x.clone().requires_grad_() for _ in range(2)]
    ys = [layer(xi) for layer, xi in zip((ref, fast), xs, strict=True)]
    assert torch.allclose(ys[1], ys[0], atol=1e-5, rtol=1e-5)
    dy = torch.randn_like(ys[0])
    for y in ys:
        y.backward(dy)
    assert torch.allclose(xs[1].grad, xs[0].grad, atol=1e-5, rtol=1e-4)
    for (name, p_ref), p_fast in zip(ref.named_parameters(), fast.parameters(), strict=True):
        assert torch.allclose(p_fast.grad, p_ref.grad, atol=1e-5, rtol=1e-4), name


def test_auto_backend_is_fused_on_cpu():
    T, d, N, m = 4, 8, 10, 3
    x, g, idx = torch.randn(T, d), torch.rand(T, m), torch.randint(0, N, (T, m))
    u, v = torch.randn(N, d), torch.randn(N, d)
    assert torch.allclose(expert_mix(x, u, v, idx, g, backend="auto"), reference_expert_mix(x, u, v, idx, g), atol=1e-5)


def test_bad_inputs_are_named():
    x, u, v = torch.randn(4, 8), torch.randn(10, 8), torch.randn(10, 8)
    g, idx = torch.rand(4, 3), torch.randint(0, 10, (4, 3))
    with pytest.raises(ValueError, match="idx must lie in"):
        fused_mix(x, u, v, idx + 10, g, engine=FAST)
    with pytest.raises(ValueError, match="idx and g"):
        fused_mix(x, u, v, idx, g[:, :2], engine=FAST)
    with pytest.raises(ValueError, match="activation"):
        fused_mix(x, u, v, idx, g, "tanh", engine=FAST)
    with pytest.raises(ValueError, match="table v"):
        fused_mix(x, u, torch.randn(10, 7), idx, g, engine=FAST)


def test_gradient_buffers_are_recycled_but_never_overwritten_while_held():
    T, d, N, m = 8, 16, 50, 4
    x, g = torch.randn(T, d), torch.rand(T, m)
    u, v, _ = _tables(N, d, False)
    dy = torch.randn(T, d)
    ids = [torch.randint(0, N, (T, m)) for _ in range(3)]

    def grad_u(idx):
        return torch.autograd.grad(fused_mix(x, u, v, idx, g, engine=FAST), [u], dy)[0]

    held = grad_u(ids[0])
    snapshot = held.clone()
    second = grad_u(ids[1])
    assert torch.equal(held, snapshot), "a gradient still referenced was overwritten"
    assert held.data_ptr() != second.data_ptr()
    ptr = second.data_ptr()
    del second  # nothing views that buffer any more: the next backward reuses it
    third = grad_u(ids[2])
    assert third.data_ptr() == ptr and torch.equal(held, snapshot)
    expected = _grads(reference_expert_mix(x, u, v, ids[2], g), [u], dy)[0]
    assert torch.allclose(third, expected, atol=1e-5)  # re-zeroed: no rows left over from ids[1]


@pytest.mark.skipif(not HAS_CPP, reason="no C++ compiler: kernel not built")
def test_cpp_sort_pairs_groups_pairs_by_expert():
    idx = torch.randint(0, 37, (50, 6))
    rows, perm, offsets = cpu.sort_pairs(idx, 37)
    rows_t, perm_t, offsets_t = torch_engine.sort_pairs(idx, 37)
    assert torch.equal(rows, rows_t) and torch.equal(offsets, offsets_t)
    flat = idx.flatten()
    for r in range(rows.numel()):
        seg = perm[offsets[r] : offsets[r + 1]]
        assert (flat[seg] == rows[r]).all() and torch.equal(seg, seg.sort().values)  # stable within a bag
    assert torch.equal(perm.sort().values, torch.arange(idx.numel()))


# ---------------------------------------------------------------------------- product-key top-k
@pytest.mark.skipif(not HAS_CPP, reason="no C++ compiler: kernel not built")
@pytest.mark.parametrize(
    "groups,T,h,n,kd,k",
    [
        (1, 37, 4, 12, 8, 6),
        (4, 37, 4, 12, 8, 6),
        (1, 64, 8, 64, 32, 16),
        (1, 10, 2, 5, 4, 5),
        (3, 5, 3, 40, 16, 1),
        (1, 50, 4, 256, 16, 8),
        (2, 33, 2, 64, 8, 3),
    ],
)  # vector paths: n % 16 == 0
def test_fast_topk_equals_reference(groups, T, h, n, kd, k):
    index = ProductKeyIndex(n * n, kd, groups)
    q = torch.randn(T, h, kd, requires_grad=True)
    s1, i1 = topk.product_topk(q, index.keys, k)
    s2, i2 = index.topk_reference(q, k)
    assert torch.equal(s1, s2)  # same values, best first
    assert torch.equal(i1.sort(-1).values, i2.sort(-1).values)
    # an upstream gradient that depends only on the expert id, so ties may come in any order
    G1, G2 = torch.sin(i1.float() * 0.37), torch.sin(i2.float() * 0.37)
    g1 = torch.autograd.grad(s1, [q, index.keys], G1)
    g2 = torch.autograd.grad(s2, [q, index.keys], G2)
    for a, b in zip(g1, g2, strict=True):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(not HAS_CPP, reason="no C++ compiler: kernel not built")
@pytest.mark.parametrize("n,k", [(64, 5), (256, 8), (64, 16), (48, 4), (10, 3)])
def test_fast_topk_with_many_ties_is_exact(n, k):
    # integer sub-key scores in 0..3: most scores tie, also across the k-th place
    T, h = 40, 2
    s = torch.randint(0, 4, (T, h, 2, n), generator=torch.Generator().manual_seed(n + k)).float()
    scores, ids = torch.empty(T, h, k), torch.empty(T, h, k, dtype=torch.int64)
    ab = torch.empty(T, h, k, 2, dtype=torch.int64)
    cpu.pk_topk(s, k, scores, ids, ab)
    full = (s[:, :, 0, :, None] + s[:, :, 1, None, :]).reshape(T, h, n * n)
    assert torch.equal(scores, full.topk(k, -1).values)  # the k best values, best first
    assert torch.equal(full.gather(-1, ids), scores)  # each id scores what it says
    assert torch.equal(ids, ab[..., 0] * n + ab[..., 1])
    assert (ids.sort(-1).values.diff(dim=-1) > 0).all()  # k distinct experts
    again = torch.empty_like(ids)
    cpu.pk_topk(s.clone(), k, scores.clone(), again, ab.clone())
    assert torch.equal(again, ids)  # ties are broken the same way every time


@pytest.mark.skipif(not HAS_CPP, reason="no C++ compiler: kernel not built")
def test_kernels_on_two_threads_equal_one_thread():
    # the suite runs on one thread (conftest); the kernels' threaded paths must give the same answers
    torch.manual_seed(0)
    T, h, kd, k, d, N = 300, 4, 16, 8, 32, 64 * 64
    index = ProductKeyIndex(N, kd, 1)
    q = torch.randn(T, h, kd)
    x, g = torch.randn(T, d), torch.rand(T, h * k)
    u, v = torch.randn(N, d), torch.randn(N, d)
    dy = torch.randn(T, d)

    def run():
        qq, kk = q.clone().requires_grad_(), index.keys.detach().clone().requires_grad_()
        sc, ids = topk.product_topk(qq, kk, k)
        dq, dk = torch.autograd.grad(sc, [qq, kk], torch.cos(sc))
        xx, gg = x.clone().requires_grad_(), g.clone().requires_grad_()
        uu, vv = u.clone().requires_grad_(), v.clone().requires_grad_()
        y = fused_mix(xx, uu, vv, ids.view(T, h * k), gg, "gelu", None, engine="cpp")
        return [sc, ids, dq, dk, y, *torch.autograd.grad(y, [xx, gg, uu, vv], dy)]

    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = run()
        torch.set_num_threads(2)
        two = run()
    finally:
        torch.set_num_threads(threads)
    for i, (a, b) in enumerate(zip(one, two, strict=True)):
        if i == 3:  # sub-key gradients: per-thread partial sums, added in another order
            assert torch.allclose(a, b, rtol=1e-5, atol=1e-5)
        else:
            assert torch.equal(a, b), i


def test_index_topk_matches_brute_force_over_all_keys():
    index = ProductKeyIndex(20 * 20, 16, 1)
    q = torch.randn(30, 2, 16)
    scores, ids = index.topk(q, 7)
    full = torch.einsum("thd,nd->thn", q, index.full_keys()[0])
    top, top_ids = full.topk(7, dim=-1)
    assert torch.allclose(scores, top, atol=1e-5)
    assert torch.equal(ids.sort(-1).values, top_ids.sort(-1).values)


# ---------------------------------------------------------------------------- Triton (interpreter)
_TRITON_SCRIPT = textwrap.dedent("""
    import torch
    from peer.ops import fused_mix, reference_expert_mix, triton
    assert triton.available()
    torch.manual_seed(0)
    T, d, N, m = 5, 24, 40, 6
    for act in ("gelu", "relu"):
        for glu in (False, True):
            for sparse in (False, True):
                for dt in (torch.float32, torch.bfloat16):
                    x = torch.randn(T, d, requires_grad=True); g = torch.rand(T, m, requires_grad=True)
                    ts = [torch.randn(N, d).to(dt).requires_grad_() for _ in range(3)]
                    u, v, gate = ts[0], ts[1], ts[2] if glu else None
                    ups = [t.detach().float().requires_grad_() for t in ts]
                    idx = torch.randint(0, N, (T, m)); idx[:, 1] = idx[:, 0]
                    dy = torch.randn(T, d)
                    yr = reference_expert_mix(x, ups[0], ups[1], idx, g, act, ups[2] if glu else None)
                    ref = torch.autograd.grad(yr, [x, g] + ups[:3 if glu else 2], dy)
                    y = fused_mix(x, u, v, idx, g, act, gate, sparse_grad=sparse, engine="triton")
                    got = torch.autograd.grad(y, [x, g] + ts[:3 if glu else 2], dy)
                    assert torch.allclose(y, yr, atol=1e-5 * float(yr.abs().max()), rtol=1e-5), (act, glu, sparse, dt)
                    for k, (a, b) in enumerate(zip(got, ref)):
                        a = (a.to_dense() if a.is_sparse else a).float()
                        tol = 2e-5 if k < 2 or dt == torch.float32 else 2**-8
                        atol = tol * float(b.abs().max()) if tol < 1e-3 else 1e-6
                        assert torch.allclose(a, b, atol=atol, rtol=tol), (act, glu, sparse, dt, k)
    print("TRITON-OK")
""")


def test_triton_kernel_under_interpreter_equals_reference():
    pytest.importorskip("triton", reason="triton is not installed (pip install peer-experts[triton])")
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, "-c", _TRITON_SCRIPT], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and "TRITON-OK" in proc.stdout, proc.stderr[-3000:]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (the Triton kernels compiled)")
@pytest.mark.parametrize("glu", [False, True])
@pytest.mark.parametrize("sparse", [False, True])
def test_triton_on_cuda_equals_reference(glu, sparse):
    T, d, N, m = 64, 128, 1000, 16
    dev = "cuda"
    x = torch.randn(T, d, device=dev, requires_grad=True)
    g = torch.rand(T, m, device=dev, requires_grad=True)
    ts = [torch.randn(N, d, device=dev, requires_grad=True) for _ in range(3 if glu else 2)]
    idx = torch.randint(0, N, (T, m), device=dev)
    idx[:, 1] = idx[:, 0]
    dy = torch.randn(T, d, device=dev)
    gate = ts[2] if glu else None
    y_ref = reference_expert_mix(x, ts[0], ts[1], idx, g, "gelu", gate)
    ref = _grads(y_ref, [x, g, *ts], dy)
    y = expert_mix(x, ts[0], ts[1], idx, g, "gelu", gate, backend="triton", sparse_grad=sparse)
    assert _close(y, y_ref, 1e-4)
    for a, b in zip(_grads(y, [x, g, *ts], dy), ref, strict=True):
        assert _close(a, b, 1e-4)


@pytest.fixture
def broken_compiler(monkeypatch, tmp_path):
    """The C++ library rebuilt with a compiler that always fails (and a fresh cache), then restored."""
    monkeypatch.setenv("CXX", "false")
    monkeypatch.setenv("PEER_KERNEL_CACHE", str(tmp_path))
    monkeypatch.setattr(ops, "_warned", set())
    cpu.LIB.reset()
    yield
    monkeypatch.undo()
    cpu.LIB.reset()


def test_failed_build_is_an_error_for_fused_and_the_reference_for_auto(broken_compiler):
    """No working compiler: backend="fused" says so (with the compiler's message); "auto" warns once
    and computes with the reference, which it equals."""
    x, g, idx = torch.randn(6, 8), torch.rand(6, 3), torch.randint(0, 10, (6, 3))
    u, v = torch.randn(10, 8), torch.randn(10, 8)
    with pytest.raises(KernelUnavailable, match="building cpu_kernels failed"):
        expert_mix(x, u, v, idx, g, backend="fused")
    with pytest.warns(UserWarning, match="reference"):
        assert ops.mix_engine("auto", x, (u, v)) == "reference"
    assert _close(expert_mix(x, u, v, idx, g, backend="auto"), reference_expert_mix(x, u, v, idx, g), 1e-5)
    with pytest.warns(UserWarning, match="top-k with the PyTorch reference"):
        assert ops.topk_engine("auto", torch.randn(2, 1, 4), torch.randn(1, 2, 3, 2)) == "reference"
    with pytest.raises(KernelUnavailable):
        ops.topk_engine("fused", torch.randn(2, 1, 4), torch.randn(1, 2, 3, 2))


def test_disabled_kernels_give_the_torch_engine(monkeypatch):
    monkeypatch.setenv("PEER_NO_CPP_KERNEL", "1")
    x, u = torch.randn(3, 4), torch.randn(9, 4)
    assert ops.mix_engine("fused", x, (u, u)) == "torch" and ops.mix_engine("auto", x, (u, u)) == "torch"
    assert ops.mix_engine("fused", x.double(), (u.double(), u.double())) == "torch"
    with pytest.raises(ValueError, match="backend must be one of"):
        ops.mix_engine("fast", x, (u, u))
