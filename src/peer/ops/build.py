"""Builds and loads a C++ kernel library: compiled once per machine, cached, loaded with ctypes.

A :class:`CLibrary` is a set of C++ sources with a plain C ABI (no torch headers, so the build
takes ~10 s instead of the minutes of a ``torch.utils.cpp_extension`` build, and the binary does
not depend on the torch version). It is compiled with the system compiler (``$CXX`` or ``g++``)
into ``$PEER_KERNEL_CACHE`` (default ``~/.cache/peer/kernels``), keyed by a hash of the sources,
the flags, the compiler and the CPU, and written atomically. The kernels are reached only through
the ``torch.library`` custom ops of :mod:`peer.ops` (and of :mod:`peer.train.adamw_kernel`), which
is what ``torch.compile``, FakeTensor and ``opcheck`` see.

``PEER_NO_CPP_KERNEL=1`` disables every library (an explicit choice: the fused backend then runs
its PyTorch engine). A library that cannot be built keeps the compiler's message in
:attr:`CLibrary.error`; :meth:`CLibrary.require` raises it as a :class:`KernelUnavailable`.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from peer.errors import PeerError

__all__ = ["CLibrary", "KernelUnavailable", "disabled", "ptr", "check", "CSRC"]

CSRC = Path(__file__).parent / "csrc"
# -fopenmp: the kernels run on the OpenMP runtime torch already loaded (see fused_cpu_common.h);
# a compiler without OpenMP gets the std::thread build (_flag_sets)
FLAGS = ["-O3", "-march=native", "-fopenmp", "-fno-math-errno", "-std=c++17", "-shared", "-fPIC", "-pthread"]


class KernelUnavailable(PeerError, RuntimeError):
    """A C++ kernel library was asked for explicitly and cannot be built or loaded."""


def disabled() -> bool:
    """True when ``PEER_NO_CPP_KERNEL`` is set (to anything but '' or '0')."""
    return os.environ.get("PEER_NO_CPP_KERNEL", "") not in ("", "0")


if TYPE_CHECKING:
    import torch


def ptr(t: torch.Tensor | None) -> int | None:
    """A tensor's data pointer for a C call (None for an absent tensor: a null pointer)."""
    return None if t is None else t.data_ptr()


def check(rc: int, name: str) -> None:
    """A kernel's return code: 0, else the kernel failed."""
    if rc != 0:
        raise RuntimeError(f"peer CPU kernel {name} failed (could not start its threads?)")


def _cpu_tag() -> str:
    try:
        flags = next((ln for ln in Path("/proc/cpuinfo").read_text().splitlines() if ln.startswith("flags")), "")
    except OSError:
        flags = ""
    return platform.machine() + flags


def _flag_sets() -> list[list[str]]:
    no_native = [f for f in FLAGS if f != "-march=native"]
    return [FLAGS, no_native, [("-fopenmp-simd" if f == "-fopenmp" else f) for f in no_native]]


class CLibrary:
    """A lazily built shared library of ``sources`` with C functions of the given ctypes signatures.

    ``signatures`` maps a function name to (argtypes, restype). :meth:`get` returns the loaded
    ``ctypes.CDLL`` or None (disabled, no compiler, build failed: see :attr:`error`)."""

    def __init__(
        self,
        name: str,
        sources: list[Path],
        signatures: dict[str, tuple[list[Any], Any]],
        headers: tuple[Path, ...] = (),
    ) -> None:
        self.name, self.sources, self.signatures = name, list(sources), signatures
        self.headers = list(headers) + sorted(CSRC.glob("*.h"))
        self.error: str | None = None
        self._dll: ctypes.CDLL | None = None
        self._tried = False

    def get(self) -> ctypes.CDLL | None:
        if disabled():
            return None
        if not self._tried:
            self._tried = True
            try:
                self._dll = self._load()
            except KernelUnavailable as e:
                self.error = str(e)
        return self._dll

    def require(self) -> ctypes.CDLL:
        """The library, or a KernelUnavailable saying why it cannot be had."""
        dll = self.get()
        if dll is None:
            why = "PEER_NO_CPP_KERNEL is set" if disabled() else self.error
            raise KernelUnavailable(
                f"peer: the C++ kernels ({self.name}) are unavailable: {why}; "
                "use backend='auto' (falls back to the reference) or backend='reference'"
            )
        return dll

    def reset(self) -> None:
        """Forget the loaded library (tests; a changed environment)."""
        self._dll, self._tried, self.error = None, False, None

    # ------------------------------------------------------------------ build
    def _load(self) -> ctypes.CDLL:
        cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
        if cxx is None:
            raise KernelUnavailable("no C++ compiler found (set $CXX or install g++)")
        missing = [str(f) for f in self.sources + self.headers if not f.exists()]
        if missing:
            raise KernelUnavailable(f"kernel sources missing: {', '.join(missing)}")
        text = "".join(f.read_text() for f in self.sources + self.headers)
        key = hashlib.sha256((text + " ".join(FLAGS) + cxx + _cpu_tag()).encode()).hexdigest()[:16]
        cache = Path(os.environ.get("PEER_KERNEL_CACHE", Path.home() / ".cache" / "peer" / "kernels"))
        so = cache / f"peer_{self.name}_{key}.so"
        if not so.exists():
            self._compile(cxx, so)
        try:
            dll = ctypes.CDLL(str(so))
        except OSError as e:
            raise KernelUnavailable(f"cannot load {so}: {e}") from None
        for fn_name, (argtypes, restype) in self.signatures.items():
            fn = getattr(dll, fn_name)
            fn.argtypes, fn.restype = argtypes, restype
        return dll

    def _compile(self, cxx: str, so: Path) -> None:
        """Compile into ``so`` atomically; retry without -march=native, then without OpenMP, if that fails."""
        tmp = None
        try:
            so.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(suffix=".so", dir=so.parent)
            os.close(fd)
            for flags in _flag_sets():
                res = subprocess.run(
                    [cxx, *flags, f"-I{CSRC}", *map(str, self.sources), "-o", tmp],
                    capture_output=True,
                    text=True,
                    timeout=600,
                )
                if res.returncode == 0:
                    os.replace(tmp, so)
                    tmp = None
                    return
            raise KernelUnavailable(f"building {self.name} failed:\n{res.stderr[-2000:]}")
        except (OSError, subprocess.SubprocessError) as e:
            raise KernelUnavailable(f"cannot build {self.name}: {e}") from None
        finally:
            if tmp is not None and os.path.exists(tmp):
                os.unlink(tmp)
