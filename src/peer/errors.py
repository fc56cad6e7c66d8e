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
"""

from __future__ import annotations

from typing import Callable

import torch

__all__ = ["PeerError", "UsageError", "check_values"]


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
