"""Data-parallel training on torch.distributed: what the training loop calls when WORLD_SIZE > 1.

Batch semantics (global-batch invariant): ``train.batch_size`` is the GLOBAL number of sequences
per micro-step. Each of P ranks reads ``batch_size / P`` of them (a ConfigError when P does not
divide it), from a disjoint shard of the token stream (``peer.data.Batcher(rank, world_size)``);
global batch i on P ranks is exactly the set of windows of batch i on one process. So a run's
tokens per step, FLOPs per step and FLOP-budget step count do not depend on P, and P ranks
with B/P sequences each follow the trajectory of one process with B (to float rounding; with
BatchNorm queries only under expert parallelism, which normalises over the whole batch).

Wrapping (:func:`wrap_model`), chosen by ``cfg.dist``:

- ``data_parallel = "ddp"``: DistributedDataParallel; gradients averaged over ranks.
- ``data_parallel = "fsdp"``: FSDP2 ``fully_shard`` on every block, then on the whole model;
  parameters, gradients and optimizer state are sharded (DTensors), gathered per block.
- ``expert_parallel = true``: first every PEER becomes an :class:`ExpertShardedPEER` over the
  world group (tokens gathered, tables split by rows); its row shards are left out of DDP/FSDP.

Gradient clipping (:func:`clip_grad_norm`) takes the global norm over replicated gradients and
over sharded ones (expert rows, FSDP shards) whose squared norms are summed over ranks.
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.distributed as dist
from torch import nn

from ..config import Config, ConfigError
from ..layers.router import ProductKeyRouter
from .env import (
    DistEnv,
    DistributedError,
    _collective,
    all_reduce_sum,
    barrier,
    current_env,
    failure_message,
    init_distributed,
    is_distributed,
)
from .expert_parallel import ExpertShardedPEER, expert_shards, shard_model

__all__ = [
    "setup",
    "check_config",
    "finish",
    "per_rank_batch",
    "shard_experts",
    "wrap_model",
    "is_sharded_config",
    "clip_grad_norm",
    "mean_over_ranks",
    "all_finite",
    "reduce_usage",
    "rebatch_state",
    "explain_failure",
    "barrier",
]

_COLLECTIVE_HINTS = ("gloo", "nccl", "connection reset", "connection closed", "timed out", "c10d", "processgroup")


def setup(cfg: Config) -> DistEnv:
    """Join the torchrun process group (when WORLD_SIZE > 1) and check the batch split."""
    env = init_distributed(cfg.dist.backend, cfg.train.device, cfg.dist.timeout_s)
    per_rank_batch(cfg, env.world_size)
    check_config(cfg, env.world_size)
    return env


def check_config(cfg: Config, world_size: int) -> None:
    """Settings that cannot work on ``world_size`` ranks: ConfigError naming the field."""
    if world_size > 1 and cfg.optim.sparse_experts and not cfg.dist.expert_parallel:
        raise ConfigError(
            "optim.sparse_experts: on several ranks the sparse row gradients of the expert tables "
            "need dist.expert_parallel=true (DDP/FSDP cannot average sparse gradients); set "
            "dist.expert_parallel=true or optim.sparse_experts=false"
        )


def per_rank_batch(cfg: Config, world_size: int) -> int:
    """``train.batch_size / world_size`` (the global batch split evenly), else ConfigError."""
    b = cfg.train.batch_size
    if b % world_size:
        raise ConfigError(
            f"train.batch_size: is the global batch ({b} sequences) and must be divisible by the "
            f"number of ranks ({world_size}); e.g. use {max(world_size, b // world_size * world_size)}"
        )
    return b // world_size


def is_sharded_config(cfg: Config) -> bool:
    """Runs whose parameters are sharded across ranks (checkpointed with torch.distributed.checkpoint)."""
    return bool(cfg.dist.expert_parallel) or cfg.dist.data_parallel == "fsdp"


def shard_experts(model: nn.Module) -> list[str]:
    """Make every PEER of ``model`` an :class:`ExpertShardedPEER` over all ranks (tokens gathered:
    data-parallel ranks); works on a model built on the meta device. Returns the layers' names."""
    return shard_model(model, dist.group.WORLD, data_parallel=True)


