"""Keep freed memory in the process: no page-fault storm from the allocator on every training step.

A training step allocates and frees the same large tensors every time (the logits and their gradient
are ~67 MB at 2048 tokens and a vocabulary of 8192). glibc serves an allocation above its mmap
threshold (at most 32 MB, adjusted at run time) with fresh pages from the kernel and returns them on
``free``, so each step faults every page in again and the kernel zeroes it: measured, a third of
training's CPU time went to the kernel (``/usr/bin/time``: 23.2 s system of 62.7 s wall for 200 PEER
steps; docs/benchmarks.md).

:func:`retain_freed_memory` tells glibc (``mallopt``) to serve allocations up to 2 GiB from its heap
and to keep freed memory there instead of giving it back, so the next step reuses pages that are
already mapped. It changes where tensors live, never what is computed (results are bit-identical;
tested). The cost: the process keeps its peak heap resident until it exits, which training does
anyway. ``peer`` applies it through :func:`apply_memory_settings` (below); a program that imports
``peer`` as a library may call it itself.

Elsewhere than glibc (macOS, musl, Windows) it does nothing. ``PEER_RETAIN_FREED_MEMORY=0`` turns it
off (e.g. to measure the difference).

:func:`bound_kernel_cache` caps oneDNN's primitive cache (``ONEDNN_PRIMITIVE_CACHE_CAPACITY``, default
1024 entries) at 16 unless the environment already sets it. PyTorch's CPU ``bmm`` keeps one oneDNN
primitive per shape, each holding ~25 MB here; a dropless MoE's expert batches change shape every step
(their length is the busiest expert's load), so its training process grew until the cache was full: a
d48 MoE held **12 GB** after 1,000 steps, and two side by side ran this 24 GiB machine out of memory
(stage 3 of the confirmation study, 2026-12-07). Measured on that MoE (200 steps, 1 thread): peak RSS
837 MiB with no cache, 1,349 MiB at 16, 3,929 MiB at 128 (9,927 MiB after 400 steps at oneDNN's
1024), the same weights bit for bit in every case and no measurable change of speed; PEER's speed
(150 steps) is the same with and without a cache. A primitive rebuilt for a shape computes exactly
what the evicted one did.

:func:`apply_memory_settings` applies both; ``peer`` calls it where a process starts (the command line),
where training starts (:func:`peer.train.train`) and where evaluation starts (:func:`peer.model.summed_nll`).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

__all__ = [
    "retain_freed_memory",
    "bound_kernel_cache",
    "apply_memory_settings",
    "ENV",
    "KERNEL_CACHE_ENV",
    "KERNEL_CACHE_CAPACITY",
    "available_bytes",
]

ENV = "PEER_RETAIN_FREED_MEMORY"
KERNEL_CACHE_ENV = "ONEDNN_PRIMITIVE_CACHE_CAPACITY"  # read by oneDNN when it first builds a primitive
KERNEL_CACHE_CAPACITY = 16

# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3
# mallopt takes a C int: 2 GiB - 1 is the largest threshold it can be given
_LIMIT = 2**31 - 1
_TOP_PAD = 256 << 20  # grow the heap in steps of 256 MiB (address space only: pages fault in when used)

_applied: bool | None = None


def _disabled() -> bool:
    return os.environ.get(ENV, "") in ("0", "false", "no", "off")


def retain_freed_memory() -> bool:
    """Apply the allocator settings once per process; True when they are in effect (glibc, not
    disabled by ``PEER_RETAIN_FREED_MEMORY=0``)."""
    global _applied
    if _applied is None:
        _applied = False
        if not _disabled():
            try:
                libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
                mallopt = libc.mallopt
            except (OSError, AttributeError):  # not glibc: nothing to tell
                return False
            mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
            _applied = all(
                mallopt(param, value) == 1
                for param, value in ((_M_MMAP_THRESHOLD, _LIMIT), (_M_TRIM_THRESHOLD, _LIMIT), (_M_TOP_PAD, _TOP_PAD))
            )
    return _applied


def bound_kernel_cache(capacity: int = KERNEL_CACHE_CAPACITY) -> str:
    """Cap oneDNN's primitive cache at ``capacity`` entries unless the environment sets it (module
    docstring); the capacity in effect for primitives built from now on. oneDNN reads it once, when the
    process builds its first primitive: call this before the first ``bmm``."""
    return os.environ.setdefault(KERNEL_CACHE_ENV, str(capacity))


def apply_memory_settings() -> None:
    """Both settings of this module: freed memory stays mapped; the kernel cache is bounded."""
    bound_kernel_cache()
    retain_freed_memory()


def available_bytes(device: str = "cpu") -> int | None:
    """Memory a new allocation on ``device`` can still get: the CPU's ``MemAvailable`` (Linux), a CUDA
    device's free memory; None where it cannot be told."""
    if device.startswith("cuda"):
        import torch

        try:
            return int(torch.cuda.mem_get_info(torch.device(device))[0])
        except (RuntimeError, AssertionError):
            return None
    if device != "cpu":
        return None
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None
