"""The expert-sharded PEER layer equals the single-process layer: outputs, every gradient, state.

Each worker builds the same full PEER (same seed), runs it single-process as the reference,
then shards a copy over the gloo group and compares. Uneven shards (N=49 on 3 ranks) and GLU
experts are covered; the data-parallel mode is checked against one process on the union batch.
"""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
import torch.distributed as dist
from dist_harness import spawn

from peer.distributed import (
    ExpertShardedPEER,
    comm_floats_per_token,
    gather_full_state,
    shard_bounds,
    shard_peer_layer,
    unshard_peer_layer,
)
from peer.distributed.data_parallel import reduce_usage
from peer.layers import PEER

TOL = dict(rtol=1e-5, atol=1e-6)
REPLICATED = ("query_proj.weight", "index.keys", "query_norm.weight", "query_norm.bias")


def _layer(glu: bool, norm: str, n: int = 49) -> PEER:
    torch.manual_seed(0)
    return PEER(dim=8, num_experts=n, heads=2, topk=3, key_dim=8, query_norm=norm, glu=glu, backend="reference")


def _grads(m) -> dict[str, torch.Tensor]:
    return {k: p.grad.clone() for k, p in m.named_parameters() if p.grad is not None}


def _worker_replicated(rank, world, glu, norm):
    full = _layer(glu, norm)
    sharded = shard_peer_layer(copy.deepcopy(full), dist.group.WORLD)
    torch.manual_seed(1)
    x = torch.randn(12, 8)
    w = torch.randn(12, 8)
    x_ref = x.clone().requires_grad_()
    y_ref = full(x_ref)
    (y_ref * w).sum().backward()
    x_sh = x.clone().requires_grad_()
    y = sharded(x_sh)
    (y * w).sum().backward()

    lo, hi = shard_bounds(49, world, rank)
    assert (sharded.shard_start, sharded.shard_end) == (lo, hi) and sharded.u.shape[0] == hi - lo
    torch.testing.assert_close(y, y_ref, **TOL)
    torch.testing.assert_close(x_sh.grad, x_ref.grad, **TOL)
    ref, got = _grads(full), _grads(sharded)
    for name in REPLICATED:
        if name in ref:
            torch.testing.assert_close(got[name], ref[name], **TOL, msg=name)
    for name in ("u", "v", "gate"):
        if name in ref:
            torch.testing.assert_close(got[name], ref[name][lo:hi], **TOL, msg=name)
    assert set(got) == set(ref)
    # BatchNorm running statistics move identically; the gathered state is the full layer's state
    state = gather_full_state(sharded)
    for k, t in full.state_dict().items():
        torch.testing.assert_close(state[k], t, rtol=0, atol=0, msg=k)
    on_root = gather_full_state(sharded, dst=0)
    assert (on_root is not None) == (rank == 0)
    full2 = unshard_peer_layer(sharded).eval()
    torch.testing.assert_close(full2(x), full.eval()(x), **TOL)


def _worker_data_parallel(rank, world, glu, norm):
    """Rank r brings tokens X[r]; the union batch on one process is the reference (loss = mean over ranks)."""
    full = _layer(glu, norm)
    sharded = shard_peer_layer(copy.deepcopy(full), dist.group.WORLD, data_parallel=True)
    torch.manual_seed(2)
    X, W = torch.randn(world * 5, 8), torch.randn(world * 5, 8)
    X_ref = X.clone().requires_grad_()
    y_ref = full(X_ref)
    (y_ref * W).sum().div(world).backward()  # mean over ranks of each rank's loss
    sl = slice(rank * 5, (rank + 1) * 5)
    x = X[sl].clone().requires_grad_()
    y = sharded(x)
    (y * W[sl]).sum().backward()

    torch.testing.assert_close(y, y_ref.detach()[sl], **TOL)
    # each rank's backbone receives d(sum of losses)/dx_r, which is world * d(mean)/dx_r
    torch.testing.assert_close(x.grad, X_ref.grad[sl] * world, **TOL)
    lo, hi = shard_bounds(49, world, rank)
    ref, got = _grads(full), _grads(sharded)
    for name in ("u", "v", "gate"):
        if name in ref:
            torch.testing.assert_close(got[name], ref[name][lo:hi], **TOL, msg=name)
    for name in REPLICATED:  # partial per rank; DDP's average makes them the reference
        if name in ref:
            g = got[name].clone()
            dist.all_reduce(g)
            torch.testing.assert_close(g / world, ref[name], **TOL, msg=name)
    if norm == "batchnorm":  # statistics of the whole (gathered) batch
        torch.testing.assert_close(sharded.query_norm.running_mean, full.query_norm.running_mean, **TOL)


