"""Peak memory per rank of an expert-parallel PeerLM: built whole then sharded, vs meta -> shard -> init.

    python -m peer.bench.ep_memory --world 2,4 --experts 1024 --dim 256 [--out results/bench/ep_memory.json]

Each configuration runs on ``world`` fresh CPU processes (gloo). "eager" builds the full model on
every rank (what the trainer did before) and then keeps its rows (:func:`peer.distributed.shard_model`);
"meta" builds on the meta device, shards, ``to_empty``s and initialises (:meth:`PeerLM.init_weights`),
so a rank allocates only its rows of the expert tables. Reported per rank: peak RSS (``ru_maxrss``)
and the bytes of its expert shards; "baseline" is a process that only imports torch and peer.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import resource
import socket
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

__all__ = ["main"]


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _config(n: int, dim: int):
    from peer.config import ModelConfig, PEERConfig

    return ModelConfig(
        vocab_size=8192,
        d_model=dim,
        n_layers=2,
        n_heads=4,
        d_ff=4 * dim,
        max_seq_len=128,
        sparse_layer="peer",
        peer=PEERConfig(num_experts=n * n, heads=8, topk=16, key_dim=128),
    )


def _worker(rank: int, world: int, port: int, mode: str, n: int, dim: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=600))
    try:
        from peer.distributed.expert_parallel import expert_shards, shard_model
        from peer.model import PeerLM

        before = _peak_mb()
        torch.manual_seed(0)
        if mode == "eager":
            model = PeerLM(_config(n, dim))
            shard_model(model, dist.group.WORLD)
        else:
            model = PeerLM(_config(n, dim), device="meta")
            shard_model(model, dist.group.WORLD)
            model.to_empty(device="cpu")
            model.init_weights()
        shard_bytes = sum(p.nbytes for p in expert_shards(model))
        record = dict(
            mode=mode,
            world=world,
            rank=rank,
            experts=n * n,
            dim=dim,
            import_peak_mb=before,
            peak_mb=_peak_mb(),
            shard_mb=shard_bytes / 2**20,
            params_mb=sum(p.nbytes for p in model.parameters()) / 2**20,
        )
        Path(out_dir, f"{mode}_{world}_{rank}.json").write_text(json.dumps(record))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--world", default="2,4", help="comma-separated numbers of ranks")
    ap.add_argument("--experts", type=int, default=1024, help="n: N = n^2 experts")
    ap.add_argument("--dim", type=int, default=256, help="d_model (the table width)")
    ap.add_argument("--modes", default="eager,meta")
    ap.add_argument("--out", default=None, help="write the records to this JSON file")
    args = ap.parse_args(argv)
    records = []
    with tempfile.TemporaryDirectory() as tmp:
        for world in (int(w) for w in args.world.split(",")):
            for mode in args.modes.split(","):
                mp.spawn(
                    _worker, args=(world, _free_port(), mode, args.experts, args.dim, tmp), nprocs=world, join=True
                )
                records += [json.loads(Path(tmp, f"{mode}_{world}_{r}.json").read_text()) for r in range(world)]
    full_tables = 2 * args.experts**2 * args.dim * 4 / 2**20
    print(f"N = {args.experts}^2, d = {args.dim}: u + v = {full_tables:,.0f} MiB unsharded (fp32)")
    print(
        f"{'mode':<6} {'ranks':>5} {'rank':>4} {'shard MiB':>10} {'params MiB':>10} {'peak RSS MiB':>12} "
        f"{'(after import)':>14}"
    )
    for r in records:
        print(
            f"{r['mode']:<6} {r['world']:>5} {r['rank']:>4} {r['shard_mb']:>10,.0f} {r['params_mb']:>10,.0f} "
            f"{r['peak_mb']:>12,.0f} {r['import_peak_mb']:>14,.0f}"
        )
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(records, indent=1) + "\n")
    return records


if __name__ == "__main__":
    main()
