"""Distributed training equals single-process training: 2 ranks with the global batch split in two
give the losses, grad norms and final weights of one process with the whole batch (DDP with
gradient accumulation, FSDP2, expert-parallel PEER with BatchNorm queries, with sparse row
updates, and with FSDP2 for the rest of the model)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from dist_harness import CASES, STEPS, close_metrics, make_corpus, read_metrics, spawn, tiny_config

from peer.config import ConfigError
from peer.distributed import data_parallel as dpar
from peer.train import load_run, train


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return make_corpus(tmp_path_factory.mktemp("corpus"))


def _train_worker(rank, world, corpus, root, cases):
    for case in cases:
        train(tiny_config(corpus, root / case, *CASES[case], *STEPS))


def test_two_ranks_equal_one_process(corpus, tmp_path):
    cases = sorted(CASES)
    spawn(_train_worker, 2, corpus, tmp_path / "dist", cases)
    for case in cases:
        single = train(tiny_config(corpus, tmp_path / "single" / case, *CASES[case], *STEPS))
        multi = tmp_path / "dist" / case
        close_metrics(read_metrics(single), read_metrics(multi))
        tokens = 4 * 6 * 16 * (2 if "train.grad_accum=2" in CASES[case] else 1)
        assert read_metrics(multi)[-1]["tokens"] == read_metrics(single)[-1]["tokens"] == tokens
        # the final checkpoint holds a full single-file export that load_run reads
        m1, _, meta1 = load_run(single)
        m2, _, meta2 = load_run(multi)
        assert meta2["step"] == 4 and (Path(meta2["path"]) / "model.safetensors").is_file()
        s1, s2 = m1.state_dict(), m2.state_dict()
        for k in s1:
            torch.testing.assert_close(s2[k], s1[k], rtol=1e-4, atol=1e-5, msg=f"{case}: {k}")


def test_batch_must_split_over_ranks(corpus, tmp_path):
    cfg = tiny_config(corpus, tmp_path / "x")
    assert dpar.per_rank_batch(cfg, 3) == 2
    with pytest.raises(ConfigError, match="train.batch_size"):
        dpar.per_rank_batch(cfg, 4)


def test_sparse_experts_need_expert_parallel_on_several_ranks(corpus, tmp_path):
    dpar.check_config(tiny_config(corpus, tmp_path / "x", "optim.sparse_experts=true"), 1)
    dpar.check_config(tiny_config(corpus, tmp_path / "x", "optim.sparse_experts=true", "dist.expert_parallel=true"), 2)
    with pytest.raises(ConfigError, match="optim.sparse_experts"):
        dpar.check_config(tiny_config(corpus, tmp_path / "x", "optim.sparse_experts=true"), 2)


def test_rebatch_state_keeps_the_global_batch():
    class B:  # the fields of peer.data.Batcher that matter
        batch_size, rank, world_size = 2, 1, 3

    saved = {"epoch": 1, "position": 5, "batch_size": 3, "rank": 0, "world_size": 2}
    assert dpar.rebatch_state(saved, B()) == {"epoch": 1, "position": 5, "batch_size": 2, "rank": 1, "world_size": 3}
    with pytest.raises(ValueError, match="global batch"):
        dpar.rebatch_state({**saved, "batch_size": 4}, B())