def _worker_usage(rank, world):
    """Expert usage over all ranks: plain layers all-reduce their counts; sharded ones see every token."""
    full = _layer(False, "batchnorm").eval()
    torch.manual_seed(3)
    X = torch.randn(world * 4, 8)
    full.record_usage = True
    full(X)
    plain = copy.deepcopy(full)
    plain.reset_usage()
    plain(X[rank * 4 : (rank + 1) * 4])
    reduce_usage(plain)
    torch.testing.assert_close(plain.usage, full.usage)
    sharded = shard_peer_layer(copy.deepcopy(full), dist.group.WORLD, data_parallel=True)
    sharded.reset_usage()
    sharded.record_usage = True
    sharded(X[rank * 4 : (rank + 1) * 4])
    reduce_usage(sharded)  # left alone: already global
    torch.testing.assert_close(sharded.usage, full.usage)


def _worker(rank, world, cases):
    for mode, glu, norm in cases:
        (_worker_replicated if mode == "replicated" else _worker_data_parallel)(rank, world, glu, norm)
    if world == 2:
        _worker_usage(rank, world)


# one spawn per world size (process start-up dominates): replicated and data-parallel inputs
@pytest.mark.parametrize(
    "world,cases",
    [
        (2, [("replicated", False, "batchnorm"), ("data_parallel", False, "batchnorm")]),
        (
            3,
            [("replicated", True, "layernorm"), ("data_parallel", True, "none"), ("data_parallel", False, "batchnorm")],
        ),
    ],
)
def test_sharded_layer_equals_full_layer(world, cases):
    spawn(_worker, world, cases)


def test_single_process_shard_is_the_full_layer():
    full = _layer(False, "batchnorm")
    sharded = shard_peer_layer(copy.deepcopy(full))
    assert isinstance(sharded, ExpertShardedPEER) and sharded.u.shape == full.u.shape
    x = torch.randn(6, 8)
    torch.testing.assert_close(sharded(x), full(x), **TOL)


def test_shard_bounds_cover_rows_like_torch_chunk():
    for n, p in [(49, 3), (16, 4), (4, 3), (100, 7)]:
        bounds = [shard_bounds(n, p, r) for r in range(p)]
        assert bounds[0][0] == 0 and bounds[-1][1] == n
        assert all(a[1] == b[0] for a, b in itertools.pairwise(bounds))
        sizes = [hi - lo for lo, hi in bounds]
        chunks = [c.shape[0] for c in torch.arange(n).chunk(p)]
        assert sizes[: len(chunks)] == chunks and sum(sizes) == n
    with pytest.raises(ValueError, match="rank"):
        shard_bounds(16, 2, 2)


def test_comm_volume_is_independent_of_num_experts():
    c = comm_floats_per_token(d=512, heads=8, topk=16)
    assert c == {"forward": 128 + 512, "backward": 128 + 512, "total": 2 * 640}
    assert comm_floats_per_token(d=512, heads=8, topk=16, glu=True)["forward"] == 256 + 512


def test_rejects_non_peer_layer():
    with pytest.raises(ValueError, match="layer must be"):
        shard_peer_layer(torch.nn.Linear(2, 2))


def _meta_worker(rank: int, world: int) -> None:
    from peer.config import ModelConfig, PEERConfig
    from peer.distributed.expert_parallel import expert_shards, shard_model
    from peer.model import PeerLM

    cfg = ModelConfig(
        vocab_size=64,
        d_model=16,
        n_layers=2,
        n_heads=2,
        d_ff=32,
        max_seq_len=8,
        sparse_layer="peer",
        peer=PEERConfig(num_experts=49, heads=2, topk=3, key_dim=6, glu=True),
    )
    torch.manual_seed(7)
    full = PeerLM(cfg)  # the reference: every rank builds the whole model eagerly
    model = PeerLM(cfg, device="meta")
    shard_model(model, dist.group.WORLD)
    shards = expert_shards(model)
    assert shards and all(p.is_meta for p in model.parameters())
    model.to_empty(device="cpu")
    torch.manual_seed(7)
    model.init_weights()
    layer = next(m for m in model.modules() if isinstance(m, ExpertShardedPEER))
    s, e = layer.shard_start, layer.shard_end
    assert layer.u.shape[0] == e - s < 49  # only this rank's rows are allocated
    want = full.state_dict()
    for name, t in model.state_dict().items():
        expect = (
            want[name][s:e] if any(t is p for p in shards) or name.split(".")[-1] in ("u", "v", "gate") else want[name]
        )
        assert torch.equal(t, expect), (rank, name)


def test_meta_shard_init_equals_the_full_models_rows():
    """meta -> shard -> to_empty -> init_weights on 2 ranks: each rank holds exactly its rows of the
    eagerly built model's tables, and everything else equal."""
    spawn(_meta_worker, 2)


def test_sharded_layer_refuses_the_triton_backend():
    layer = PEER(8, 16, 2, 2, 4, backend="triton")
    with pytest.raises(ValueError, match="no sharded kernel"):
        shard_peer_layer(layer)
