"""Stopping a run cleanly on SIGINT / SIGTERM.

    with StopOnSignal() as stop:
        for step ...:
            ...
            if stop.requested:
                save a checkpoint at this step; raise Interrupted(...)

The first signal only sets ``requested`` (the step in flight finishes, the loop saves a checkpoint
and stops, so no finished step is redone on resume). A second signal while that happens raises
``KeyboardInterrupt`` at once; checkpoints are written to a temp folder and renamed into place, so
an aborted save leaves the previous checkpoint intact. Handlers are installed only in the main
thread and restored on exit.
"""

from __future__ import annotations

import signal
import threading

from ..errors import PeerError

__all__ = ["StopOnSignal", "Interrupted"]


class Interrupted(PeerError):
    """The run was stopped by a signal after saving a checkpoint; ``exit_code`` is 128 + the signal."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum
        self.exit_code = 128 + signum


class StopOnSignal:
    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, enabled: bool = True):
        self.enabled = enabled and threading.current_thread() is threading.main_thread()
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum is not None else ""

    def _handle(self, signum, frame) -> None:
        if self.signum is not None:  # second signal: abort now
            raise KeyboardInterrupt(f"second {signal.Signals(signum).name}: aborted")
        self.signum = signum

    def __enter__(self) -> "StopOnSignal":
        if self.enabled:
            for s in self.SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for s, h in self._previous.items():
            signal.signal(s, h)
        self._previous.clear()
