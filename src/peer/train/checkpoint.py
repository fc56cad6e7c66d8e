"""Checkpoints: ``RUN/checkpoints/step_XXXXXXX/{model.safetensors, state.pt, meta.json}``.

- ``model.safetensors``: the model's state dict (tied tensors stored once; ``meta.json`` lists the
  aliases), loadable without pickle.
- ``state.pt``: optimizer, schedule, RNG states (torch, numpy, python), data position (the
  Batcher's state), step and metrics; loaded with ``torch.load(weights_only=True)`` (numpy arrays
  are stored as tensors).
- ``meta.json``: step, tokens, FLOPs, the run's config, and the sha256 of the two other files.

A checkpoint is written into ``checkpoints/.tmp-step_XXXXXXX-PID`` and renamed into place in one
``os.replace``: a directory named ``step_*`` is always complete. ``latest`` is found by scanning.
Loading verifies checksums, tensor names, shapes and dtypes, and raises :class:`CheckpointError`
naming the file (and tensor) at fault.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..errors import PeerError, disk_full_as_error
from ..fsutil import umask

__all__ = [
    "CheckpointError",
    "save_checkpoint",
    "list_checkpoints",
    "latest_checkpoint",
    "resolve_checkpoint",
    "read_meta",
    "verify_checksums",
    "load_model_weights",
    "load_state",
    "capture_rng",
    "restore_rng",
    "clean_partial",
    "checkpoint_name",
]

MODEL_FILE, STATE_FILE, META_FILE = "model.safetensors", "state.pt", "meta.json"
CKPT_DIR = "checkpoints"
FORMAT_VERSION = 1
_STEP_RE = re.compile(r"^step_(\d+)$")


class CheckpointError(PeerError, ValueError):
    """A checkpoint is missing, corrupted or does not fit the model; the message names the file."""


def checkpoint_name(step: int) -> str:
    return f"step_{step:07d}"


# --------------------------------------------------------------------------------------
# Finding checkpoints
# --------------------------------------------------------------------------------------
def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints of a run (directories ``step_*`` holding ``meta.json``), oldest first."""
    root = Path(run_dir) / CKPT_DIR
    if not root.is_dir():
        return []
    found = []
    for d in root.iterdir():
        m = _STEP_RE.match(d.name)
        if m and d.is_dir() and (d / META_FILE).is_file():
            found.append((int(m.group(1)), d))
    return [d for _, d in sorted(found)]


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    ckpts = list_checkpoints(run_dir)
    return ckpts[-1] if ckpts else None


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory, or a run directory (-> its latest checkpoint)."""
    p = Path(path)
    if (p / META_FILE).is_file():
        return p
    if not p.exists():
        raise CheckpointError(f"{p}: no such run or checkpoint directory")
    if not p.is_dir():
        raise CheckpointError(f"{p} is a file, not a run or checkpoint folder")
    latest = latest_checkpoint(p)
    if latest is None:
        raise CheckpointError(f"{p}: not a checkpoint (no {META_FILE}) and holds no checkpoints under {CKPT_DIR}/")
    return latest


def clean_partial(run_dir: str | Path) -> None:
    """Remove half-written checkpoint directories left by a killed run."""
    root = Path(run_dir) / CKPT_DIR
    if root.is_dir():
        for d in root.iterdir():
            if d.name.startswith((".tmp-", ".old-")) and d.is_dir():
                shutil.rmtree(d, ignore_errors=True)


# --------------------------------------------------------------------------------------
# RNG and numpy-free state
# --------------------------------------------------------------------------------------
def capture_rng() -> dict:
    """The global RNG states of torch (CPU and CUDA), numpy and python."""
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _pack(obj):
    """Replace numpy arrays/scalars by tensors/python scalars so that ``weights_only`` loading works."""
    if isinstance(obj, np.ndarray):
        return {"__ndarray__": torch.from_numpy(np.ascontiguousarray(obj)).clone(), "dtype": str(obj.dtype)}
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, dict):
        return {k: _pack(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_pack(v) for v in obj)
    return obj


def _unpack(obj):
    if isinstance(obj, dict):
        if "__ndarray__" in obj:
            return obj["__ndarray__"].numpy().astype(obj["dtype"], copy=False)
        return {k: _unpack(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_unpack(v) for v in obj)
    return obj


# --------------------------------------------------------------------------------------
# Saving
# --------------------------------------------------------------------------------------
def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _fsync(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _dedupe(state_dict: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Keep one name per shared tensor (tied embeddings); returns (tensors, alias -> kept name)."""
    kept, aliases, seen = {}, {}, {}
    for name, t in state_dict.items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)
        if t.numel() and key in seen:
            aliases[name] = seen[key]
            continue
        seen[key] = name
        kept[name] = t.detach().to("cpu").contiguous()
    return kept, aliases


