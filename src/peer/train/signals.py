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

A parent that trains in child processes (``peer sweep``, ``peer main`` side by side) uses :class:`Workers`:
inside ``with workers.forwarding():`` its SIGINT/SIGTERM is forwarded to every running child, which stops
as above, and no further child starts.
"""

from __future__ import annotations

import contextlib
import signal
import subprocess
import threading

from ..errors import PeerError

__all__ = ["StopOnSignal", "Interrupted", "Workers"]


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

    def __enter__(self) -> StopOnSignal:
        if self.enabled:
            for s in self.SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for s, h in self._previous.items():
            signal.signal(s, h)
        self._previous.clear()


class Workers:
    """Child processes that train. Each runs in its own process session, so a terminal's Ctrl-C reaches the
    parent alone; :meth:`stop` (the parent's SIGINT/SIGTERM, see :meth:`forwarding`) forwards the signal once to
    every running child, which saves a checkpoint at its current step and exits, and no further child starts."""

    def __init__(self):
        self._procs: set[subprocess.Popen] = set()
        self._lock = threading.Lock()
        self.stopped: int | None = None  # the signal that stopped the parent

    def run(self, argv: list[str], out) -> int | None:
        """The child's exit status; None when the parent was stopped before it started."""
        with self._lock:
            if self.stopped is not None:
                return None
            proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
            self._procs.add(proc)
        try:
            return proc.wait()
        finally:
            with self._lock:
                self._procs.discard(proc)

    def stop(self, signum: int, frame=None) -> None:
        with self._lock:
            first = self.stopped is None
            self.stopped = signum
            procs = list(self._procs)
        for proc in (
            procs
        ):  # a second signal is forwarded too: the children then abort their save (the previous checkpoint stays)
            proc.send_signal(signum if first else signal.SIGINT)

    @contextlib.contextmanager
    def forwarding(self):
        """SIGINT/SIGTERM call :meth:`stop` inside the block (main thread only); the previous handlers return after."""
        main = threading.current_thread() is threading.main_thread()
        previous = {sig: signal.signal(sig, self.stop) for sig in StopOnSignal.SIGNALS} if main else {}
        try:
            yield self
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
