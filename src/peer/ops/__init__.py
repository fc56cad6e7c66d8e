"""PEER's operators: the expert mix (paper eqs. 3, 6, 7) and the product-key top-k (eqs. 4, 5).

Each fast operator is a ``torch.library`` custom op with a fake (meta) implementation and a
registered autograd formula, so ``torch.compile`` (``fullgraph=True``), FakeTensor and
``torch.library.opcheck`` see it (:mod:`.mix`, :mod:`.topk`). Who computes is an *engine*, one
per backend: "cpp" (:mod:`.cpu`, C++ built once per machine by :mod:`.build`), "triton"
(:mod:`.triton`, the GPU), "torch" (:mod:`.torch_engine`, the same algorithm in PyTorch for the
other dtypes and devices). This module is the one place that chooses:

    backend      CPU, fp32 x (fp32/bf16 tables)          other dtypes / devices
    "reference"  gather + einsum, autograd (the oracle)  same
    "fused"      cpp; KernelUnavailable if it cannot     torch engine (CUDA: torch engine)
                 be built (PEER_NO_CPP_KERNEL=1: torch)
    "triton"     triton (interpreter), else an error     triton on CUDA, else an error
    "auto"       cpp; if it cannot be built, the         CUDA: triton if installed, else torch
                 reference, with one warning

Every engine is tested against :func:`reference_expert_mix` (values and every gradient).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch

from . import build, cpu
from . import triton as triton_engine
from .build import KernelUnavailable
from .mix import fused_mix
from .reference import expert_mix as reference_expert_mix
from .topk import product_topk

__all__ = [
    "expert_mix",
    "reference_expert_mix",
    "fused_mix",
    "product_topk",
    "mix_engine",
    "topk_engine",
    "load_kernels",
    "KernelUnavailable",
]

BACKENDS = ("auto", "reference", "fused", "triton")
_warned: set[str] = set()


def _check_backend(backend: str) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(map(repr, BACKENDS))}, got {backend!r}")


def _cpu_kernel(backend: str, what: str) -> bool:
    """Whether the C++ kernels run ``what``: True when built; for "fused" a failed build raises; for
    "auto" it warns once and the caller takes the reference."""
    if cpu.available():
        return True
    if backend == "fused":
        cpu.LIB.require()
    if cpu.LIB.error and what not in _warned:
        _warned.add(what)
        why = " ".join(cpu.LIB.error.split())[:300]
        warnings.warn(
            f"peer: the C++ kernels are unavailable ({why}); backend='auto' computes the {what} with "
            "the PyTorch reference",
            stacklevel=5,
        )
    return False


# What the engine choice depends on besides the tensors: the environment, the compiler, the GPU.
# Each is answered by plain Python once, never traced: torch.compile calls these functions while
# tracing and keeps their answers as constants (assume_constant_result), so the choice costs nothing
# in a compiled graph and the library's build/load (file I/O, ctypes) never meets the tracer. The
# layers also load the library when they are built (load_kernels), so tracing finds it ready.
@torch.compiler.assume_constant_result  # type: ignore[untyped-decorator]
def _cpp_engine(backend: str, what: str) -> str:
    """The CPU engine for fp32 inputs: "torch" (PEER_NO_CPP_KERNEL), "cpp" (built) or "reference"."""
    if build.disabled():
        return "torch"
    return "cpp" if _cpu_kernel(backend, what) else "reference"


@torch.compiler.assume_constant_result  # type: ignore[untyped-decorator]
def _triton_ready() -> bool:
    return triton_engine.available()


def load_kernels(backend: str = "auto") -> None:
    """Build (once per machine, ~10 s) and load the C++ kernels now, unless ``backend`` is "reference" or
    they are disabled; never raises (a failed build is reported when a forward needs the kernels).
    The layers call it when they are built, so no forward, eager or traced, waits for a compiler."""
    _check_backend(backend)
    if backend != "reference":
        cpu.LIB.get()


def mix_engine(backend: str, x: torch.Tensor, tables: Sequence[torch.Tensor | None]) -> str:
    """The engine of the expert mix for ``backend``: "reference", "cpp", "torch" or "triton"."""
    _check_backend(backend)
    if backend == "reference":
        return "reference"
    if backend == "triton":
        if not _triton_ready():
            raise KernelUnavailable(
                "backend 'triton' needs the triton package and a CUDA device (or TRITON_INTERPRET=1)"
            )
        return "triton"
    if x.device.type != "cpu":
        return "triton" if backend == "auto" and x.is_cuda and _triton_ready() else "torch"
    present = [t for t in tables if t is not None]
    kernel_dtypes = (
        x.dtype == torch.float32
        and present[0].dtype in (torch.float32, torch.bfloat16)
        and all(t.device.type == "cpu" and t.dtype == present[0].dtype and t.is_contiguous() for t in present)
    )
    if not kernel_dtypes:
        return "torch"
    engine: str = _cpp_engine(backend, "expert mix")
    return engine


def topk_engine(backend: str, q: torch.Tensor, keys: torch.Tensor) -> str:
    """The engine of the product-key top-k: "cpp" or "reference" (PyTorch, any device)."""
    _check_backend(backend)
    if backend == "reference" or not (
        q.device.type == "cpu"
        and keys.device.type == "cpu"
        and q.dtype == torch.float32
        and keys.dtype == torch.float32
    ):
        return "reference"
    engine = _cpp_engine("auto" if backend == "triton" else backend, "product-key top-k")
    return "cpp" if engine == "cpp" else "reference"


def expert_mix(
    x: torch.Tensor,
    u: torch.Tensor,
    v: torch.Tensor,
    idx: torch.Tensor,
    g: torch.Tensor,
    activation: str = "gelu",
    gate: torch.Tensor | None = None,
    backend: str = "auto",
    sparse_grad: bool = False,
) -> torch.Tensor:
    """y[t] = sum_j g[t, j] * act(u[idx[t, j]] . x[t]) * v[idx[t, j]]: x [T, d]; u, v, gate [N, d];
    idx (int64) and g [T, m] -> y [T, d].

    backend: see the table in this module's docstring. sparse_grad: the fused backends return
    sparse COO row gradients for the tables (the reference's stay dense)."""
    engine = mix_engine(backend, x, (u, v, gate))
    if engine == "reference":
        return reference_expert_mix(x, u, v, idx, g, activation, gate)
    if engine == "triton" and x.dtype != torch.float32:  # the kernels keep h and the coefficients in fp32
        return fused_mix(x.float(), u, v, idx, g.float(), activation, gate, sparse_grad, engine).to(x.dtype)
    return fused_mix(x, u, v, idx, g, activation, gate, sparse_grad, engine)
