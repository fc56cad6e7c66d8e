"""Parameter and FLOP accounting for :class:`peer.model.PeerLM`, per module, computed from the config.

Everything is analytic (a 1M-expert config is never built); tests check it against built models
(``sum(p.numel())``) and against ``torch.utils.flop_counter.FlopCounterMode``.

FLOPs: a multiply-add counts as 2 FLOPs; training = 3 x forward (backward = 2 x forward).
Per token, for model width d, vocabulary V, sequence length T, FFW width d_ff:

    embedding lookup                  0
    attention projections q,k,v,o     2 * 4 d^2
    attention scores + values         2 * 2 * T_ctx * d,  T_ctx = (T + 1) / 2, the average causal
                                      context of a full training sequence (token t sees t keys)
    dense FFW                         2 * 2 d d_ff (GELU)  or  2 * 3 d d_ff (SwiGLU)
    LM head                           2 d V
    RMSNorm, rotary, softmax, residual adds, activations: neglected.

Sparse layers (n = sqrt(N), h heads, k retrieved per head, key width d_key):

    PEER  query projection            2 d h d_key
          sub-key scores              2 h n d_key   (both halves: 2 * h * n * d_key/2 * 2)
          candidate sums              h k^2         (the k x k sums of eq. 5)
          experts                     h k * 2 * 2 d   (u_i . x and g act v_i; GLU: h k * 3 * 2 d)
    PKM   query, sub-key scores, candidates as PEER; value reads 2 d h k
    MoE   router 2 d E; experts m * (2 * 2 d d_ff) (SwiGLU: m * 2 * 3 d d_ff), where m = expert
          passes per token: token choice m = topk; expert choice m = capacity_factor * topk
          (each expert takes C = capacity_factor * T * topk / E tokens: c * topk * T token slots).
          Token-choice padding slots (capacity_factor > 1) and dropped tokens are not counted.
    Top-k selection (the two sub-key top-k's and the top-k over the k^2 candidates), softmax of
    the router scores and query normalisation are neglected.

Parameters: ``total`` counts every parameter once (a tied LM head adds 0). ``active`` counts the
parameters one token uses: everything dense (embedding table included), plus for
    PEER  query projection + query norm + all product sub-keys + h k (2 d) expert weights
          (h k (3 d) with GLU). The paper's P_active = (2 d + 1) h k counts a bias per expert;
          our experts have none, hence 2 d.
    PKM   query projection + query norm + all sub-keys + h k d value weights.
    MoE   router + m experts (m as above; rounded to an integer).

Placement and sharing: with ``sparse_placement="beside"`` a sparse block has both rows, its dense
FFW (``blocks.i.ffn``) and the sparse layer (``blocks.i.mem``), and pays both FLOPs. With
``share_experts`` the pool (PEER u, v, keys; PKM keys, values) is counted in the first sparse
block's row only: the others hold their query networks (their FLOPs are unchanged).

Note: ``peer.flops`` (the package attribute) is the function below; import this module's names
with ``from peer.flops import count_params, FlopReport``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .config import Config, ModelConfig

__all__ = [
    "ParamReport",
    "FlopReport",
    "count_params",
    "flops",
    "train_flops_per_step",
    "peer_layer",
    "pkm_layer",
    "moe_layer",
    "dense_ffn_layer",
]


# --------------------------------------------------------------------------------------
# Reports
# --------------------------------------------------------------------------------------
@dataclass
class ParamReport:
    """``total`` and ``active`` parameters; ``by_module`` maps name -> (total, active)."""

    total: int
    active: int
    by_module: dict[str, tuple[int, int]] = field(default_factory=dict)

    def table(self) -> str:
        rows = [(name, _n(t), _n(a)) for name, (t, a) in self.by_module.items()]
        return _format(("module", "params", "active"), rows, ("total", _n(self.total), _n(self.active)))


@dataclass
class FlopReport:
    """Forward and training FLOPs per token at ``seq_len``; ``by_module`` maps name -> forward FLOPs/token."""

    seq_len: int
    forward_per_token: float
    train_per_token: float
    by_module: dict[str, float] = field(default_factory=dict)
    params: ParamReport | None = None

    def table(self) -> str:
        p = self.params.by_module if self.params else {}
        names = list(dict.fromkeys([*p, *self.by_module]))
        rows = [
            (name, _n(p.get(name, (0, 0))[0]), _n(p.get(name, (0, 0))[1]), _f(self.by_module.get(name, 0.0)))
            for name in names
        ]
        tot, act = (self.params.total, self.params.active) if self.params else (0, 0)
        head = ("module", "params", "active", f"fwd FLOPs/token (T={self.seq_len})")
        text = _format(head, rows, ("total", _n(tot), _n(act), _f(self.forward_per_token)))
        return text + f"\ntraining FLOPs/token (3 x forward): {_f(self.train_per_token)}"


def _n(x: int) -> str:
    return f"{x:,}"


def _f(x: float) -> str:
    return f"{x:.4g}" if x < 1e4 else f"{x:.4e}"


def _format(head: tuple, rows: list[tuple], total: tuple) -> str:
    all_rows = [head, *rows, total]
    widths = [max(len(str(r[i])) for r in all_rows) for i in range(len(head))]

    def line(r: tuple) -> str:
        return "  ".join(
            str(c).ljust(w) if i == 0 else str(c).rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True))
        )

    rule = "-" * len(line(head))
    return "\n".join([line(head), rule, *map(line, rows), rule, line(total)])


# --------------------------------------------------------------------------------------
# Per-layer formulas: each returns (params total, params active, forward FLOPs per token)
# --------------------------------------------------------------------------------------
def _sqrt(n: int, name: str) -> int:
    from .layers.index import check_square

    return check_square(n, name)


def _norm_params(kind: str, heads: int, key_dim: int) -> int:
    """Affine parameters of the query norm (see peer.layers.router.make_query_norm)."""
    return {"batchnorm": 2 * heads * key_dim, "layernorm": 2 * key_dim, "none": 0}[kind]


def dense_ffn_layer(d: int, d_ff: int, activation: str = "gelu") -> tuple[int, int, float]:
    mats = 3 if activation == "swiglu" else 2
    return mats * d * d_ff, mats * d * d_ff, 2.0 * mats * d * d_ff


def peer_layer(d: int, p) -> tuple[int, int, float]:
    """PEER (paper eqs. 1-7) from a PEERConfig."""
    n = _sqrt(p.num_experts, "model.peer.num_experts")
    h, k, kd = p.heads, p.topk, p.key_dim
    query = d * h * kd + _norm_params(p.query_norm, h, kd)
    keys = (1 if p.shared_keys else h) * n * kd  # 2 halves x n sub-keys x kd/2
    per_expert = (3 if p.glu else 2) * d  # u_i, v_i (and the GLU gate)
    total = query + keys + p.num_experts * per_expert
    active = query + keys + h * k * per_expert
    fl = 2.0 * d * h * kd + 2.0 * h * n * kd + h * k * k + h * k * 2.0 * per_expert
    return total, active, fl


def pkm_layer(d: int, p) -> tuple[int, int, float]:
    """Product key memory (Lample et al. 2019) from a PKMConfig: keys per head, one value table."""
    n = _sqrt(p.num_memories, "model.pkm.num_memories")
    h, k, kd = p.heads, p.topk, p.key_dim
    query = d * h * kd + _norm_params(p.query_norm, h, kd)
    keys = h * n * kd
    total = query + keys + p.num_memories * d
    active = query + keys + h * k * d
    fl = 2.0 * d * h * kd + 2.0 * h * n * kd + h * k * k + 2.0 * d * h * k
    return total, active, fl


def moe_layer(d: int, d_ff: int, m) -> tuple[int, int, float]:
    """Mixture of E dense-sized experts from a MoEConfig (see the module docstring for m)."""
    expert_p, _, expert_fl = dense_ffn_layer(d, d_ff, getattr(m, "activation", "gelu"))
    passes = m.topk * (m.capacity_factor if m.routing == "expert_choice" else 1.0)
    router = d * m.num_experts
    total = router + m.num_experts * expert_p
    active = router + round(passes * expert_p)
    return total, active, 2.0 * router + passes * expert_fl


def _lora(cfg: ModelConfig, shapes: list[tuple[int, int]]) -> tuple[int, float]:
    """(params, forward FLOPs/token) of LoRA's factors A [r, in], B [out, r] on linear maps of ``shapes``."""
    n = sum(cfg.lora_rank * (i + o) for i, o in shapes)
    return n, 2.0 * n


