"""The torch.distributed environment: start-up under ``torchrun``, teardown, backend and timeouts.

``torchrun --nproc-per-node=P -m peer train CONFIG.toml`` sets RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR and MASTER_PORT; :func:`init_distributed` reads them and starts one process group
for the whole world. A single process (no WORLD_SIZE, or WORLD_SIZE=1) gets a ``DistEnv`` with
``world_size == 1`` and no process group: every helper here is then a no-op, so callers never
need an ``if distributed`` of their own.

Timeouts: every collective waits at most ``dist.timeout_s`` seconds. A rank that dies makes
its peers' next collective fail (gloo: "connection closed by peer", at once; NCCL: after the
timeout, with async error handling on), which surfaces as :class:`DistributedError`.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..errors import PeerError

__all__ = [
    "DistEnv",
    "DistributedError",
    "init_distributed",
    "teardown",
    "current_env",
    "choose_backend",
    "is_distributed",
    "get_rank",
    "get_world_size",
    "all_reduce_mean",
    "all_reduce_sum",
    "barrier",
]


class DistributedError(PeerError, RuntimeError):
    """A collective failed: a peer rank died, timed out or disagreed; the message says which op."""


@dataclass(frozen=True)
class DistEnv:
    """Where this process stands: ``rank`` of ``world_size``, ``local_rank`` on its node, ``device``."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str = "none"
    device: str = "cpu"
    timeout_s: float = 300.0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


_ENV = DistEnv()
_OWNS_GROUP = False


def choose_backend(backend: str, device: str) -> str:
    """ "auto" -> NCCL for CUDA devices, gloo otherwise; an explicit choice is checked against the device."""
    if backend not in ("auto", "gloo", "nccl"):
        raise ValueError(f"dist.backend must be one of 'auto', 'gloo', 'nccl', got {backend!r}")
    cuda = str(device).startswith("cuda")
    if backend == "auto":
        return "nccl" if cuda and dist.is_nccl_available() else "gloo"
    if backend == "nccl" and not cuda:
        raise ValueError(f"dist.backend='nccl' needs a CUDA device, but train.device={device!r}")
    return backend


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name, "")
    if raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"environment variable {name} must be an integer, got {raw!r}") from None


def init_distributed(backend: str = "auto", device: str = "cpu", timeout_s: float = 300.0) -> DistEnv:
    """Join the process group that ``torchrun`` describes in the environment; returns a :class:`DistEnv`.

    With WORLD_SIZE unset or 1 nothing is started. CUDA ranks use ``cuda:LOCAL_RANK`` when
    ``device`` is plain "cuda". Calling it again returns the same environment.
    """
    global _ENV, _OWNS_GROUP
    if timeout_s <= 0:
        raise ValueError(f"dist.timeout_s must be positive, got {timeout_s!r}")
    world = _env_int("WORLD_SIZE", 1)
    if dist.is_available() and dist.is_initialized():
        world, rank = dist.get_world_size(), dist.get_rank()
        _ENV = DistEnv(rank, world, _env_int("LOCAL_RANK", rank), dist.get_backend(), str(device), timeout_s)
        return _ENV
    if world <= 1:
        _ENV = DistEnv(device=str(device), timeout_s=timeout_s)
        return _ENV
    if not dist.is_available():
        raise DistributedError("WORLD_SIZE > 1 but this PyTorch build has no torch.distributed")
    rank, local_rank = _env_int("RANK", 0), _env_int("LOCAL_RANK", 0)
    name = choose_backend(backend, device)
    if str(device) == "cuda":
        device = f"cuda:{local_rank}"
    if str(device).startswith("cuda"):
        torch.cuda.set_device(torch.device(device))
    # NCCL: abort a hung collective after the timeout instead of waiting forever
    os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
    dist.init_process_group(name, rank=rank, world_size=world, timeout=datetime.timedelta(seconds=float(timeout_s)))
    _OWNS_GROUP = True
    _ENV = DistEnv(rank, world, local_rank, name, str(device), float(timeout_s))
    return _ENV


def teardown() -> None:
    """Destroy the process group if :func:`init_distributed` created it (safe to call twice)."""
    global _ENV, _OWNS_GROUP
    if _OWNS_GROUP and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    _OWNS_GROUP = False
    _ENV = DistEnv()


def current_env() -> DistEnv:
    """The environment set by the last :func:`init_distributed` (single process before that)."""
    return _ENV


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def get_rank(group=None) -> int:
    return dist.get_rank(group) if is_distributed() else 0


def get_world_size(group=None) -> int:
    return dist.get_world_size(group) if is_distributed() else 1


def failure_message(what: str, err: BaseException) -> str:
    """The message of a failed collective: who, why it probably happened, what to do."""
    text = str(err)
    first = text.splitlines()[0] if text else type(err).__name__
    return (
        f"rank {get_rank()} of {get_world_size()}: a collective ({what}) failed, so the run stops (a peer rank "
        f"died, or did not answer within dist.timeout_s={_ENV.timeout_s:g}s). Resume from the last complete "
        f"checkpoint with --resume. Cause: {type(err).__name__}: {first}"
    )


def _collective(what: str, fn, *args, **kwargs):
    try:
        return fn(*args, **kwargs)
    except (RuntimeError, dist.DistError) as e:  # gloo / NCCL failures, timeouts
        raise DistributedError(failure_message(what, e)) from e


def all_reduce_sum(t: torch.Tensor, group=None) -> torch.Tensor:
    """In-place sum over ranks (no-op single-process); returns ``t``."""
    if is_distributed():
        _collective("all_reduce", dist.all_reduce, t, op=dist.ReduceOp.SUM, group=group)
    return t


def all_reduce_mean(t: torch.Tensor, group=None) -> torch.Tensor:
    """In-place mean over ranks (no-op single-process); returns ``t``."""
    if is_distributed():
        all_reduce_sum(t, group)
        t.div_(dist.get_world_size(group))
    return t


def barrier(group=None) -> None:
    if is_distributed():
        _collective("barrier", dist.barrier, group=group)
