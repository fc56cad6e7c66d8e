"""The slow, obvious expert mix: gather every retrieved expert, then einsum. Kept as the oracle."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {"gelu": F.gelu, "relu": F.relu}


def expert_mix(
    x: torch.Tensor,
    u: torch.Tensor,
    v: torch.Tensor,
    idx: torch.Tensor,
    g: torch.Tensor,
    activation: str = "gelu",
    gate: torch.Tensor | None = None,
) -> torch.Tensor:
    """y[t] = sum_j g[t, j] * act(u[idx[t, j]] . x[t]) * v[idx[t, j]]   (eqs. 3 and 6).

    With ``gate`` (GLU experts): act(gate_i . x) * (u_i . x) replaces act(u_i . x).
    """
    act = ACTIVATIONS[activation]
    ue = F.embedding(idx, u).to(x.dtype)  # [T, m, d]
    h = torch.einsum("td,tmd->tm", x, ue)
    if gate is not None:
        ge = F.embedding(idx, gate).to(x.dtype)
        h = act(torch.einsum("td,tmd->tm", x, ge)) * h
    else:
        h = act(h)
    ve = F.embedding(idx, v).to(x.dtype)
    return torch.einsum("tm,tmd->td", h * g, ve)
