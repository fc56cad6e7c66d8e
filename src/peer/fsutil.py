"""Files and folders, safely: atomic writes that respect the umask, exclusive folder locks, and
what a folder holds (so that no command deletes what it did not make).

Nothing here imports the rest of the package; every module that writes files uses these.

- :func:`atomic_write_text` / :func:`publish`: write next to the target, give the file the usual
  ``0666 & ~umask`` mode (``tempfile`` makes 0600 files), ``os.replace`` it into place.
- :func:`make_temp_dir`: a temp folder next to a target with ``0777 & ~umask`` (not ``mkdtemp``'s 0700).
- :class:`FolderLock`: an OS lock (``fcntl.flock``) on ``<folder>/.peer.lock``, held for the life of
  a command and released on any exit (the kernel drops it when the process dies). A second
  process gets :class:`FolderBusy` naming the holder's pid.
- :func:`folder_kind`: ``"run"``, ``"corpus"``, ``"export"``, ``"sweep"`` or ``None`` for what a folder holds.
"""

from __future__ import annotations

import errno
import json
import os
import tempfile
from pathlib import Path

from .errors import PeerError, UsageError, disk_full, is_disk_full

__all__ = [
    "umask",
    "publish",
    "atomic_write_text",
    "atomic_copy",
    "make_temp_dir",
    "FolderLock",
    "FolderBusy",
    "folder_kind",
    "LOCK_NAME",
    "EXPORT_FILES",
]

LOCK_NAME = ".peer.lock"
# what `peer export` writes (transformers' save_pretrained + the tokenizer): a folder holding only these
# (and a config.json that names a peer checkpoint) is a previous export
EXPORT_FILES = frozenset(
    {
        "config.json",
        "model.safetensors",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "chat_template.jinja",
        "configuration_peer.py",
        "modeling_peer.py",
        LOCK_NAME,
    }
)


def umask() -> int:
    """The process umask (read without changing it for longer than one call)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def publish(tmp: str | Path, path: str | Path) -> None:
    """Give a finished temp file the usual permissions (0666 less the umask) and move it into place."""
    os.chmod(tmp, 0o666 & ~umask())
    os.replace(tmp, path)


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``text`` to a temp file next to ``path``, then ``os.replace`` it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        publish(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_copy(src: str | Path, dst: str | Path) -> None:
    """Copy ``src`` to a temp file next to ``dst``, then publish it there (umask's mode)."""
    import shutil

    dst = Path(dst)
    fd, tmp = tempfile.mkstemp(dir=dst.parent, prefix=f".{dst.name}.")
    os.close(fd)
    try:
        shutil.copyfile(src, tmp)
        publish(tmp, dst)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def make_temp_dir(parent: str | Path, prefix: str) -> Path:
    """A new empty folder under ``parent`` with mode ``0777 & ~umask`` (``mkdtemp`` gives 0700)."""
    tmp = Path(tempfile.mkdtemp(dir=parent, prefix=prefix))
    os.chmod(tmp, 0o777 & ~umask())
    return tmp


class FolderBusy(PeerError, RuntimeError):
    """Another process holds the folder's lock."""


class FolderLock:
    """Exclusive lock on a folder for one command (``with FolderLock(run_dir, "run"):``).

    Creates the folder if needed, and removes it again on exit when it made it and nothing but the
    lock file was written (a command that fails on bad input leaves no empty run folder behind).
    Re-entrant within one process (nested ``with`` on the same folder is a no-op), so a command may
    lock a run and call code that locks it too."""

    _held: dict[str, int] = {}  # resolved folder -> depth, this process

    def __init__(self, folder: str | Path, what: str = "folder"):
        self.folder, self.what = Path(folder), what
        self._fd: int | None = None
        self._key = ""
        self._created: list[Path] = []

    def __enter__(self) -> FolderLock:
        import fcntl

        if self.folder.exists() and not self.folder.is_dir():
            raise UsageError(f"{self.what} {str(self.folder)!r} is a file, not a folder: choose another path")
        missing = [p for p in (self.folder, *self.folder.parents) if not p.exists()]
        self.folder.mkdir(parents=True, exist_ok=True)
        self._key = str(self.folder.resolve())
        if self._key in FolderLock._held:
            FolderLock._held[self._key] += 1
            return self
        path = self.folder / LOCK_NAME
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666 & ~umask())
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = ""
            try:
                holder = os.pread(fd, 64, 0).decode("ascii", "replace").strip()
            except OSError:
                pass
            os.close(fd)
            self._created = missing
            self._remove_if_untouched()
            if e.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise FolderBusy(
                    f"{self.what} {str(self.folder)!r} is in use by another process"
                    f"{f' (pid {holder})' if holder else ''}; wait for it to finish or stop it"
                ) from None
            raise
        mine = f"{os.getpid()}\n".encode()
        try:
            if os.pread(fd, 64, 0) != mine:  # leave the file untouched when it already names us (a no-op stays one)
                os.ftruncate(fd, 0)
                os.pwrite(fd, mine, 0)
        except OSError as e:  # e.g. a full disk: leave nothing behind (the lock file, the folders made)
            os.close(fd)
            self._created = missing
            self._remove_if_untouched()
            if is_disk_full(e):
                raise disk_full(self.folder, f"the {self.what}'s lock file") from e
            raise
        self._fd = fd
        self._created = missing
        FolderLock._held[self._key] = 1
        return self

    def _remove_if_untouched(self) -> None:
        lock = self.folder / LOCK_NAME
        for d in self._created:  # the folder and any parents this lock made, innermost first
            try:
                if d == self.folder and {c.name for c in d.iterdir()} == {LOCK_NAME}:
                    lock.unlink()
                d.rmdir()  # only succeeds when empty
            except OSError:
                return

    def __exit__(self, *exc) -> None:
        depth = FolderLock._held.get(self._key, 0)
        if depth > 1:
            FolderLock._held[self._key] = depth - 1
            return
        FolderLock._held.pop(self._key, None)
        if self._fd is not None:
            os.close(self._fd)  # closing releases the flock; the file stays (harmless, reused next time)
            self._fd = None
            self._remove_if_untouched()


def folder_kind(folder: str | Path) -> str | None:
    """What ``folder`` holds: ``"run"`` (a ``peer train`` run), ``"corpus"`` (a prepared corpus),
    ``"sweep"`` (sweep results), ``"export"`` (a previous ``peer export``), ``"other"`` (anything
    else that is not empty), or ``None`` (missing or empty)."""
    p = Path(folder)
    if not p.is_dir():
        return "other" if p.exists() else None
    names = {c.name for c in p.iterdir()}
    if not names - {LOCK_NAME}:
        return None
    if names & {"checkpoints", "config.toml", "metrics.jsonl"}:
        return "run"
    if "manifest.json" in names or "splits" in names:
        return "corpus"
    if any(n.endswith("_results.json") for n in names):
        return "sweep"
    if "config.json" in names and names <= EXPORT_FILES:
        try:
            cfg = json.loads((p / "config.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return "other"
        if isinstance(cfg, dict) and "peer_source" in cfg:
            return "export"
    return "other"
