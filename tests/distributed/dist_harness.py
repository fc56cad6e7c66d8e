"""Helpers of the distributed tests: run a function on P CPU processes joined by a gloo process group
(torch.multiprocessing spawn); a tiny corpus and config for training runs; metric comparison."""

from __future__ import annotations

import datetime
import json
import os
import socket
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, fn, world: int, port: int, args: tuple, env: dict) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
        **env,
    )
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60))
    try:
        fn(rank, world, *args)
    finally:
        dist.destroy_process_group()


def spawn(fn, world: int, *args, env: dict | None = None) -> None:
    """Call ``fn(rank, world, *args)`` on ``world`` processes; a failure in any re-raises here."""
    mp.spawn(_entry, args=(fn, world, free_port(), args, env or {}), nprocs=world, join=True)


# ------------------------------------------------------------------ tiny training runs
VOCAB = 64
ROOT = Path(__file__).resolve().parents[2]


def make_corpus(path, seed: int = 0, train_docs: int = 24, val_docs: int = 3):
    """A corpus directory of random-walk documents over ids 1..VOCAB-1 (EOS = 0)."""
    import numpy as np

    from peer.data.tokens import write_split

    rng = np.random.default_rng(seed)

    def doc():
        n = int(rng.integers(40, 90))
        return list((np.cumsum(rng.integers(-2, 3, n)) % (VOCAB - 1) + 1).astype(int))

    for split, n in (("train", train_docs), ("val", val_docs)):
        write_split(
            path, split, [f"{split}/{i}" for i in range(n)], [doc() for _ in range(n)], eos_id=0, vocab_size=VOCAB
        )
    return path


def tiny_overrides(corpus, out, *extra: str) -> list[str]:
    """configs/tiny.toml on the synthetic corpus: global batch 6 (splits over 1, 2, 3 ranks), constant lr."""
    return [
        f"data.corpus='{corpus}'",
        f"train.out_dir='{out}'",
        f"model.vocab_size={VOCAB}",
        "train.progress=false",
        "train.tensorboard=false",
        "train.threads=1",
        "train.batch_size=6",
        "train.seq_len=16",
        "train.log_every=1",
        "train.eval_batches=1",
        "optim.min_lr_ratio=1.0",
        "dist.backend='gloo'",
        *extra,
    ]


def tiny_config(corpus, out, *extra: str):
    from peer.config import load_config

    return load_config(ROOT / "configs" / "tiny.toml", tiny_overrides(corpus, out, *extra))


def read_metrics(run) -> list[dict]:
    return [json.loads(line) for line in (Path(run) / "metrics.jsonl").read_text().splitlines()]


CASES = {
    # LayerNorm queries: under plain data parallelism BatchNorm would normalise per rank
    "ddp": [
        "model.sparse_layer=peer",
        "model.peer.query_norm=layernorm",
        "dist.data_parallel='ddp'",
        "train.grad_accum=2",
    ],
    "fsdp": [
        "model.sparse_layer=peer",
        "model.peer.query_norm=layernorm",
        "dist.data_parallel='fsdp'",
        "train.grad_accum=2",
    ],
    # expert parallelism gathers the tokens, so BatchNorm sees the whole global batch
    "ep": ["model.sparse_layer=peer", "model.peer.query_norm=batchnorm", "dist.expert_parallel=true"],
    # ... and the row-wise AdamW of peer.train.sparse_optim on the row shards (sparse gradients)
    "ep_sparse": ["model.sparse_layer=peer", "dist.expert_parallel=true", "optim.sparse_experts=true"],
    "ep_fsdp": ["model.sparse_layer=peer", "dist.expert_parallel=true", "dist.data_parallel='fsdp'"],
}
# a short run with a checkpoint in the middle and one at the end
STEPS = ["train.steps=4", "train.ckpt_every=2", "train.keep_last=5", "train.eval_every=2"]


def close_metrics(a: list[dict], b: list[dict], keys=("loss", "grad_norm", "val_loss"), rtol=1e-4):
    """Two runs logged the same steps and (to ``rtol``) the same values of ``keys``."""
    assert [m["step"] for m in a] == [m["step"] for m in b]
    for key in keys:
        x, y = [m.get(key) for m in a], [m.get(key) for m in b]
        assert [v is None for v in x] == [v is None for v in y], (key, x, y)
        x, y = [v for v in x if v is not None], [v for v in y if v is not None]
        assert x and torch.allclose(torch.tensor(x), torch.tensor(y), rtol=rtol, atol=0), (key, x, y)
