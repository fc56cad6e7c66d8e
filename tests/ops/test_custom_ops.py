"""The operators are real PyTorch ops: torch.library.opcheck on each (schema, fake tensors, autograd
registration, AOT dispatch), and a PeerLM with PEER compiles with fullgraph=True and trains with the
same losses as eager."""

import pytest
import torch
from torch.library import opcheck

from peer.ops import cpu
from peer.train import adamw_kernel

HAS_CPP = cpu.available()
ENGINES = [pytest.param("cpp", marks=pytest.mark.skipif(not HAS_CPP, reason="no C++ compiler")), "torch"]


def _mix_args(glu: bool, engine: str, sparse: bool, T=6, d=16, N=40, m=5):
    torch.manual_seed(0)
    x = torch.randn(T, d, requires_grad=True)
    g = torch.rand(T, m, requires_grad=True)
    u, v = torch.randn(N, d, requires_grad=True), torch.randn(N, d, requires_grad=True)
    gate = torch.randn(N, d, requires_grad=True) if glu else None
    idx = torch.randint(0, N, (T, m))
    idx[:, 1] = idx[:, 0]
    return x, g, idx, u, v, gate, "gelu", engine, sparse


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("glu", [False, True])
def test_opcheck_expert_mix(engine, glu):
    # dense table gradients: every test of opcheck, autograd registration included
    opcheck(torch.ops.peer.expert_mix.default, _mix_args(glu, engine, False))


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("glu", [False, True])
def test_opcheck_expert_mix_backward_ops(engine, glu):
    x, g, idx, u, v, gate, act, eng, _ = _mix_args(glu, engine, False)
    y, h, hg = torch.ops.peer.expert_mix(x, g, idx, u, v, gate, act, eng, False)
    dy = torch.randn_like(y)
    args = (
        dy,
        x.detach(),
        g.detach(),
        idx,
        u.detach(),
        v.detach(),
        None if gate is None else gate.detach(),
        h.detach(),
        hg.detach(),
        act,
        eng,
        True,
        True,
        True,
        glu,
    )
    opcheck(torch.ops.peer.expert_mix_backward.default, args)
    # the row gradients have a data-dependent row count (a fake unbacked size): schema and fake checks
    opcheck(torch.ops.peer.expert_mix_backward_rows.default, args, test_utils=("test_schema", "test_faketensor"))


@pytest.mark.skipif(not HAS_CPP, reason="no C++ compiler")
@pytest.mark.parametrize("groups", [1, 3])
def test_opcheck_pk_topk(groups):
    torch.manual_seed(0)
    q = torch.randn(7, 3, 8, requires_grad=True)
    keys = (torch.randn(groups, 2, 10, 4) / 2).requires_grad_()
    opcheck(torch.ops.peer.pk_topk.default, (q, keys, 4))
    scores, ids, ab = torch.ops.peer.pk_topk(q, keys, 4)
    opcheck(torch.ops.peer.pk_topk_backward.default, (torch.randn_like(scores), ab, q.detach(), keys.detach()))


@pytest.mark.skipif(adamw_kernel.LIB.get() is None, reason="no C++ compiler")
@pytest.mark.parametrize("rowwise", [False, True])
def test_opcheck_adamw_rows(rowwise):
    N, d = 12, 8
    p, m = torch.randn(N, d), torch.zeros(N, d)
    v = torch.zeros(N) if rowwise else torch.zeros(N, d)
    rows = torch.tensor([1, 4, 7])
    g = torch.randn(3, d)
    opcheck(torch.ops.peer.adamw_rows.default, (p, m, v, g, rows, 1e-2, 0.9, 0.95, 1e-8, 0.1, 0.1, 0.05, rowwise))
    before = p.clone()
    torch.ops.peer.adamw_rows(p, m, v, g, rows, 1e-2, 0.9, 0.95, 1e-8, 0.1, 0.1, 0.05, rowwise)
    changed = (p != before).any(1)
    assert changed[rows].all() and not changed[[0, 2, 3, 5, 6, 8, 9, 10, 11]].any()  # mutates the rows, in place


def _tiny_lm(backend: str):
    from peer.config import ModelConfig, PEERConfig
    from peer.model import PeerLM

    torch.manual_seed(0)
    cfg = ModelConfig(
        vocab_size=64,
        d_model=32,
        n_layers=2,
        n_heads=2,
        d_ff=64,
        max_seq_len=16,
        sparse_layer="peer",
        peer=PEERConfig(num_experts=64, heads=2, topk=4, key_dim=8, backend=backend),
    )
    return PeerLM(cfg)


def _train(model, steps: int, compiler: str | None):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    step_model = torch.compile(model, fullgraph=True, backend=compiler) if compiler else model
    gen = torch.Generator().manual_seed(1)
    losses = []
    for _ in range(steps):
        tokens = torch.randint(0, 64, (4, 17), generator=gen)
        loss = step_model(tokens[:, :-1], tokens[:, 1:]).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize(
    "backend,compiler",
    [
        pytest.param("fused", "aot_eager", marks=pytest.mark.skipif(not HAS_CPP, reason="no C++")),
        ("reference", "aot_eager"),
        pytest.param(
            "fused",
            "inductor",
            marks=[
                pytest.mark.slow,  # ~1 min of C++ code generation
                pytest.mark.skipif(not HAS_CPP, reason="no C++"),
            ],
        ),
    ],
)
def test_peer_lm_compiles_fullgraph_and_trains_like_eager(backend, compiler):
    """fullgraph=True fails on any graph break: the custom ops (top-k and expert mix, forward and
    backward) must be traceable with their fake implementations. Same losses as eager."""
    torch._dynamo.reset()
    eager = _train(_tiny_lm(backend), 4, None)
    compiled = _train(_tiny_lm(backend), 4, compiler)
    assert compiled == pytest.approx(eager, rel=1e-5, abs=1e-6)
    assert eager[-1] < eager[0]