def _ffn_layer(cfg: ModelConfig, block: int) -> tuple[int, int, float]:
    d = cfg.d_model
    if block not in cfg.sparse_block_ids() or cfg.sparse_placement == "beside":
        t, a, fl = dense_ffn_layer(d, cfg.ffn_dim, cfg.ffn_activation)
        h = cfg.ffn_dim
        n, lf = _lora(cfg, [(d, h), (h, d)] + ([(d, h)] if cfg.ffn_activation == "swiglu" else []))
        return t + n, a + n, fl + lf
    return _sparse_layer(cfg)


def _shared_pool(cfg: ModelConfig) -> tuple[int, int]:
    """(total, active) parameters of the pool that ``share_experts`` shares (counted once)."""
    d = cfg.d_model
    if cfg.sparse_layer == "peer":
        p = cfg.peer
        keys = (1 if p.shared_keys else p.heads) * _sqrt(p.num_experts, "model.peer.num_experts") * p.key_dim
        return keys + p.num_experts * (3 if p.glu else 2) * d, keys
    p = cfg.pkm
    keys = p.heads * _sqrt(p.num_memories, "model.pkm.num_memories") * p.key_dim
    return keys + p.num_memories * d, keys


def _sparse_layer(cfg: ModelConfig) -> tuple[int, int, float]:
    d = cfg.d_model
    if cfg.sparse_layer == "peer":
        return peer_layer(d, cfg.peer)
    if cfg.sparse_layer == "pkm":
        return pkm_layer(d, cfg.pkm)
    if cfg.sparse_layer == "moe":
        return moe_layer(d, cfg.ffn_dim, cfg.moe)
    raise ValueError(f"model.sparse_layer must be one of 'none', 'peer', 'pkm', 'moe', got {cfg.sparse_layer!r}")


