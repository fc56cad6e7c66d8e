"""The expert mixing operator ``y = sum_j g_j * act(u_{i_j} . x) * v_{i_j}`` (paper eqs. 3, 6, 7).

One place chooses the backend; every backend is tested against :func:`reference.expert_mix`.
"""

from __future__ import annotations

import torch

from .reference import expert_mix as reference_expert_mix

__all__ = ["expert_mix", "available_backends", "reference_expert_mix"]


def available_backends() -> list[str]:
    names = ["reference"]
    try:
        from . import fused  # noqa: F401

        names.append("fused")
    except ImportError:
        pass
    try:
        from . import triton_kernel  # noqa: F401

        if triton_kernel.available():
            names.append("triton")
    except ImportError:
        pass
    return names


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
    """x [T, d]; u, v, gate [N, d]; idx (int64) and g [T, m] -> y [T, d].

    backend: "reference" (gather, autograd), "fused" (custom autograd, no [T, m, d] tensor),
    "triton" (GPU kernel), or "auto" (the fastest available for the device).
    sparse_grad: the fused and triton backends then return sparse COO row gradients for the
    tables (the reference's gradients stay dense).
    """
    if backend == "auto":
        backend = _auto_backend(x)
    if backend == "reference":
        return reference_expert_mix(x, u, v, idx, g, activation, gate)
    if backend == "fused":
        from .fused import expert_mix as fused_mix

        return fused_mix(x, u, v, idx, g, activation, gate, sparse_grad)
    if backend == "triton":
        from .triton_kernel import expert_mix as triton_mix

        return triton_mix(x, u, v, idx, g, activation, gate, sparse_grad)
    raise ValueError(f"backend must be one of 'auto', 'reference', 'fused', 'triton', got {backend!r}")


def _auto_backend(x: torch.Tensor) -> str:
    if x.is_cuda:
        try:
            from . import triton_kernel

            if triton_kernel.available():
                return "triton"
        except ImportError:
            pass
    try:
        from . import fused  # noqa: F401

        return "fused"
    except ImportError:
        return "reference"
