"""Expert parallelism for PEER: the expert tables u, v (and GLU gate) split by rows across ranks.

Rank r of an expert-parallel group of P ranks owns rows [lo_r, hi_r) of every table, with the
row split of ``torch.chunk`` / DTensor ``Shard(0)`` (ceil(N/P) rows per rank, the last ranks
fewer): rank r holds about N/P of the 2 N d (3 N d with GLU) expert parameters. The query
network, its norm and the product keys are small and stay replicated.

Forward of one layer on T tokens, m = h*k retrieved experts per token (eqs. 1-7):

    1. every rank retrieves (g, idx) [T, m] for all T tokens (replicated query and keys)
    2. h_partial[t, j] = u_idx[t,j] . x_t   if this rank owns idx[t, j], else 0
    3. h = all_reduce_sum(h_partial)                               [T, m]   (GLU: [T, m, 2])
    4. a = act(h)                                                   (eq. 6; GLU: act(gate.x) * (u.x))
    5. y_partial[t] = sum_{own j} g[t, j] a[t, j] v_idx[t,j]       [T, d]
    6. y = all_reduce_sum(y_partial)                               (eqs. 3, 7)

so each forward moves m + d numbers per token (2m + d with GLU) whatever N is; the backward
moves the same: the gradients of x [T, d] and g [T, m] are summed over the group (the two
all-reduces above pass gradients through unchanged). Two input modes:

- replicated (``data_parallel=False``): all ranks hold the same x and compute the same loss;
  outputs and all gradients equal the single-process layer's (tested).
- data parallel (``data_parallel=True``, used in training): each rank brings its own tokens.
  The layer all-gathers them (step 0), runs steps 1-5 on the union, and reduce-scatters y
  (step 6) so each rank gets its own tokens' outputs back; the backward all-gathers dy and
  reduce-scatters dx. The query network's gradients are per-rank partial sums that the
  data-parallel wrapper averages like any other replicated gradient, and the tables' row
  gradients are scaled by 1/P to match that average: training on P ranks with B tokens each
  equals one process with P*B tokens (query BatchNorm included: it sees the whole batch).

``backend`` is honoured by the retrieval (the router's product-key top-k: "reference" is plain
PyTorch, the others take the C++ top-k op where it applies). The mix itself has one
implementation, the gathers below: the fused kernels compute u . x and the v sum in one pass per
token, which the all-reduce of step 3 splits in two. ``backend="triton"`` is refused (it would
promise a GPU kernel the sharded mix does not have).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ..layers.peer import PEER, TABLES
from .env import _collective

__all__ = [
    "ExpertShardedPEER",
    "shard_peer_layer",
    "shard_model",
    "shard_bounds",
    "sharded_expert_mix",
    "gather_full_state",
    "unshard_peer_layer",
    "expert_shards",
    "comm_floats_per_token",
]

_ACT = {"gelu": F.gelu, "relu": F.relu}


def shard_bounds(num_rows: int, world: int, rank: int) -> tuple[int, int]:
    """Rows [lo, hi) of rank ``rank`` of ``world``: the split of torch.chunk and DTensor Shard(0)."""
    if world <= 0 or not 0 <= rank < world:
        raise ValueError(f"rank must be in 0..world-1 (world={world}), got {rank}")
    size = -(-num_rows // world)
    lo = min(rank * size, num_rows)
    return lo, min(lo + size, num_rows)


def comm_floats_per_token(d: int, heads: int, topk: int, glu: bool = False) -> dict[str, int]:
    """Numbers all-reduced per token by one expert-sharded layer (independent of N)."""
    m = heads * topk
    fwd = (2 * m if glu else m) + d
    return {"forward": fwd, "backward": m + d, "total": fwd + m + d}


# ------------------------------------------------------------------ autograd collectives
def _group_size(group) -> int:
    return dist.get_world_size(group) if dist.is_initialized() else 1


class _SumReduce(torch.autograd.Function):
    """all_reduce(sum) forward; identity backward (the gradient is already replicated)."""

    @staticmethod
    def forward(ctx, t, group):
        t = t.contiguous().clone()
        _collective("all_reduce", dist.all_reduce, t, group=group)
        return t

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _CopyToGroup(torch.autograd.Function):
    """Identity forward; backward sums the gradients of all inputs over the group (one all-reduce)."""

    @staticmethod
    def forward(ctx, group, *tensors):
        ctx.group = group
        ctx.metas = [(t.shape, t.dtype) for t in tensors]
        ctx.device = tensors[0].device
        return tuple(t.view_as(t) for t in tensors)

    @staticmethod
    def backward(ctx, *grads):
        # every rank must join the same all-reduce, so a missing gradient is sent as zeros
        wide = torch.float32
        for _, dt in ctx.metas:
            wide = torch.promote_types(wide, dt)
        buf = torch.cat(
            [
                (g if g is not None else torch.zeros(s, device=ctx.device)).reshape(-1).to(wide)
                for g, (s, _) in zip(grads, ctx.metas, strict=True)
            ]
        )
        _collective("all_reduce", dist.all_reduce, buf, group=ctx.group)
        out, i = [], 0
        for s, dt in ctx.metas:
            out.append(buf[i : i + s.numel()].view(s).to(dt))
            i += s.numel()
        return (None, *out)


class _GatherTokens(torch.autograd.Function):
    """All-gather rows (tokens) from every rank forward; reduce-scatter(sum) of their gradient backward."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group, P = group, _group_size(group)
        out = x.new_empty((P * x.shape[0], *x.shape[1:]))
        _collective("all_gather", dist.all_gather_single, out, x.contiguous(), group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        P = _group_size(ctx.group)
        out = grad.new_empty((grad.shape[0] // P, *grad.shape[1:]))
        _collective("reduce_scatter", dist.reduce_scatter_single, out, grad.contiguous(), group=ctx.group)
        return out, None


class _ScatterTokens(torch.autograd.Function):
    """Reduce-scatter(sum) rows forward (rank r keeps block r); all-gather of the gradient backward."""

    @staticmethod
    def forward(ctx, y, group):
        ctx.group, P = group, _group_size(group)
        out = y.new_empty((y.shape[0] // P, *y.shape[1:]))
        _collective("reduce_scatter", dist.reduce_scatter_single, out, y.contiguous(), group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        P = _group_size(ctx.group)
        out = grad.new_empty((P * grad.shape[0], *grad.shape[1:]))
        _collective("all_gather", dist.all_gather_single, out, grad.contiguous(), group=ctx.group)
        return out, None


class _ScaleGrad(torch.autograd.Function):
    """Identity forward; multiplies the gradient by ``scale`` backward."""

    @staticmethod
    def forward(ctx, t, scale):
        ctx.scale = scale
        return t.view_as(t)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.scale, None


# ------------------------------------------------------------------ the sharded mix
def sharded_expert_mix(x, u, v, idx, g, start, activation="gelu", gate=None, group=None, sparse_grad=False):
    """This rank's share of ``y = sum_j g_j act(u_{i_j} . x) v_{i_j}`` (eqs. 3, 6, 7), steps 2-5.

    x [T, d]; u, v, gate: this rank's rows [R, d], global rows [start, start+R); idx, g [T, m]
    (global expert ids). Pre-activations are all-reduced over ``group`` (step 3); the returned
    y_partial [T, d] still has to be summed over the group. Only owned (t, j) pairs are computed.
    ``sparse_grad``: the tables get sparse COO row gradients (for peer.train.sparse_optim).
    """
    T, m = idx.shape
    own = (idx >= start) & (idx < start + u.shape[0])
    t_sel, j_sel = own.nonzero(as_tuple=True)
    rows = idx[t_sel, j_sel] - start
    xs = x[t_sel]  # [n_own, d]
    pre = [(F.embedding(rows, u, sparse=sparse_grad).to(x.dtype) * xs).sum(-1)]  # u_i . x (eq. 6)
    if gate is not None:
        pre.append((F.embedding(rows, gate, sparse=sparse_grad).to(x.dtype) * xs).sum(-1))
    h = x.new_zeros(T, m, len(pre)).index_put((t_sel, j_sel), torch.stack(pre, -1))
    if group is not None and _group_size(group) > 1:
        h = _SumReduce.apply(h, group)  # step 3: [T, m] (x2 with GLU) numbers per token
    act = _ACT[activation]
    a = act(h[..., 1]) * h[..., 0] if gate is not None else act(h[..., 0])
    w = (g * a)[t_sel, j_sel]  # g_j act(h_j), owned pairs only
    ve = F.embedding(rows, v, sparse=sparse_grad).to(x.dtype)
    return x.new_zeros(T, x.shape[1]).index_add(0, t_sel, w[:, None] * ve)


# ------------------------------------------------------------------ the layer
class ExpertShardedPEER(PEER):
    """A :class:`PEER` that holds rows [shard_start, shard_end) of its expert tables (this rank's share
    of an expert-parallel group) and mixes with :func:`sharded_expert_mix`; see the module docstring.

    Its constructor takes PEER's arguments plus the process ``group`` and ``data_parallel``; the row
    range follows from the group (:func:`shard_bounds`), and the rows are initialised as the full
    layer's (every rank draws the whole tables in chunks and keeps its rows). :func:`shard_peer_layer`
    makes one from an existing full layer. Parameter names equal the full layer's, so a full state dict
    maps onto it row-wise. Retrieval (eqs. 1, 2, 4, 5) and usage accounting are PEER's own, on the
    replicated query network, norm and keys.
    """

    def __init__(self, *, num_experts: int, group=None, data_parallel: bool = False, **peer_kwargs):
        if peer_kwargs.get("backend") == "triton":
            raise ValueError(
                "an expert-sharded PEER mixes with PyTorch gathers; backend='triton' has no sharded "
                "kernel (use 'auto', 'fused' or 'reference': they choose the retrieval's top-k)"
            )
        ep_size = _group_size(group)
        ep_rank = dist.get_rank(group) if dist.is_initialized() else 0
        super().__init__(num_experts=num_experts, rows=shard_bounds(num_experts, ep_size, ep_rank), **peer_kwargs)
        self.group, self.data_parallel = group, bool(data_parallel)
        self.ep_size, self.ep_rank = ep_size, ep_rank

    @property
    def shard_start(self) -> int:
        return self.rows[0]

    @property
    def shard_end(self) -> int:
        return self.rows[1]

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, num_experts={self.num_experts}, heads={self.heads}, topk={self.topk}, "
            f"rows=[{self.shard_start}, {self.shard_end}) of rank {self.ep_rank}/{self.ep_size}, "
            f"data_parallel={self.data_parallel}"
        )

    def forward_with_aux(self, x: torch.Tensor) -> tuple[torch.Tensor, None]:
        lead = x.shape[:-1]
        xf = self._flat(x)
        multi = self.ep_size > 1
        if multi and self.data_parallel:
            xf = _GatherTokens.apply(xf, self.group)  # step 0: every rank's tokens
        g, idx = self._retrieve(xf)  # step 1, [T, h, k]
        if self.record_usage:
            self._accumulate_usage(g, idx)
        g, idx = g.flatten(1).to(xf.dtype), idx.flatten(1)
        tables = [self.u, self.v, self.gate]
        if multi and self.data_parallel:
            tables = [t if t is None else _ScaleGrad.apply(t, 1.0 / self.ep_size) for t in tables]
        elif multi:
            xf, g = _CopyToGroup.apply(self.group, xf, g)  # backward: sum dx, dg over the group
        u, v, gate = tables
        y = sharded_expert_mix(xf, u, v, idx, g, self.shard_start, self.activation, gate, self.group, self.sparse_grad)
        if multi:
            y = _ScatterTokens.apply(y, self.group) if self.data_parallel else _SumReduce.apply(y, self.group)
        return y.view(*lead, self.dim), None


def shard_peer_layer(layer: PEER, group=None, data_parallel: bool = False) -> ExpertShardedPEER:
    """Keep this rank's rows of ``layer``'s expert tables; the rest of the layer (query network, norm,
    keys) is shared with ``layer`` (the same Parameter and buffer objects, not copies). Draws no random
    numbers. All ranks of ``group`` must pass a layer with the same parameters (same seed, or a broadcast)."""
    if not isinstance(layer, PEER) or isinstance(layer, ExpertShardedPEER):
        raise ValueError(f"layer must be a full peer.layers.PEER, got {type(layer).__name__}")
    sharded = ExpertShardedPEER(group=group, data_parallel=data_parallel, device="meta", **layer.peer_kwargs())
    lo, hi = sharded.rows
    state = {
        name: (t.detach()[lo:hi].clone() if name in TABLES else t)
        for name, t in layer.state_dict(keep_vars=True).items()
    }
    sharded.load_state_dict(state, assign=True)
    for name in TABLES:  # assign wraps the row slices in Parameters: keep the full tables' requires_grad
        full, mine = getattr(layer, name), getattr(sharded, name)
        if full is not None:
            mine.requires_grad_(full.requires_grad)
    sharded.usage = torch.zeros(0, dtype=torch.float64, device=layer.u.device)
    sharded.train(layer.training)
    return sharded


def shard_model(model: nn.Module, group=None, data_parallel: bool = True) -> list[str]:
    """Replace every PEER submodule of ``model`` in place by its expert-sharded version; returns their names."""
    names = [n for n, m in model.named_modules() if isinstance(m, PEER) and not isinstance(m, ExpertShardedPEER)]
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, shard_peer_layer(getattr(parent, child), group, data_parallel))
    return names


def expert_shards(model: nn.Module) -> list[nn.Parameter]:
    """The row-sharded parameters of ``model``: the expert tables of its :class:`ExpertShardedPEER` layers."""
    return [p for m in model.modules() if isinstance(m, ExpertShardedPEER) for p in m.expert_parameters()]


# ------------------------------------------------------------------ export
def _gather_rows(local: torch.Tensor, num_rows: int, group, dst: int | None) -> torch.Tensor | None:
    P = _group_size(group)
    if P == 1:
        return local.detach().clone()
    size = -(-num_rows // P)
    pad = local.new_zeros((size, *local.shape[1:]))
    pad[: local.shape[0]] = local.detach()
    if dst is None:
        out = local.new_empty((P * size, *local.shape[1:]))
        _collective("all_gather", dist.all_gather_single, out, pad, group=group)
        return out[:num_rows]
    me = dist.get_rank(group)
    parts = [torch.empty_like(pad) for _ in range(P)] if me == dst else None
    _collective("gather", dist.gather, pad, parts, group_dst=dst, group=group)
    return torch.cat(parts)[:num_rows] if me == dst else None


def gather_full_state(layer: ExpertShardedPEER, dst: int | None = None) -> dict[str, torch.Tensor] | None:
    """The state dict of the equivalent full PEER (full tables), on every rank (``dst=None``) or on
    group rank ``dst`` only (the others get None). Collective: all ranks of the group must call it."""
    state = {k: t.detach().clone() for k, t in layer.state_dict().items() if k not in TABLES}
    for name in TABLES:
        t = getattr(layer, name)
        if t is not None:
            state[name] = _gather_rows(t, layer.num_experts, layer.group, dst)
    if dst is not None and dist.is_initialized() and dist.get_rank(layer.group) != dst and layer.ep_size > 1:
        return None
    return state


def unshard_peer_layer(layer: ExpertShardedPEER) -> PEER:
    """A full :class:`PEER` with the sharded layer's parameters (gathered on every rank)."""
    full = PEER(**layer.peer_kwargs())
    full.load_state_dict(gather_full_state(layer))
    full.train(layer.training)
    return full