def wrap_model(model: nn.Module, cfg: Config, env: DistEnv) -> nn.Module:
    """Shard / wrap ``model`` for ``env`` as ``cfg.dist`` says; returns the module to call for forward.

    ``model`` itself stays the PeerLM (FSDP2 and expert sharding change it in place; DDP wraps it),
    so its state dict names never carry a ``module.`` prefix. No-op on a single process.
    """
    if env.world_size <= 1:
        return model
    if cfg.dist.expert_parallel:
        shard_experts(model)  # a no-op when the trainer built the model sharded already
    shards = set(expert_shards(model))
    if cfg.dist.data_parallel == "fsdp":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh(torch.device(env.device).type, (env.world_size,))
        for block in getattr(model, "blocks", []):
            fully_shard(block, mesh=mesh, ignored_params={p for p in block.parameters() if p in shards} or None)
        fully_shard(model, mesh=mesh, ignored_params=shards or None)
        return model  # the optimizer groups ask the layers (expert_parameters()), so new DTensors need no tags
    from torch.nn.parallel import DistributedDataParallel as DDP

    if shards:  # expert rows are not replicated: DDP must neither broadcast nor average them
        names = [n for n, p in model.named_parameters() if p in shards]
        DDP._set_params_and_buffers_to_ignore_for_model(model, names)
    device_ids = [torch.device(env.device).index] if str(env.device).startswith("cuda") else None
    return DDP(model, device_ids=device_ids)


def grad_sync(module: nn.Module, last: bool):
    """The context for one micro-batch's forward + backward under gradient accumulation: gradients
    are averaged across ranks only on the ``last`` one (DDP's ``no_sync`` on the others; FSDP2's
    ``set_requires_gradient_sync``). Nothing to do on one process or for expert-sharded rows."""
    if hasattr(module, "no_sync"):  # DDP
        return contextlib.nullcontext() if last else module.no_sync()
    if hasattr(module, "set_requires_gradient_sync"):  # FSDP2 (fully_shard)
        module.set_requires_gradient_sync(last)
    return contextlib.nullcontext()


def finish(env: DistEnv) -> None:
    """End of training: leave the process group if :func:`setup` created it (torchrun), else nothing."""
    from .env import teardown

    teardown()


# ------------------------------------------------------------------ per-step reductions
def _comm_device() -> torch.device:
    """Where small bookkeeping tensors must live for a collective: the GPU under NCCL, else the CPU."""
    env = current_env()
    return torch.device(env.device) if env.backend == "nccl" else torch.device("cpu")


