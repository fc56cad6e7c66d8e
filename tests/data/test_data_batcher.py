"""Batcher and eval_batches against brute force: windows, epochs, exact resume, rank shards."""

import numpy as np
import pytest
import torch

from peer.data import Batcher, eval_batches

T, B = 8, 4
TOKENS = np.arange(1000, dtype=np.uint16) % 997  # 1000 tokens -> (1000 - 1) // 8 = 124 windows
N_WIN = 124


def window_id(x: torch.Tensor) -> int:
    """Which window a row of x is (x[0] = tokens[i*T] = i*T here, since tokens are < 997 there)."""
    return int(x[0]) // T


def test_batches_are_windows_and_shifted_targets():
    b = Batcher(TOKENS, B, T, seed=0)
    x, y = b.next()
    assert x.dtype == y.dtype == torch.int64 and x.shape == y.shape == (B, T)
    for row_x, row_y in zip(x, y, strict=True):
        i = window_id(row_x)
        w = torch.from_numpy(TOKENS[i * T : i * T + T + 1].astype(np.int64))
        assert torch.equal(row_x, w[:-1]) and torch.equal(row_y, w[1:])


def test_epoch_visits_each_window_once_then_reshuffles():
    b = Batcher(TOKENS, B, T, seed=3)
    assert b.batches_per_epoch == N_WIN // B == 31
    ep0 = [window_id(r) for _ in range(31) for r in b.next()[0]]
    assert sorted(ep0) == list(range(N_WIN))
    ep1 = [window_id(r) for _ in range(31) for r in b.next()[0]]
    assert sorted(ep1) == list(range(N_WIN)) and ep1 != ep0 and b.epoch == 1
    # another seed: another order; the same seed: the same order
    assert [window_id(r) for r in Batcher(TOKENS, B, T, seed=4).next()[0]] != ep0[:B]
    assert [window_id(r) for r in Batcher(TOKENS, B, T, seed=3).next()[0]] == ep0[:B]


@pytest.mark.parametrize("stop", [0, 5, 31, 40, 70])
def test_exact_resume(stop):
    ref = Batcher(TOKENS, B, T, seed=7)
    want = [ref.next() for _ in range(80)]
    a = Batcher(TOKENS, B, T, seed=7)
    for _ in range(stop):
        a.next()
    state = a.state_dict()
    b = Batcher(TOKENS, B, T, seed=123)  # the seed comes from the state
    b.load_state_dict(state)
    for i in range(stop, 80):
        x, y = b.next()
        assert torch.equal(x, want[i][0]) and torch.equal(y, want[i][1]), i


def test_load_state_mismatch():
    state = Batcher(TOKENS, B, T, seed=0).state_dict()
    with pytest.raises(ValueError, match="seq_len is 8 in the saved state but 16 now"):
        Batcher(TOKENS, B, 16, seed=0).load_state_dict(state)


@pytest.mark.parametrize("world", [2, 3])
def test_rank_shards_are_disjoint(world):
    per_rank = []
    for r in range(world):
        b = Batcher(TOKENS, B, T, seed=1, rank=r, world_size=world)
        assert b.batches_per_epoch == (N_WIN // world) // B
        per_rank.append([window_id(row) for _ in range(b.batches_per_epoch) for row in b.next()[0]])
    seen = [set(p) for p in per_rank]
    for i in range(world):
        assert len(seen[i]) == len(per_rank[i])
        for j in range(i + 1, world):
            assert not seen[i] & seen[j]
    # strided shards of one permutation: rank r gets perm[r::world]
    perm = np.random.Generator(np.random.PCG64([1, 0])).permutation(N_WIN)
    for r in range(world):
        assert per_rank[r] == perm[r::world][: len(per_rank[r])].tolist()


def test_global_batch_is_the_same_for_any_world_size():
    """At a fixed global batch G = world * B, step p covers the same windows however many ranks."""
    G = 12
    ref = Batcher(TOKENS, G, T, seed=5)
    want = [sorted(window_id(r) for r in ref.next()[0]) for _ in range(25)]  # crosses into epoch 2
    for world in (2, 3, 4):
        ranks = [Batcher(TOKENS, G // world, T, seed=5, rank=r, world_size=world) for r in range(world)]
        assert all(b.batches_per_epoch == ref.batches_per_epoch for b in ranks)
        for p in range(25):
            got = sorted(window_id(row) for b in ranks for row in b.next()[0])
            assert got == want[p], (world, p)


def test_too_small():
    with pytest.raises(
        ValueError, match=r"corpus too small: .*4 x 8 tokens on 2 rank\(s\) needs at least 65 tokens, got 60"
    ):
        Batcher(np.arange(60), 4, 8, seed=0, world_size=2)
    Batcher(np.arange(65), 4, 8, seed=0, world_size=2)  # exactly enough
    with pytest.raises(ValueError, match="rank must be in"):
        Batcher(TOKENS, B, T, rank=2, world_size=2)


def test_eval_batches_cover_all_windows_in_order():
    ev = eval_batches(TOKENS, 5, T)
    batches = list(ev)
    assert len(batches) == len(ev) == 25  # 124 windows: 24 x 5 + 4
    assert batches[-1][0].shape == (4, T)
    x = torch.cat([b[0] for b in batches]).flatten()
    y = torch.cat([b[1] for b in batches]).flatten()
    assert ev.num_tokens == N_WIN * T == y.numel()
    # every target position 1..992 exactly once, in order
    assert torch.equal(y, torch.from_numpy(TOKENS[1 : N_WIN * T + 1].astype(np.int64)))
    assert torch.equal(x, torch.from_numpy(TOKENS[: N_WIN * T].astype(np.int64)))
    capped = eval_batches(TOKENS, 5, T, max_tokens=100)
    assert capped.num_tokens == 96 and sum(b[0].shape[0] for b in capped) == 12
    with pytest.raises(ValueError, match="needs 9 tokens, got 8"):
        eval_batches(np.arange(8), 2, 8)
