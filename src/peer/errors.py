"""The package's user-facing error types. ``peer`` commands print these as one line (exit code 2);
anything else is a bug and keeps its traceback.

    PeerError                    base of every error the CLI reports as one line
      UsageError(ValueError)     a bad argument or option value given by the user
      ConfigError(ValueError)    peer.config: a config field has a bad value (names the field)
      DataError(ValueError)      peer.data: a corpus, text or tokenizer cannot be used
      CheckpointError(ValueError) peer.train.checkpoint: a missing, corrupt or mismatched checkpoint
      FolderBusy                 peer.fsutil: another process holds a run / sweep / corpus folder
      TrainingDiverged           peer.train: NaN/inf; the run stopped at its last good checkpoint
      DistributedError           peer.distributed: a rank died or timed out
      DiskFull                   no space left where a command writes; what it wrote before is intact
"""

from __future__ import annotations

import contextlib
import errno
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

__all__ = ["PeerError", "UsageError", "DiskFull", "check_values", "disk_full_as_error", "is_disk_full"]


class PeerError(Exception):
    """An error caused by the user's input or environment, reported by the CLI as one line."""


class UsageError(PeerError, ValueError):
    """A bad argument or option value (a ValueError, so library callers may catch either)."""


def check_values(ok: torch.Tensor, message: str, detail: Callable[[], str] = str) -> None:
    """A check of tensor values that never makes the host wait for a device: ``ok`` is a boolean
    0-dim tensor. On the CPU a False ``ok`` raises ``ValueError(message + detail())`` at once (the
    detail may read the offending values: only the failing path pays for it). On an accelerator the
    check is queued with ``torch._assert_async``: a False ``ok`` stops the process's next sync with
    a device-side assert carrying ``message``, as PyTorch's own index checks do there."""
    try:
        torch._assert_async(ok, message)  # on the CPU it checks at once, without a read from Python
    except RuntimeError:  # only the CPU raises here: a device queues the check
        raise ValueError(message + detail()) from None


class DiskFull(PeerError):
    """No space left on the device a command was writing to. The write was abandoned and its partial
    files removed; everything written before (earlier checkpoints, the run's files) is intact."""


_FULL = (errno.ENOSPC, errno.EDQUOT)


def is_disk_full(exc: BaseException) -> bool:
    """Whether ``exc`` reports a full device: an OSError ENOSPC/EDQUOT, or the same error as text from a
    library that wraps it (safetensors: "No space left on device"; torch.save's zip writer reports the
    short write as "unexpected pos")."""
    if isinstance(exc, OSError) and exc.errno in _FULL:
        return True
    text = str(exc)
    return any(s in text for s in ("No space left on device", "Disk quota exceeded", "unexpected pos"))


def _free_bytes(path: Path) -> int | None:
    for p in (path, *path.parents):
        if p.exists():
            try:
                return shutil.disk_usage(p).free
            except OSError:
                return None
    return None


def disk_full(path: str | Path, what: str) -> DiskFull:
    """The one-line error for a full device while writing ``what`` to ``path``."""
    free = _free_bytes(Path(path))
    room = f"{free / 2**20:,.1f} MiB free" if free is not None else "free space unknown"
    return DiskFull(
        f"no space left on the device of {str(path)!r} ({room}) while writing {what}: nothing was left "
        "half-written and earlier files are intact; free some space and run the command again"
    )


@contextlib.contextmanager
def disk_full_as_error(path: str | Path, what: str) -> Iterator[None]:
    """Turn a full-device error raised inside the block into :class:`DiskFull` naming ``path``; the
    block's own cleanup (``except BaseException: remove temp; raise``) runs first."""
    try:
        yield
    except DiskFull:
        raise
    except Exception as e:
        if is_disk_full(e):
            raise disk_full(path, what) from e
        raise