# --------------------------------------------------------------------------------------
# Whole model
# --------------------------------------------------------------------------------------
def _model_config(model_or_cfg) -> ModelConfig:
    if isinstance(model_or_cfg, ModelConfig):
        return model_or_cfg
    if isinstance(model_or_cfg, Config):
        return model_or_cfg.model
    cfg = getattr(model_or_cfg, "config", None)
    if isinstance(cfg, ModelConfig):  # a PeerLM
        return cfg
    raise ValueError(f"model_or_cfg must be a PeerLM or a peer.config.ModelConfig, got {type(model_or_cfg).__name__}")


def _rows(cfg: ModelConfig, seq_len: int) -> dict[str, tuple[int, int, float]]:
    """name -> (params total, params active, forward FLOPs/token), in model order."""
    d, V, L = cfg.d_model, cfg.vocab_size, cfg.n_layers
    t_ctx = (seq_len + 1) / 2  # average causal context of a full sequence
    rows: dict[str, tuple[int, int, float]] = {"tok_emb": (V * d, V * d, 0.0)}
    sparse = cfg.sparse_block_ids()
    for i in range(L):
        n, lf = _lora(cfg, [(d, 3 * d), (d, d)])
        rows[f"blocks.{i}.attn"] = (4 * d * d + n, 4 * d * d + n, 2.0 * 4 * d * d + 2.0 * 2 * t_ctx * d + lf)
        rows[f"blocks.{i}.ffn"] = _ffn_layer(cfg, i)
        if i in sparse and cfg.sparse_placement == "beside":
            rows[f"blocks.{i}.mem"] = _sparse_layer(cfg)
        if cfg.share_experts and i in sparse and i != sparse[0]:
            name = f"blocks.{i}.{'mem' if cfg.sparse_placement == 'beside' else 'ffn'}"
            (t, a, fl), (pt, pa) = rows[name], _shared_pool(cfg)
            rows[name] = (t - pt, a - pa, fl)
    norms = (2 * L + 1) * d  # two RMSNorms per block and the final one
    rows["norms"] = (norms, norms, 0.0)
    head = 0 if cfg.tie_embeddings else V * d
    rows["lm_head"] = (head, head, 2.0 * d * V)
    return rows


def count_params(model_or_cfg) -> ParamReport:
    """Total and active parameters of a PeerLM (or of the model a ModelConfig describes)."""
    rows = _rows(_model_config(model_or_cfg), seq_len=1)
    by_module = {name: (t, a) for name, (t, a, _) in rows.items()}
    return ParamReport(
        total=sum(t for t, _ in by_module.values()), active=sum(a for _, a in by_module.values()), by_module=by_module
    )


def flops(model_or_cfg, seq_len: int) -> FlopReport:
    """Forward and training FLOPs per token of a PeerLM (or ModelConfig) on sequences of ``seq_len``."""
    cfg = _model_config(model_or_cfg)
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or not 0 < seq_len <= cfg.max_seq_len:
        raise ValueError(f"seq_len must be an integer in 1..model.max_seq_len={cfg.max_seq_len}, got {seq_len!r}")
    rows = _rows(cfg, seq_len)
    by_module = {name: fl for name, (_, _, fl) in rows.items()}
    fwd = sum(by_module.values())
    return FlopReport(
        seq_len=seq_len, forward_per_token=fwd, train_per_token=3.0 * fwd, by_module=by_module, params=count_params(cfg)
    )


def train_flops_per_step(cfg: Config, world_size: int = 1) -> float:
    """Training FLOPs of one optimizer step: per-token FLOPs x tokens per step (all ranks)."""
    if not isinstance(cfg, Config):
        raise ValueError(f"cfg must be a peer.config.Config, got {type(cfg).__name__}")
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size <= 0:
        raise ValueError(f"world_size must be a positive integer, got {world_size!r}")
    t = cfg.train
    return flops(cfg.model, t.seq_len).train_per_token * t.tokens_per_step * world_size
