"""Sharded checkpoints with torch.distributed.checkpoint (DCP): save on P ranks, load on any P'.

DCP stores every tensor by name with its GLOBAL shape and the chunks each rank wrote; a load
reads, for each tensor the loading model holds, the chunks that cover its local rows. So a
checkpoint of a run on P ranks resumes on P' ranks (any P' >= 1, one process included) as long
as every tensor is described globally:

- FSDP2 parameters and their AdamW moments are DTensors already;
- expert-sharded PEER tables (and their moments) are plain local row blocks, presented to DCP as
  DTensors ``Shard(0)`` of the full [N, d] table (the row split of :func:`shard_bounds`);
- everything else is replicated and written once.

The state saved is ``{"model": ..., "optim": ...}`` with names of the plain ``PeerLM`` (no
``module.`` prefix), so the same checkpoint loads into a single-process model, a DDP one, an
FSDP2 one or an expert-sharded one. :func:`full_model_state` gathers the full weights on one
rank for a single-file safetensors export.
"""

from __future__ import annotations

import contextlib
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.tensor import DTensor, Shard

from .expert_parallel import ExpertShardedPEER, gather_full_state

__all__ = ["model_state_dict", "optim_state_dict", "save_sharded", "load_sharded", "load_model_dcp", "full_model_state"]

_MESHES: dict = {}


def _mesh(group, device_type: str):
    from torch.distributed.device_mesh import DeviceMesh

    key = (id(group), device_type)
    if key not in _MESHES:
        _MESHES[key] = DeviceMesh.from_group(group, device_type)
    return _MESHES[key]


def _expert_tables(model: nn.Module) -> dict[str, ExpertShardedPEER]:
    """FQN of every expert-sharded table -> its layer."""
    out = {}
    for name, mod in model.named_modules():
        if isinstance(mod, ExpertShardedPEER) and mod.ep_size > 1:
            for t in ("u", "v", "gate"):
                if getattr(mod, t) is not None:
                    out[f"{name}.{t}" if name else t] = mod
    return out


def _as_global(local: torch.Tensor, layer: ExpertShardedPEER) -> DTensor:
    """This rank's row block as a DTensor of the full table (storage shared with ``local``)."""
    shape = torch.Size((layer.num_experts, *local.shape[1:]))
    stride = torch.empty(shape, device="meta").stride()
    mesh = _mesh(layer.group or dist.group.WORLD, local.device.type)
    return DTensor.from_local(local, mesh, [Shard(0)], run_check=False, shape=shape, stride=stride)


def model_state_dict(model: nn.Module) -> dict:
    """``model.state_dict()`` with expert-sharded tables as global DTensors (FSDP ones already are)."""
    tables = _expert_tables(model)
    sd = model.state_dict()
    for fqn, layer in tables.items():
        sd[fqn] = _as_global(sd[fqn], layer)
    return sd


def _optimizers(optimizer):
    return list(getattr(optimizer, "optimizers", [optimizer]))


