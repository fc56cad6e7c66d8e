"""The product-key index (paper eqs. 4-5): exact top-k over N = n^2 keys in O((n + k^2) d_key).

Expert-id convention (the one place it lives): expert ``i = a * n + b`` pairs sub-key ``a``
of the first set C with sub-key ``b`` of the second set C'; its full key is ``[c_a; c'_b]``.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from peer import ops

__all__ = ["ProductKeyIndex", "check_square", "check_product_keys"]


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def check_square(n: int, name: str) -> int:
    """Return sqrt(n); ValueError naming ``name`` when n is not a positive perfect square."""
    r = math.isqrt(n) if _is_int(n) and n > 0 else 0
    if r * r != n or r == 0:
        raise ValueError(f"{name} must be a positive perfect square (e.g. 1024**2), got {n!r}")
    return r


def check_product_keys(
    num_keys: int,
    key_dim: int,
    topk: int | None = None,
    heads: int | None = None,
    prefix: str = "",
    keys_name: str = "num_experts",
) -> int:
    """The one check of a product-key shape (PEER, PKM, their configs and FLOP counts): N a positive
    perfect square, key_dim positive and even (two halves), 1 <= topk <= sqrt(N), heads >= 1.
    Returns sqrt(N); a ValueError names the field (``prefix + name``) and the allowed values."""
    n = check_square(num_keys, prefix + keys_name)
    if not _is_int(key_dim) or key_dim <= 0 or key_dim % 2:
        raise ValueError(f"{prefix}key_dim must be a positive even integer, got {key_dim!r}")
    if topk is not None and (not _is_int(topk) or not 0 < topk <= n):
        raise ValueError(f"{prefix}topk must be an integer in 1..sqrt({keys_name})={n}, got {topk!r}")
    if heads is not None and (not _is_int(heads) or heads <= 0):
        raise ValueError(f"{prefix}heads must be a positive integer, got {heads!r}")
    return n


class ProductKeyIndex(nn.Module):
    """Sub-keys ``keys[g, s, j]`` (g: key group, s in {0, 1}: which half, j < n) of width key_dim/2.

    ``groups`` is 1 when all heads share keys (the paper) or ``heads`` otherwise.
    """

    def __init__(
        self,
        num_keys: int,
        key_dim: int,
        groups: int = 1,
        name: str = "num_experts",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.n = check_product_keys(num_keys, key_dim, keys_name=name)
        self.num_keys, self.key_dim, self.groups = num_keys, key_dim, groups
        self.keys = nn.Parameter(torch.empty(groups, 2, self.n, key_dim // 2, device=device, dtype=dtype))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self, write: bool = True) -> None:
        """Sub-keys ~ N(0, 1/key_dim), so that a unit-variance query scores ~N(0, 1) against a full key.
        ``write=False`` draws the same numbers from the generator and discards them."""
        keys = self.keys if write else torch.empty_like(self.keys)
        keys.normal_().div_(math.sqrt(self.key_dim))

    def subkey_scores(self, q: torch.Tensor) -> torch.Tensor:
        """q [T, h, key_dim] -> scores [T, h, 2, n] of each half against its sub-key set."""
        T, h, _ = q.shape
        q2 = q.view(T, h, 2, self.key_dim // 2)
        keys = self.keys.to(q.dtype)
        if self.groups == 1:
            # one matmul for both halves and all heads: [2, T*h, half] @ [2, half, n]
            s = torch.bmm(q2.permute(2, 0, 1, 3).reshape(2, T * h, -1), keys[0].transpose(1, 2))
            return s.view(2, T, h, self.n).permute(1, 2, 0, 3)
        s = torch.einsum("thsd,hsnd->thsn", q2, keys)
        return s

    def topk(self, q: torch.Tensor, k: int, backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
        """Exact top-k over all N product keys. q [T, h, key_dim] -> (scores, ids), each [T, h, k], best first.

        ``backend`` as the layers' (:mod:`peer.ops`): "reference" always takes :meth:`topk_reference`.
        """
        if ops.topk_engine(backend, q, self.keys) == "cpp":  # chunked scores, pruned k^2 sums, sparse backward
            return ops.product_topk(q, self.keys, k)
        return self.topk_reference(q, k)

    def topk_reference(self, q: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`topk` in plain PyTorch (any device; autograd through the dense sub-key scores)."""
        s = self.subkey_scores(q)  # [T, h, 2, n]
        s_half, i_half = s.topk(k, dim=-1)  # eq. 5: top-k within each half, both halves at once
        # the k^2 candidate sums (s1_a + s2_b) contain the exact top-k over all a*n + b
        cand = s_half[:, :, 0, :, None] + s_half[:, :, 1, None, :]  # [T, h, k, k]
        scores, flat = cand.flatten(-2).topk(k, dim=-1)
        a = i_half[:, :, 0].gather(-1, flat // k)
        b = i_half[:, :, 1].gather(-1, flat % k)
        return scores, a * self.n + b

    def full_keys(self) -> torch.Tensor:
        """All N keys [groups, N, key_dim] with row ``a*n + b`` = ``[c_a; c'_b]`` (for inspection and tests)."""
        g, _, n, half = self.keys.shape
        c1 = self.keys[:, 0, :, None, :].expand(g, n, n, half)
        c2 = self.keys[:, 1, None, :, :].expand(g, n, n, half)
        return torch.cat([c1, c2], dim=-1).reshape(g, n * n, 2 * half)