def _sq_norms(params, shards, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Sums of squared gradient entries, float64 0-dim tensors on ``device``: (replicated, sharded-local);
    ``shards``: ids of row-sharded params. Nothing is read back to the host."""
    from torch.distributed.tensor import DTensor

    rep = torch.zeros((), dtype=torch.float64, device=device)
    shard = torch.zeros((), dtype=torch.float64, device=device)
    for p in params:
        g = p.grad
        if g is None:
            continue
        if g.is_sparse:  # row gradients of peer.train.sparse_optim
            g = g.coalesce().values()
        if isinstance(g, DTensor):
            local = g.to_local().detach().float().pow(2).sum().double().to(device)
            if all(pl.is_shard() for pl in g.placements):
                shard += local
            else:
                rep += local
        elif id(p) in shards:
            shard += g.detach().float().pow(2).sum().double().to(device)
        else:
            rep += g.detach().float().pow(2).sum().double().to(device)
    return rep, shard


def clip_grad_norm(params, max_norm: float, shards=()) -> torch.Tensor:
    """Clip to the GLOBAL grad norm ``sqrt(sum of squares over every parameter on every rank)``.

    Replicated gradients (DDP, after its average) count once; sharded ones (expert rows,
    FSDP shards) are summed over ranks with one all-reduce. Same result as
    ``torch.nn.utils.clip_grad_norm_`` on the unsharded model; returns the norm before clipping as a
    float64 0-dim tensor. No host sync: the clipping coefficient stays on the device (a non-finite norm
    clips nothing: the step's record then stops the run). ``shards``: the expert-sharded parameters
    (:func:`expert_shards` of the model).
    """
    params = [p for p in params if p.grad is not None]
    rep, shard = _sq_norms(params, {id(p) for p in shards}, _comm_device())
    if is_distributed():
        shard = all_reduce_sum(shard)
    total = (rep + shard).sqrt()
    if max_norm < math.inf:
        coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
        coef = torch.where(torch.isfinite(total), coef, torch.ones_like(coef))
        for p in params:
            g = p.grad
            (g._values() if g.is_sparse else g).mul_(coef.to(g.device))
    return total


def mean_over_ranks(*values: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Each 0-dim tensor averaged over ranks (one all-reduce, no host sync); unchanged on a single process."""
    if not is_distributed():
        return values
    t = torch.stack([torch.as_tensor(v, dtype=torch.float64).to(_comm_device()) for v in values])
    all_reduce_sum(t)
    return tuple(t / dist.get_world_size())


def all_finite(module: nn.Module) -> bool:
    """True when every floating entry of the state dict (weights, BatchNorm statistics) is finite
    on every rank, sharded parameters included (one all-reduce of a flag)."""
    from torch.distributed.tensor import DTensor

    bad = 0.0
    for v in module.state_dict().values():
        local = v.to_local() if isinstance(v, DTensor) else v
        if local.is_floating_point() and not bool(torch.isfinite(local).all()):
            bad = 1.0
            break
    if is_distributed():
        flag = torch.tensor([bad], dtype=torch.float64, device=_comm_device())
        all_reduce_sum(flag)
        bad = float(flag)
    return bad == 0.0


@torch.no_grad()
def reduce_usage(model: nn.Module) -> None:
    """Sum every product-key layer's (PEER, PKM) usage counts over ranks, so each rank holds the whole batch's.

    Expert-sharded layers already retrieve for every rank's tokens (their counts are global)
    and are left alone. Collective: call on all ranks.
    """
    if not is_distributed():
        return
    for m in model.modules():
        if isinstance(m, ExpertShardedPEER):
            continue
        if isinstance(m, ProductKeyRouter):
            if m.usage.numel():
                _collective("all_reduce", dist.all_reduce, m.usage)


def rebatch_state(state: dict, batcher) -> dict:
    """A Batcher state saved with one world size, made loadable by ``batcher`` on another.

    Global batch i is the same set of windows for any number of ranks (module docstring), so
    (epoch, position) carry over as long as the global batch is unchanged.
    """
    saved_global = int(state.get("batch_size", batcher.batch_size)) * int(state.get("world_size", 1))
    now_global = batcher.batch_size * batcher.world_size
    if saved_global != now_global:
        raise ValueError(
            f"train.batch_size: the checkpoint's global batch is {saved_global} sequences, "
            f"this run's is {now_global}; the resumed run would see different batches"
        )
    return {**state, "batch_size": batcher.batch_size, "rank": batcher.rank, "world_size": batcher.world_size}


def explain_failure(err: BaseException, env: DistEnv) -> BaseException:
    """A :class:`DistributedError` with a clear message when ``err`` is a failed collective of a
    multi-rank run (a peer died, or hung past ``dist.timeout_s``); ``err`` itself otherwise."""
    if not env.distributed or isinstance(err, DistributedError):
        return err
    if not (isinstance(err, dist.DistError) or any(h in str(err).lower() for h in _COLLECTIVE_HINTS)):
        return err
    return DistributedError(failure_message("in the training step", err))