def optim_state_dict(model: nn.Module, optimizer) -> dict:
    """The optimizer state keyed by parameter FQN, expert-row moments as global DTensors."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    osd = get_optimizer_state_dict(model, _optimizers(optimizer))
    tables = _expert_tables(model)
    for fqn, st in osd.get("state", {}).items():
        layer = tables.get(fqn)
        if layer is None:
            continue
        rows = layer.shard_end - layer.shard_start
        # a new dict: the one returned may be the optimizer's own state
        osd["state"][fqn] = {
            k: _as_global(v, layer) if isinstance(v, torch.Tensor) and v.dim() >= 1 and v.shape[0] == rows else v
            for k, v in st.items()
        }
    return osd


def _local_expert_views(osd: dict, model: nn.Module) -> dict:
    """Undo :func:`_as_global` for the expert-row moments before handing the state to the optimizer."""
    tables = _expert_tables(model)
    for fqn, st in osd.get("state", {}).items():
        if fqn in tables:
            osd["state"][fqn] = {k: v.to_local() if isinstance(v, DTensor) else v for k, v in st.items()}
    return osd


def _single_process_quiet():
    """DCP warns that it 'assumes a single process' when no process group exists: that is intended here."""
    return _Quiet() if not dist.is_initialized() else contextlib.nullcontext()


class _Quiet(warnings.catch_warnings):
    def __enter__(self):
        out = super().__enter__()
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        return out


def save_sharded(path: str | Path, model: nn.Module, optimizer=None) -> None:
    """Write ``{"model", "optim"}`` to the DCP directory ``path`` (collective on all ranks)."""
    state = {"model": model_state_dict(model)}
    if optimizer is not None:
        state["optim"] = optim_state_dict(model, optimizer)
    with _single_process_quiet():
        dcp.save(state, checkpoint_id=str(path))


def load_sharded(path: str | Path, model: nn.Module, optimizer=None) -> None:
    """Load a DCP directory written by :func:`save_sharded` on any number of ranks into ``model``
    (and ``optimizer``), in place. Collective on all ranks; works on a single process too."""
    path = Path(path)
    if not (path / ".metadata").is_file():
        raise FileNotFoundError(f"{path}: not a torch.distributed.checkpoint directory (no .metadata)")
    state = {"model": model_state_dict(model)}
    if optimizer is not None:
        state["optim"] = optim_state_dict(model, optimizer)
    try:
        with _single_process_quiet():
            dcp.load(state, checkpoint_id=str(path))
    except Exception as e:  # DCP raises CheckpointException / RuntimeError with per-rank details
        raise ValueError(
            f"{path}: cannot load the sharded checkpoint into this model ({type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''})"
        ) from e
    _copy_back(model, state["model"])
    if optimizer is not None:
        from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

        set_optimizer_state_dict(model, _optimizers(optimizer), _local_expert_views(state["optim"], model))


@torch.no_grad()
def _copy_back(model: nn.Module, loaded: dict) -> None:
    """DCP loads in place; copy anything that did not share storage with the model (defensive)."""
    current, tables = model.state_dict(), _expert_tables(model)
    for k, t in loaded.items():
        dst = current[k]
        src = t.to_local() if isinstance(t, DTensor) and k in tables else t
        if isinstance(dst, DTensor) or src.data_ptr() == dst.data_ptr():
            continue
        dst.copy_(src)


def load_model_dcp(path: str | Path, model: nn.Module) -> None:
    """Only the weights of a DCP checkpoint, into ``model`` (e.g. a full PeerLM on one process)."""
    load_sharded(path, model, None)


@torch.no_grad()
def full_model_state(model: nn.Module, dst: int = 0) -> dict[str, torch.Tensor] | None:
    """The full (unsharded) state dict on rank ``dst`` (None elsewhere), on CPU; tied tensors
    stay one tensor. Collective: FSDP DTensors are all-gathered, expert tables gathered to dst."""
    from ..layers.peer import TABLES

    rank = dist.get_rank() if dist.is_initialized() else 0
    sd = model.state_dict()
    out: dict[str, torch.Tensor] = {}
    done: dict[tuple, torch.Tensor] = {}  # tied tensors (same storage) are gathered once
    ep_prefix = {
        f"{n}." if n else "": m for n, m in model.named_modules() if isinstance(m, ExpertShardedPEER) and m.ep_size > 1
    }
    for prefix, layer in ep_prefix.items():
        full = gather_full_state(layer, dst=dst)
        if full is not None:
            out.update({prefix + t: full[t].cpu() for t in TABLES if t in full})
    for k, t in sd.items():
        if k in out:
            continue
        local = t.to_local() if isinstance(t, DTensor) else t
        key = (local.data_ptr(), tuple(t.shape), t.dtype) if local.numel() else (k,)
        if key not in done:
            done[key] = (t.full_tensor() if isinstance(t, DTensor) else t.detach()).cpu()
        out[k] = done[key]
    return out if rank == dst else None
