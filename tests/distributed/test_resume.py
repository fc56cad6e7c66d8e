"""Sharded checkpoints and failures on several ranks.

- A run saved on 2 expert-parallel ranks (torch.distributed.checkpoint) resumes on 1 and on 3
  ranks with the same next losses; its DCP-only intermediate checkpoint loads on one process.
- A rank killed mid-run makes the other stop with a clear error at once, and a resume from the
  last checkpoint reproduces the uninterrupted run; a hung rank stops the run after dist.timeout_s.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from dist_harness import (
    CASES,
    ROOT,
    STEPS,
    close_metrics,
    free_port,
    make_corpus,
    read_metrics,
    spawn,
    tiny_config,
    tiny_overrides,
)

from peer.distributed.checkpoint import load_model_dcp
from peer.model import PeerLM
from peer.train import load_run, train
from peer.train.checkpoint import list_checkpoints


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return make_corpus(tmp_path_factory.mktemp("corpus"))


def _resume_worker(rank, world, corpus, run):
    train(tiny_config(corpus, run, *CASES["ep"], *STEPS), resume=True)


def _truncate_to_step2(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    shutil.rmtree(dst / "checkpoints" / "step_0000004")
    return dst


def test_save_on_two_resume_on_one_and_three(corpus, tmp_path):
    run = tmp_path / "ep2"
    spawn(_ep_worker, 2, corpus, run)
    ref = read_metrics(run)
    step2 = list_checkpoints(run)[0]
    assert step2.name == "step_0000002" and (step2 / "dcp" / ".metadata").is_file()
    assert not (step2 / "model.safetensors").exists()  # only the final checkpoint is exported
    # an intermediate (DCP-only) checkpoint still loads, on one process, through DCP
    model, _, _ = load_run(step2)
    fresh = PeerLM(model.config)
    load_model_dcp(step2 / "dcp", fresh)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), fresh.state_dict().values(), strict=True))

    one = _truncate_to_step2(run, tmp_path / "on1")
    train(tiny_config(corpus, one, *CASES["ep"], *STEPS), resume=True)  # one process, full tables
    three = _truncate_to_step2(run, tmp_path / "on3")
    spawn(_resume_worker, 3, corpus, three)
    for resumed in (one, three):
        close_metrics(read_metrics(resumed), ref)
        assert list_checkpoints(resumed)[-1].name == "step_0000004"


def _ep_worker(rank, world, corpus, run):
    train(tiny_config(corpus, run, *CASES["ep"], *STEPS))


def _run_and_break(corpus, tmp_path, sig, timeout_s: int):
    """Start `python -m peer train` on 2 ranks (torchrun's environment variables), send ``sig`` to
    rank 1 after step 5; return (rank 0's stderr, its exit status, seconds it took to stop)."""
    run = tmp_path / "run"
    over = [
        *CASES["ep"],
        "train.steps=100000",
        "train.ckpt_every=2",
        "train.keep_last=3",
        f"dist.timeout_s={timeout_s}",
    ]
    cfg = tmp_path / "cfg.toml"
    shutil.copy(ROOT / "configs" / "tiny.toml", cfg)
    env = {
        **os.environ,
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(free_port()),
        "WORLD_SIZE": "2",
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": str(ROOT / "src"),
    }
    cmd = [sys.executable, "-m", "peer", "train", str(cfg), "--set", *tiny_overrides(corpus, run, *over)]
    procs = [
        subprocess.Popen(
            cmd,
            env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for r in range(2)
    ]
    try:
        deadline = time.time() + 120
        while time.time() < deadline:  # wait until step 5 was logged (checkpoints at 2 and 4 exist)
            if (run / "metrics.jsonl").is_file() and any(m.get("step", 0) >= 5 for m in read_metrics(run)):
                break
            assert procs[0].poll() is None, procs[0].communicate()[1][-2000:]
            time.sleep(0.05)
        else:
            pytest.fail("the 2-rank run did not reach step 5 in time")
        procs[1].send_signal(sig)
        t0 = time.time()
        _, err = procs[0].communicate(timeout=timeout_s + 60)
        return run, err, procs[0].returncode, time.time() - t0
    finally:
        for p in procs:  # our own children only
            if p.poll() is None:
                p.kill()
                p.communicate()


def test_dead_rank_stops_run_and_resume_loses_nothing(corpus, tmp_path):
    run, err, code, took = _run_and_break(corpus, tmp_path, signal.SIGKILL, timeout_s=60)
    assert code == 1 and "rank 0 of 2: a collective" in err and "failed, so the run stops" in err, err[-2000:]
    assert took < 30  # a dead peer's closed socket is noticed at once, long before dist.timeout_s=60
    last = list_checkpoints(run)[-1]
    k = int(last.name.split("_")[1])
    assert k >= 4 and k % 2 == 0
    # resume on one process for two more steps; compare with an uninterrupted run of k+2 steps
    steps = [f"train.steps={k + 2}", "train.ckpt_every=2", "train.keep_last=3", "dist.timeout_s=60"]
    train(tiny_config(corpus, run, *CASES["ep"], *steps), resume=True)
    ref = train(tiny_config(corpus, tmp_path / "ref", *CASES["ep"], *steps))
    close_metrics(read_metrics(run), read_metrics(ref), keys=("loss", "grad_norm"))


@pytest.mark.slow  # waits out dist.timeout_s by design
def test_hung_rank_stops_run_after_timeout(corpus, tmp_path):
    # SIGSTOP: the peer's sockets stay open, so only the collective timeout can end the wait
    _, err, code, took = _run_and_break(corpus, tmp_path, signal.SIGSTOP, timeout_s=8)
    assert code == 1 and "did not answer within dist.timeout_s=8s" in err, err[-2000:]
    assert 8 - 1 < took < 8 + 20
