"""Evaluation metrics as pure functions: perplexity and the paper's expert usage / unevenness (Table 2).

Given the router weight accumulated per expert over an evaluation set, w in R^N (w_i >= 0):

    usage      = |{ i : w_i > 0 }| / N
    unevenness = KL(z || uniform) = log N + sum_i z_i log z_i,   z = w / sum(w),  0 log 0 = 0

Unevenness is 0 when every expert gets the same weight and log N when a single expert gets it all.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

__all__ = ["expert_usage", "unevenness", "usage_stats", "perplexity", "sorted_usage", "mean_std", "mean_std_record"]


def _weights(weights: Any, name: str = "weights") -> np.ndarray:
    """A 1-D float64 array of non-negative, finite weights (accepts lists, numpy arrays, torch tensors)."""
    if hasattr(weights, "detach"):  # torch tensor, without importing torch here
        weights = weights.detach().cpu().double().numpy()
    w = np.asarray(weights, dtype=np.float64)
    if w.ndim != 1 or w.size == 0:
        raise ValueError(f"{name} must be a non-empty 1-D array of per-expert weights, got shape {w.shape}")
    if not np.all(np.isfinite(w)):
        raise ValueError(f"{name} must be finite")
    if np.any(w < 0):
        raise ValueError(f"{name} must be non-negative (accumulated router weights), got min {w.min()}")
    return w


def expert_usage(weights: Any) -> float:
    """Fraction of experts with nonzero accumulated router weight (paper Table 2, 'expert usage')."""
    w = _weights(weights)
    return float(np.count_nonzero(w)) / w.size


def unevenness(weights: Any) -> float:
    """KL(z || uniform) = log N + sum z_i log z_i with z = w / sum(w) (paper Table 2, 'unevenness')."""
    w = _weights(weights)
    total = w.sum()
    if total <= 0:
        raise ValueError("weights sum to zero: no router weight was accumulated (was record_usage on?)")
    z = w[w > 0] / total  # 0 log 0 = 0
    return float(math.log(w.size) + np.sum(z * np.log(z)))


def usage_stats(weights: Any) -> dict:
    """``{"experts": N, "used": count, "usage": fraction, "unevenness": KL, "total_weight": sum}``."""
    w = _weights(weights)
    used = int(np.count_nonzero(w))
    return {
        "experts": int(w.size),
        "used": used,
        "usage": used / w.size,
        "unevenness": unevenness(w) if w.sum() > 0 else float("nan"),
        "total_weight": float(w.sum()),
    }


def sorted_usage(weights: Any) -> np.ndarray:
    """Accumulated weights sorted in decreasing order (the expert-usage distribution that is plotted)."""
    return np.sort(_weights(weights))[::-1].copy()


def mean_std(values: Any) -> tuple[float, float, int]:
    """(mean, sample standard deviation (ddof 1), n) of ``values``; the std is NaN for fewer than two
    values (undefined, not 0) and both are NaN for none. The one mean/std of the project's tables."""
    x = np.asarray(list(values), dtype=np.float64)
    n = int(x.size)
    if n == 0:
        return math.nan, math.nan, 0
    return float(x.mean()), (float(x.std(ddof=1)) if n > 1 else math.nan), n


def mean_std_record(values: Any) -> dict:
    """:func:`mean_std` as the studies' JSON record ``{"mean", "std", "n"}``."""
    mean, std, n = mean_std(values)
    return {"mean": mean, "std": std, "n": n}


def perplexity(nll_sum: float, tokens: int) -> float:
    """exp(total negative log-likelihood / number of predicted tokens)."""
    if tokens <= 0:
        raise ValueError(f"tokens must be positive, got {tokens}")
    if not math.isfinite(nll_sum):
        return float("inf")
    mean = nll_sum / tokens
    return math.exp(mean) if mean < 700 else float("inf")
