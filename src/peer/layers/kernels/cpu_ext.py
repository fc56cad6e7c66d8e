"""Builds and loads the CPU kernels through ctypes: ``fused_cpu.cpp`` (the fused expert mix),
``pk_topk_cpu.cpp`` (product-key top-k) and ``adamw_cpu.cpp`` (row-wise AdamW), one library.

The library is compiled once per machine with the system C++ compiler (``$CXX`` or ``g++``,
~10 s) into ``$PEER_KERNEL_CACHE`` (default ``~/.cache/peer/kernels``), keyed by a hash of the
sources, the flags and the CPU; the build is written atomically. No pybind, no torch headers.
When no compiler is found, the build fails, or ``PEER_NO_CPP_KERNEL=1`` is set, :func:`lib`
returns None and the fused backend uses its pure-PyTorch path instead.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

import torch

__all__ = ["lib", "forward", "backward", "sort_pairs", "table_grads", "adamw_rows", "pk_topk", "pk_topk_backward"]

_DIR = Path(__file__).parent
_SOURCES = [_DIR / "fused_cpu.cpp", _DIR / "pk_topk_cpu.cpp", _DIR / "adamw_cpu.cpp"]
_HEADERS = [_DIR / "fused_cpu_common.h"]
_FLAGS = ["-O3", "-march=native", "-fopenmp-simd", "-fno-math-errno", "-std=c++17", "-shared", "-fPIC", "-pthread"]
_state: dict = {}

_P = ctypes.c_void_p
_I = ctypes.c_int64
_SIGS = {
    "peer_forward": [_P] * 9 + [_I] * 3 + [ctypes.c_int] * 3,
    "peer_backward": [_P] * 14 + [_I] * 3 + [ctypes.c_int] * 3,
    "peer_table_grads": [_P, _P, _P, _I, _I, _I] + [_P] * 9 + [ctypes.c_int],
    "peer_sort_pairs": [_P, _I, _I, _P, _P, _P],
    "peer_pk_topk": [_P] + [_I] * 7 + [_P] * 3 + [ctypes.c_int],
    "peer_pk_topk_backward": [_P] * 4 + [_I] * 6 + [_P] * 2 + [ctypes.c_int],
    "peer_adamw_rows": [_P] * 5 + [_I] * 2 + [ctypes.c_float] * 7 + [ctypes.c_int] * 4,
}
_RESTYPES = {"peer_sort_pairs": ctypes.c_int64}


def _cpu_tag() -> str:
    try:
        flags = next((ln for ln in Path("/proc/cpuinfo").read_text().splitlines() if ln.startswith("flags")), "")
    except OSError:
        flags = ""
    return platform.machine() + flags


def _build() -> ctypes.CDLL | None:
    if os.environ.get("PEER_NO_CPP_KERNEL", "") not in ("", "0"):
        return None
    cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if cxx is None or not all(f.exists() for f in _SOURCES + _HEADERS):
        return None
    text = "".join(f.read_text() for f in _SOURCES + _HEADERS)
    key = hashlib.sha256((text + " ".join(_FLAGS) + cxx + _cpu_tag()).encode()).hexdigest()[:16]
    cache = Path(os.environ.get("PEER_KERNEL_CACHE", Path.home() / ".cache" / "peer" / "kernels"))
    so = cache / f"peer_fused_cpu_{key}.so"
    if not so.exists() and not _compile(cxx, so):
        return None
    try:
        dll = ctypes.CDLL(str(so))
    except OSError as e:
        warnings.warn(f"peer: cannot load {so} ({e}); using the PyTorch path", stacklevel=3)
        return None
    for name, argtypes in _SIGS.items():
        fn = getattr(dll, name)
        fn.argtypes, fn.restype = argtypes, _RESTYPES.get(name, ctypes.c_int)
    return dll


def _compile(cxx: str, so: Path) -> bool:
    """Compile the sources into ``so`` (atomically); retry without -march=native if that fails."""
    tmp = None
    try:
        so.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=so.parent)
        os.close(fd)
        for flags in (_FLAGS, [f for f in _FLAGS if f != "-march=native"]):
            res = subprocess.run([cxx, *flags, *map(str, _SOURCES), "-o", tmp], capture_output=True, text=True,
                                 timeout=600)
            if res.returncode == 0:
                os.replace(tmp, so)
                tmp = None
                return True
        warnings.warn(f"peer: building the CPU kernels failed, using the PyTorch path:\n{res.stderr[-2000:]}",
                      stacklevel=4)
    except (OSError, subprocess.SubprocessError) as e:
        warnings.warn(f"peer: cannot build the CPU kernels ({e}); using the PyTorch path", stacklevel=4)
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
    return False


def lib() -> ctypes.CDLL | None:
    """The loaded kernel library, building it on first use; None when unavailable."""
    if "lib" not in _state:
        _state["lib"] = _build()
    return _state["lib"]


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _check(rc: int, name: str) -> None:
    if rc != 0:
        raise RuntimeError(f"peer CPU kernel {name} failed (could not start its threads?)")


def forward(x, g, idx, u, v, w, y, h, hg, gelu: bool) -> None:
    """Fill y [T, d], h [T, m] (u_i . x) and, for GLU, hg [T, m] (w_i . x). All contiguous, x/g fp32."""
    T, d = x.shape
    m = idx.shape[1]
    rc = lib().peer_forward(_ptr(x), _ptr(g), _ptr(idx), _ptr(u), _ptr(v), _ptr(w), _ptr(y), _ptr(h), _ptr(hg),
                            T, d, m, int(gelu), int(u.dtype == torch.bfloat16), torch.get_num_threads())
    _check(rc, "forward")


def backward(x, dy, g, idx, u, v, w, h, hg, dx, dg, cu, cv, cw, gelu: bool) -> None:
    """Fill dx (optional), dg, and the per-pair coefficients cu, cv (and cw for GLU), each [T, m]."""
    T, d = x.shape
    m = idx.shape[1]
    rc = lib().peer_backward(_ptr(x), _ptr(dy), _ptr(g), _ptr(idx), _ptr(u), _ptr(v), _ptr(w), _ptr(h), _ptr(hg),
                             _ptr(dx), _ptr(dg), _ptr(cu), _ptr(cv), _ptr(cw), T, d, m, int(gelu),
                             int(u.dtype == torch.bfloat16), torch.get_num_threads())
    _check(rc, "backward")


def sort_pairs(idx: torch.Tensor, num_experts: int):
    """Radix sort of the pairs of idx [T, m] by expert: (rows [U], perm [T*m], offsets [U + 1])."""
    P = idx.numel()
    perm = torch.empty(P, dtype=torch.int64)
    rows = torch.empty(P, dtype=torch.int64)
    offsets = torch.empty(P + 1, dtype=torch.int64)
    U = lib().peer_sort_pairs(_ptr(idx), P, num_experts, _ptr(perm), _ptr(rows), _ptr(offsets))
    _check(0 if U >= 0 else 1, "sort_pairs")
    return rows[:U], perm, offsets[: U + 1]


def table_grads(perm, offsets, m: int, triples, out_rows=None) -> None:
    """For each (src [T, d], coef [T, m], out) in ``triples`` (None entries skipped):
    out[r] (or out[out_rows[r]]) = sum over bag r of the expert-sorted pairs of coef[pair] * src[pair // m]."""
    U = offsets.numel() - 1
    d = next(t[0].shape[1] for t in triples if t is not None)
    args = []
    for t in list(triples) + [None] * (3 - len(triples)):
        args += [None, None, None] if t is None else [_ptr(t[0]), _ptr(t[1]), _ptr(t[2])]
    rc = lib().peer_table_grads(_ptr(perm), _ptr(offsets), _ptr(out_rows), U, m, d, *args, torch.get_num_threads())
    _check(rc, "table_grads")


def adamw_rows(p, m, v, g, rows, lr, b1, b2, eps, wd, bc1, bc2, rowwise: bool) -> None:
    """AdamW on rows ``rows`` [U] (None: every row) of p [N, d] (fp32/bf16) with gradient rows g [U, d] (fp32).
    m is [N, d] and v is [N, d] (or [N] fp32 when ``rowwise``), fp32 or bf16, updated in place."""
    U, d = g.shape
    rc = lib().peer_adamw_rows(_ptr(p), _ptr(m), _ptr(v), _ptr(g), _ptr(rows), U, d, lr, b1, b2, eps, wd, bc1, bc2,
                               int(p.dtype == torch.bfloat16), int(m.dtype == torch.bfloat16), int(rowwise),
                               torch.get_num_threads())
    _check(rc, "adamw_rows")


def pk_topk(s: torch.Tensor, k: int, scores, ids, ab) -> None:
    """Product-key top-k of sub-key scores ``s`` viewed [T, h, 2, n] (last dim contiguous): fills
    scores [T, h, k] (best first), ids [T, h, k] = a * n + b and ab [T, h, k, 2]."""
    T, h, _, n = s.shape
    st, sh, ss, one = s.stride()
    if one != 1:
        raise ValueError("pk_topk: the last dim of the scores must be contiguous")
    rc = lib().peer_pk_topk(_ptr(s), T, h, n, st, sh, ss, k, _ptr(scores), _ptr(ids), _ptr(ab),
                            torch.get_num_threads())
    _check(rc, "pk_topk")


def pk_topk_backward(G, ab, q, keys, dq, dkeys) -> None:
    """dq [T, h, key_dim] and dkeys (like keys [groups, 2, n, half]) of the selected product-key scores."""
    T, h, k = G.shape
    groups, _, n, half = keys.shape
    rc = lib().peer_pk_topk_backward(_ptr(G), _ptr(ab), _ptr(q), _ptr(keys), T * h, h, groups, n, half, k,
                                     _ptr(dq), _ptr(dkeys), torch.get_num_threads())
    _check(rc, "pk_topk_backward")
