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

__all__ = ["PeerError", "UsageError"]


class PeerError(Exception):
    """An error caused by the user's input or environment, reported by the CLI as one line."""


class UsageError(PeerError, ValueError):
    """A bad argument or option value (a ValueError, so library callers may catch either)."""