def save_checkpoint(
    run_dir: str | Path,
    model: torch.nn.Module,
    state: dict,
    meta: dict,
    keep_last: int = 0,
    *,
    model_state: dict | None = None,
    write_model: bool = True,
    extra_dirs: dict[str, Path] | None = None,
) -> Path:
    """Write checkpoint ``step_{meta['step']}`` atomically; then delete all but the last ``keep_last`` (0 keeps all).

    ``state`` goes to ``state.pt`` (numpy arrays converted), ``meta`` (JSON-serialisable; must hold
    ``step``) to ``meta.json`` together with the files' sha256 and the tied-tensor aliases.
    """
    step = int(meta["step"])
    final = Path(run_dir) / CKPT_DIR / checkpoint_name(step)
    with disk_full_as_error(final, f"checkpoint step {step}"):
        root = Path(run_dir) / CKPT_DIR
        root.mkdir(parents=True, exist_ok=True)
        final = root / checkpoint_name(step)
        tmp = root / f".tmp-{final.name}-{os.getpid()}"
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        try:
            aliases = {}
            if write_model:  # model_state: e.g. the full weights gathered from a sharded run (peer.distributed)
                tensors, aliases = _dedupe(model.state_dict() if model_state is None else model_state)
                save_file(tensors, str(tmp / MODEL_FILE), metadata={"format": "pt"})
            torch.save(_pack(state), tmp / STATE_FILE)
            for name, src in (extra_dirs or {}).items():  # e.g. dcp/: a torch.distributed.checkpoint directory
                os.replace(src, tmp / name)
            files = {}
            for name in ((MODEL_FILE,) if write_model else ()) + (STATE_FILE,):
                os.chmod(tmp / name, 0o666 & ~umask())  # safetensors writes through a 0600 temp file
                _fsync(tmp / name)
                files[name] = _sha256(tmp / name)
            full_meta = {
                "format_version": FORMAT_VERSION,
                **meta,
                "files": files,
                "tied": aliases,
                "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "torch_version": torch.__version__,
            }
            (tmp / META_FILE).write_text(json.dumps(full_meta, indent=1, sort_keys=True) + "\n", encoding="utf-8")
            _fsync(tmp / META_FILE)
            if final.exists():  # re-saving a step (e.g. after a resume): swap the old one out first
                old = root / f".old-{final.name}-{os.getpid()}"
                os.replace(final, old)
                os.replace(tmp, final)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    if keep_last > 0:
        for old in list_checkpoints(run_dir)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    return final


# --------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------
def read_meta(ckpt: str | Path) -> dict:
    path = Path(ckpt) / META_FILE
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing; {Path(ckpt)} is not a complete checkpoint") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: corrupted (not valid JSON: {e})") from None
    for key in ("step", "files", "config"):
        if key not in meta:
            raise CheckpointError(f"{path}: corrupted (no {key!r} entry)")
    return meta


def verify_checksums(ckpt: str | Path, meta: dict, names: tuple[str, ...] = (MODEL_FILE, STATE_FILE)) -> None:
    """Raise CheckpointError naming the first file that is missing or whose sha256 differs from ``meta.json``."""
    for name in names:
        path = Path(ckpt) / name
        if not path.is_file():
            raise CheckpointError(f"{path}: missing from the checkpoint")
        want = meta["files"].get(name)
        if want is None:
            raise CheckpointError(f"{Path(ckpt) / META_FILE}: has no checksum for {name}")
        got = _sha256(path)
        if got != want:
            raise CheckpointError(
                f"{path}: corrupted (sha256 {got[:12]}... does not match {want[:12]}... recorded in {META_FILE})"
            )


def load_model_weights(
    ckpt: str | Path,
    model: torch.nn.Module,
    meta: dict | None = None,
    verify: bool = True,
    optional: Callable[[str], bool] | None = None,
) -> dict:
    """Load ``model.safetensors`` into ``model`` after checking checksum, names, shapes and dtypes.

    ``optional(name)``: the model's tensors the checkpoint may lack, which keep their values (e.g. LoRA's
    factors when fine-tuning from a model without them). Returns the checkpoint's meta. Raises
    CheckpointError naming the file and the tensor at fault.
    """
    ckpt = Path(ckpt)
    meta = read_meta(ckpt) if meta is None else meta
    path = ckpt / MODEL_FILE
    if MODEL_FILE not in meta["files"] and (ckpt / "dcp").is_dir():  # sharded checkpoint, not exported
        from ..distributed.checkpoint import load_model_dcp

        try:
            load_model_dcp(ckpt / "dcp", model)
        except (ValueError, FileNotFoundError) as e:
            raise CheckpointError(str(e)) from None
        return meta
    if verify:
        verify_checksums(ckpt, meta, (MODEL_FILE,))
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: cannot be read ({e})") from None
    aliases = meta.get("tied", {})
    expected = model.state_dict()
    full = {}
    for name, t in expected.items():
        src = aliases.get(name, name)
        if src not in tensors and optional is not None and optional(name):
            full[name] = t
            continue
        if src not in tensors:
            raise CheckpointError(f"{path}: has no tensor {name!r} that the model needs (a different model shape?)")
        got = tensors[src]
        if tuple(got.shape) != tuple(t.shape):
            raise CheckpointError(
                f"{path}: tensor {name!r} has shape {tuple(got.shape)} but the model expects "
                f"{tuple(t.shape)} (checkpoint from a different model config?)"
            )
        if got.dtype != t.dtype:
            raise CheckpointError(f"{path}: tensor {name!r} has dtype {got.dtype} but the model expects {t.dtype}")
        full[name] = got
    extra = sorted(set(tensors) - {aliases.get(n, n) for n in expected})
    if extra:
        raise CheckpointError(
            f"{path}: has tensor(s) the model does not: {', '.join(extra[:5])} "
            f"(checkpoint from a different model config?)"
        )
    model.load_state_dict(full, strict=True)
    return meta


def load_state(ckpt: str | Path, meta: dict | None = None, verify: bool = True) -> dict:
    """The training state of ``state.pt`` (optimizer, RNG, data position, ...), checksum-verified."""
    ckpt = Path(ckpt)
    meta = read_meta(ckpt) if meta is None else meta
    path = ckpt / STATE_FILE
    if verify:
        verify_checksums(ckpt, meta, (STATE_FILE,))
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle/zip errors come in many types
        raise CheckpointError(f"{path}: cannot be read ({type(e).__name__}: {e})") from None
    return _unpack(state)
