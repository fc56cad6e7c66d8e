"""Mixture of experts: E experts, each an MLP the size of the dense FFW (the paper's MoE baseline).

Router: ``p = softmax(W_r x)`` over the E experts, one row per token.

- Expert choice (Zhou et al. 2022; the paper's baseline): each expert takes the C tokens with the
  highest p[:, e] in the flattened batch, C = round(capacity_factor * T * topk / E).
  ``y_t = sum_{e that chose t} p[t, e] * expert_e(x_t)``. A token may be taken by 0..E experts.
- Token choice top-k (Switch / GShard): each token takes its k highest-p experts; an expert keeps
  at most C = ceil(capacity_factor * T * topk / E) tokens, earlier tokens first (token-major over
  (token, choice) pairs); assignments past capacity are dropped (contribute 0).
  ``y_t = sum_{kept e} p[t, e] * expert_e(x_t)`` (gates not renormalised over the top-k).
  Load-balancing loss (Switch, eq. 4 there): ``aux = w * E * sum_e f_e P_e``, f_e = fraction of the
  T*k assignments routed to e (before dropping), P_e = mean_t p[t, e]; uniform P gives ``aux = w``.
- Dropless (Mixtral / OLMoE style): token choice top-k with no capacity: every token gets its k
  experts, ``y_t = sum_{e in top-k(t)} p[t, e] * expert_e(x_t)``, with the same load-balancing loss.
  C is the busiest expert's load in this batch (read back once per layer call: a host sync on a
  GPU), so nothing is dropped.

Causality (what a language model's perplexity needs: no output may depend on later tokens or on
other sequences of the batch): only **dropless** routing is causal, in training and evaluation.
Expert choice ranks each expert's tokens over the whole flattened batch; token choice with a
binding capacity admits tokens in flattened batch order, so a sequence's early tokens can lose
their expert to an earlier sequence's later tokens. Both are the paper-era baselines and stay
available; their perplexities are not causal LM perplexities (tests/test_causality.py).

Both routings run the experts the same way: per-expert token slots gathered into [E, C, d],
one batched matmul per layer, weighted results scattered back with ``index_add``.

Note: expert choice ranks tokens across the whole flattened batch, so a token's output depends on
other tokens, future ones included (non-causal, like the query BatchNorm of PEER/PKM).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .base import SparseFeedForward, check_dim, check_positive_int
from .base import check_choice as _choice

__all__ = ["MoE"]

_ROUTINGS = ("expert_choice", "token_choice", "dropless")
_ACTS = ("gelu", "relu", "swiglu")


class MoE(SparseFeedForward):
    """E MLP experts ``d -> hidden -> d`` (no biases) with a softmax router.

    Args:
        dim: model width d.
        hidden: inner width of each expert (the dense FFW's, so each expert is dense-sized).
        num_experts: E (paper: 128).
        routing: "expert_choice" (paper), "token_choice" (with a capacity) or "dropless" (token choice
            without one: the causal routing).
        topk: experts per token for token choice; for expert choice it scales the capacity
            (average experts per token).
        capacity_factor: capacity multiplier (see the module docstring for C).
        aux_loss_weight: weight of the token-choice load-balancing loss.
        activation: "gelu" (paper), "relu" or "swiglu" (adds a gate matrix per expert).

    ``moe(x, return_aux=True)`` (or :meth:`forward_with_aux`) returns the output and the weighted
    load-balancing loss (token choice) or a zero scalar (expert choice, which is balanced by
    construction); ``moe(x)`` the output alone. No loss is kept on the module.
    """

    def __init__(
        self,
        dim: int,
        hidden: int,
        num_experts: int = 128,
        routing: str = "expert_choice",
        topk: int = 1,
        capacity_factor: float = 1.0,
        aux_loss_weight: float = 0.01,
        activation: str = "gelu",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        check_positive_int(dim, "dim")
        check_positive_int(hidden, "hidden")
        check_positive_int(num_experts, "num_experts")
        self.routing = _choice(routing, _ROUTINGS, "routing")
        self.activation = _choice(activation, _ACTS, "activation")
        if isinstance(topk, bool) or not isinstance(topk, int) or not 0 < topk <= num_experts:
            raise ValueError(f"topk must be an integer in 1..num_experts={num_experts}, got {topk!r}")
        if not isinstance(capacity_factor, (int, float)) or not capacity_factor > 0:
            raise ValueError(f"capacity_factor must be positive, got {capacity_factor!r}")
        if not isinstance(aux_loss_weight, (int, float)) or not aux_loss_weight >= 0:
            raise ValueError(f"aux_loss_weight must be >= 0, got {aux_loss_weight!r}")
        self.dim, self.hidden, self.num_experts, self.topk = dim, hidden, num_experts, topk
        self.capacity_factor, self.aux_loss_weight = float(capacity_factor), float(aux_loss_weight)

        self.router = nn.Linear(dim, num_experts, bias=False, device=device, dtype=dtype)
        # batched expert weights; init as nn.Linear's default, U(-1/sqrt(fan_in), 1/sqrt(fan_in))
        kw: dict[str, Any] = dict(device=device, dtype=dtype)
        self.w1 = nn.Parameter(_uniform_(torch.empty(num_experts, dim, hidden, **kw)))
        self.w2 = nn.Parameter(_uniform_(torch.empty(num_experts, hidden, dim, **kw)))
        self.w3 = (
            nn.Parameter(_uniform_(torch.empty(num_experts, dim, hidden, **kw))) if activation == "swiglu" else None
        )

    def reset_parameters(self, pool: bool = True) -> None:
        """Initialise again as the constructor did (same draws from the generator, same order). MoE
        experts are never a shared pool (``pool=False`` is refused)."""
        if not pool:
            raise ValueError("MoE experts cannot be shared between layers")
        self.router.reset_parameters()
        for w in (self.w1, self.w2, self.w3):
            if w is not None:
                _uniform_(w)

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, hidden={self.hidden}, num_experts={self.num_experts}, routing={self.routing!r}, "
            f"topk={self.topk}, capacity_factor={self.capacity_factor}, activation={self.activation!r}"
        )

    def causal(self) -> bool:
        """Only dropless routing is causal: expert choice and token choice with a capacity rank the
        flattened batch (a binding capacity lets a token lose its expert to another sequence's tokens)."""
        return self.routing == "dropless"

    def capacity(self, num_tokens: int) -> int:
        """Tokens per expert C for a batch of ``num_tokens`` tokens (clamped to 1..num_tokens)."""
        c = self.capacity_factor * num_tokens * self.topk / self.num_experts
        c = math.floor(c + 0.5) if self.routing == "expert_choice" else math.ceil(c)
        return max(1, min(num_tokens, c))

    # ------------------------------------------------------------------ routing
    def route(self, xf: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """xf [T, d] -> (slots [E, C] token ids, gates [E, C], probs [T, E]).

        Empty slots (token choice) hold the id T (a zero padding row) and gate 0.
        """
        probs = self.router(xf).float().softmax(dim=-1)  # [T, E]
        T, E = probs.shape
        C = self.capacity(T)
        if self.routing == "expert_choice":
            gates, slots = probs.t().topk(C, dim=-1)  # each expert picks its top-C tokens
            return slots, gates, probs
        top_p, top_e = probs.topk(self.topk, dim=-1)  # [T, k]
        flat_e = top_e.flatten()  # token-major (token, choice) order = priority order
        # position of each assignment among its expert's assignments (stable sort keeps token order)
        order = flat_e.argsort(stable=True)
        counts = _counts(flat_e, E)
        if self.routing == "dropless":  # room for the busiest expert's load: nothing is dropped
            C = max(1, int(counts.max()))
        starts = counts.cumsum(0) - counts
        pos = torch.empty_like(flat_e)
        pos[order] = torch.arange(flat_e.numel(), device=flat_e.device) - starts[flat_e[order]]
        # assignments over capacity go to one extra slot that is then cut off: fixed shapes, no
        # host sync (a boolean mask would make the GPU report how many were kept)
        slot = torch.where(pos < C, flat_e * C + pos, E * C)
        tok = torch.arange(T, device=xf.device)[:, None].expand(T, self.topk).flatten()
        slots = torch.full((E * C + 1,), T, dtype=torch.long, device=xf.device).index_put((slot,), tok)
        gates = probs.new_zeros(E * C + 1).index_put((slot,), top_p.flatten())
        return slots[:-1].view(E, C), gates[:-1].view(E, C), probs

    def load_balancing_loss(self, probs: torch.Tensor) -> torch.Tensor:
        """Switch-style ``w * E * sum_e f_e P_e`` from router probs [T, E] (token choice routing)."""
        T, E = probs.shape
        top_e = probs.topk(self.topk, dim=-1).indices
        f = _counts(top_e.flatten(), E).to(probs.dtype) / (T * self.topk)
        P = probs.mean(dim=0)
        return self.aux_loss_weight * E * (f * P).sum()

    # ------------------------------------------------------------------ experts
    def experts(self, xs: torch.Tensor) -> torch.Tensor:
        """Every expert on its own slots: xs [E, C, d] -> [E, C, d] (one bmm per layer)."""
        h = torch.bmm(xs, self.w1.to(xs.dtype))
        if self.w3 is not None:  # swiglu
            h = F.silu(h) * torch.bmm(xs, self.w3.to(xs.dtype))
        else:
            h = F.gelu(h) if self.activation == "gelu" else F.relu(h)
        return torch.bmm(h, self.w2.to(xs.dtype))

    def forward_with_aux(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(output like ``x``, weighted auxiliary loss: a scalar)."""
        xf = check_dim(x, self.dim)
        T = xf.shape[0]
        if T == 0:  # nothing to route: an empty output, and no balancing loss
            return xf.new_zeros(x.shape), xf.new_zeros(())
        slots, gates, probs = self.route(xf)
        xpad = torch.cat([xf, xf.new_zeros(1, self.dim)])  # row T: padding for empty slots
        out = self.experts(xpad[slots]) * gates.unsqueeze(-1).to(xf.dtype)  # [E, C, d]
        y = out.new_zeros(T + 1, self.dim).index_add_(0, slots.flatten(), out.flatten(0, 1))[:T]
        aux = self.load_balancing_loss(probs) if self.routing != "expert_choice" else probs.new_zeros(())
        return y.view(*x.shape[:-1], self.dim), aux


@torch.no_grad()
def _uniform_(w: torch.Tensor) -> torch.Tensor:
    """U(-1/sqrt(fan_in), 1/sqrt(fan_in)) in place, for batched weights [experts, fan_in, fan_out]."""
    bound = 1.0 / math.sqrt(w.shape[1])
    return w.uniform_(-bound, bound)


def _counts(ids: torch.Tensor, n: int) -> torch.Tensor:
    """How often each of 0..n-1 occurs in ``ids`` (``bincount(minlength=n)`` without its host sync on a GPU)."""
    return torch.zeros(n, dtype=torch.long, device=ids.device).scatter_add_(0, ids, torch.ones_like(ids))
