"""The decoder-only language model: a pre-norm transformer whose FFW per block is chosen by config.

    x = tok_emb(idx)                                    (no position embedding: rotary in attention)
    for each block b:
        x = x + attn(RMSNorm(x))                        causal self-attention, rotary q/k, SDPA
        x = x + ffw_b(RMSNorm(x))                       DenseFFN, or PEER / PKM / MoE for b in
                                                        cfg.sparse_block_ids() (paper: the middle block)
        (cfg.sparse_placement="beside":  h = RMSNorm(x); x = x + DenseFFN(h) + sparse_b(h))
    logits = lm_head(RMSNorm(x))                        lm_head tied to tok_emb when cfg.tie_embeddings

Every FFW is a :class:`peer.layers.FeedForward` (the contract: peer.layers.base). Auxiliary losses
(one mechanism): ``ffw(h, return_aux=True)`` returns ``(y, aux)``, aux a weighted scalar or None (the
token-choice MoE's load-balancing loss), and the block returns it beside its output. The model sums them into ``LMOutput.aux_loss`` and adds that sum to the mean
cross-entropy in ``LMOutput.loss``; nothing is read off module attributes.

Rotary embeddings use the "rotate-half" convention (GPT-NeoX / Hugging Face Llama): the head
dimension is split into two halves (x1, x2) rotated as (x1 cos - x2 sin, x2 cos + x1 sin) with
frequency theta^(-2i/head_dim) for pair i.

Initialisation (GPT-2-like) of the backbone: every Linear and Embedding ~ N(0, s^2) with
s = ``cfg.init_std`` (0.02, GPT-2's), biases 0, RMSNorm weights 1; the residual output projections
(attention ``proj``, the dense FFW's output layer) ~ N(0, (s / sqrt(2 * n_layers))^2). Sparse layers (PEER / PKM / MoE) keep their own
documented init, with one exception: the PEER output table ``v`` and the PKM value table (the
sparse layers' residual outputs) are multiplied by 1 / sqrt(2 * n_layers), the same residual-branch
scaling GPT-2 applies to its output projections.

Shared pool (``cfg.share_experts``): every sparse block keeps its own query network (and norm)
but uses the first sparse block's expert tables and product keys (one Parameter object, counted
and stepped once; checkpoints store it once).

KV cache for generation: ``cache = model.new_kv_cache(batch, max_len)``; ``model(idx, kv_cache=cache)``
treats ``idx`` as the tokens at positions ``cache.length ..``, appends their keys/values and
advances ``cache.length``. Logits equal those of a full-sequence forward (eval mode).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig
from .errors import check_values
from .layers.base import FeedForward, SparseFeedForward
from .layers.dense import DenseFFN
from .layers.lora import LoRALinear, is_lora_param, linear, merged_weight
from .layers.moe import MoE
from .layers.peer import PEER
from .layers.pkm import PKM
from .memory import apply_memory_settings

__all__ = ["PeerLM", "LMOutput", "KVCache", "summed_nll", "merge_lora"]


@dataclass
class LMOutput:
    """logits [B, T, V]; loss = mean CE (ignore_index=-100) + aux_loss, None without targets;
    aux_loss = sum of the FFW modules' auxiliary losses (a zero scalar when none set one)."""

    logits: torch.Tensor
    loss: torch.Tensor | None
    aux_loss: torch.Tensor


class KVCache:
    """Per-layer key/value buffers ``[B, n_heads, max_len, head_dim]`` and ``length``, the positions filled."""

    def __init__(
        self,
        n_layers: int,
        batch_size: int,
        n_heads: int,
        max_len: int,
        head_dim: int,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        shape = (batch_size, n_heads, max_len, head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layers)]
        self.batch_size, self.max_len, self.n_heads, self.head_dim = batch_size, max_len, n_heads, head_dim
        self.length = 0

    def reset(self) -> None:
        self.length = 0


# --------------------------------------------------------------------------------------
# Building blocks
# --------------------------------------------------------------------------------------
def rotary_tables(max_len: int, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin tables [max_len, head_dim] (float32) for rotate-half rotary embeddings."""
    inv_freq = theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)  # [head_dim/2]
    angles = torch.arange(max_len, dtype=torch.float64)[:, None] * inv_freq[None, :]
    angles = torch.cat([angles, angles], dim=-1)  # [max_len, head_dim]
    return angles.cos().float(), angles.sin().float()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, H, T, hd]; cos, sin [T, hd] -> x rotated per position (rotate-half)."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return (x * cos + rotated * sin).to(x.dtype)


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention with rotary q/k, via ``F.scaled_dot_product_attention``."""

    def __init__(self, cfg: ModelConfig, layer_id: int) -> None:
        super().__init__()
        self.n_heads, self.head_dim, self.layer_id = cfg.n_heads, cfg.d_model // cfg.n_heads, layer_id
        self.qkv = linear(cfg.d_model, 3 * cfg.d_model, False, cfg.lora_rank, cfg.lora_alpha)
        self.proj = linear(cfg.d_model, cfg.d_model, False, cfg.lora_rank, cfg.lora_alpha)
        self.dropout = cfg.dropout
        self.resid_dropout = nn.Dropout(cfg.dropout)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: KVCache | None = None, start: int = 0
    ) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_heads, self.head_dim).transpose(1, 2) for t in (q, k, v))  # [B, H, T, hd]
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        mask, causal = None, T > 1
        if cache is not None:
            cache.k[self.layer_id][:, :, start : start + T] = k
            cache.v[self.layer_id][:, :, start : start + T] = v
            k = cache.k[self.layer_id][:, :, : start + T].to(q.dtype)
            v = cache.v[self.layer_id][:, :, : start + T].to(q.dtype)
            if start > 0:  # new query i (position start+i) sees keys 0..start+i
                causal = False
                if T > 1:
                    mask = torch.ones(T, start + T, dtype=torch.bool, device=x.device).tril(diagonal=start)
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=causal, dropout_p=self.dropout if self.training else 0.0
        )
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        out: torch.Tensor = self.resid_dropout(self.proj(y))
        return out


def make_ffn(cfg: ModelConfig, block_id: int) -> FeedForward:
    """The FFW of block ``block_id``: the configured sparse layer for ``cfg.sparse_block_ids()`` (with
    ``sparse_placement="replace"``), else DenseFFN."""
    d = cfg.d_model
    if block_id not in cfg.sparse_block_ids() or cfg.sparse_placement == "beside":
        return DenseFFN(
            d, cfg.ffn_dim, activation=cfg.ffn_activation, lora_rank=cfg.lora_rank, lora_alpha=cfg.lora_alpha
        )
    return make_sparse(cfg)


def make_sparse(cfg: ModelConfig) -> SparseFeedForward:
    """The configured sparse layer (PEER / PKM / MoE)."""
    d = cfg.d_model
    if cfg.sparse_layer == "peer":
        return PEER(d, **vars(cfg.peer))
    if cfg.sparse_layer == "pkm":
        return PKM(d, **vars(cfg.pkm))
    if cfg.sparse_layer == "moe":
        return MoE(d, cfg.ffn_dim, **vars(cfg.moe))
    raise ValueError(f"model.sparse_layer must be one of 'none', 'peer', 'pkm', 'moe', got {cfg.sparse_layer!r}")


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then x + ffn(norm(x)) (+ mem(norm(x)) when a
    sparse layer sits beside the FFW)."""

    def __init__(self, cfg: ModelConfig, block_id: int) -> None:
        super().__init__()
        self.norm1 = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.attn = CausalSelfAttention(cfg, block_id)
        self.norm2 = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.ffn = make_ffn(cfg, block_id)
        beside = cfg.sparse_placement == "beside" and block_id in cfg.sparse_block_ids()
        self.mem = make_sparse(cfg) if beside else None
        self.ffn_dropout = nn.Dropout(cfg.dropout)

    @property
    def sparse(self) -> FeedForward:
        """The block's sparse layer (``mem`` beside the FFW, else the FFW itself)."""
        return self.mem if self.mem is not None else self.ffn

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: KVCache | None = None, start: int = 0
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        x = x + self.attn(self.norm1(x), cos, sin, cache, start)
        h = self.norm2(x)
        y, aux = self.ffn(h, return_aux=True)
        if self.mem is not None:
            m, aux = self.mem(h, return_aux=True)
            y = y + m
        x = x + self.ffn_dropout(y)
        return x, aux


# --------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------
class PeerLM(nn.Module):
    """Decoder-only LM; ``cfg.sparse_layer`` (PEER / PKM / MoE) replaces the FFW of ``cfg.sparse_block_ids()``."""

    rope_cos: torch.Tensor  # rotary tables [max_seq_len, head_dim] (non-persistent buffers)
    rope_sin: torch.Tensor

    def __init__(self, cfg: ModelConfig, device: torch.device | str | None = None) -> None:
        """``device="meta"`` builds the structure without memory or initialisation (torchtitan's order:
        meta -> shard (e.g. :func:`peer.distributed.shard_model`) -> ``to_empty(device=...)`` ->
        :meth:`init_weights`); any other device builds and initialises there."""
        super().__init__()
        if not isinstance(cfg, ModelConfig):
            raise ValueError(f"cfg must be a peer.config.ModelConfig, got {type(cfg).__name__}")
        if cfg.vocab_size <= 0:
            raise ValueError(
                f"model.vocab_size={cfg.vocab_size}: a model needs a vocabulary size "
                "(0 means the corpus tokenizer's; peer.train.with_corpus_vocab resolves it)"
            )
        if cfg.d_model % cfg.n_heads or (cfg.d_model // cfg.n_heads) % 2:
            raise ValueError(
                f"model.n_heads={cfg.n_heads} must divide model.d_model={cfg.d_model} "
                "into an even head dimension (rotary embeddings)"
            )
        self.config = cfg
        with torch.device(device) if device is not None else contextlib.nullcontext():
            self._build(cfg)
        self._init_weights()

    def _build(self, cfg: ModelConfig) -> None:
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.emb_dropout = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self._tie()
        cos, sin = self._rope_tables()
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    def _rope_tables(self) -> tuple[torch.Tensor, torch.Tensor]:
        cfg = self.config
        return rotary_tables(cfg.max_seq_len, cfg.d_model // cfg.n_heads, cfg.rope_theta)

    def _tie(self) -> None:
        """The parameters one object serves twice: a shared expert pool, tied embeddings. (``to_empty``
        gives each use its own tensor; :meth:`init_weights` ties them again.)"""
        if self.config.share_experts:
            _share_pool(list(self.sparse_layers().values()))
        if self.config.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight

    # ------------------------------------------------------------------ init
    @torch.no_grad()
    def init_weights(self) -> None:
        """Initialise every parameter and buffer again exactly as the constructor did: each module's
        ``reset_parameters`` in construction order (the same draws from the default generator), a
        shared expert pool drawn for each layer but kept from the first, then the backbone init. So
        ``torch.manual_seed(s)``; ``PeerLM(cfg, device="meta")``; ``to_empty(device="cpu")``;
        ``init_weights()`` equals ``torch.manual_seed(s)``; ``PeerLM(cfg)`` (tested), expert-sharded
        layers included (each rank keeps its rows of the same tables)."""
        self._tie()
        pool_owner = next(iter(self.sparse_layers().values()), None) if self.config.share_experts else None
        _reset_in_order(self, pool_owner)
        self._init_weights()
        cos, sin = self._rope_tables()
        self.rope_cos.copy_(cos)
        self.rope_sin.copy_(sin)

    @torch.no_grad()
    def _init_weights(self) -> None:
        """GPT-2-like backbone init; sparse layers keep theirs, output tables scaled (see module docstring)."""
        scale = 1.0 / math.sqrt(2 * self.config.n_layers)
        std = self.config.init_std
        for block in self.blocks:
            if isinstance(block.ffn, DenseFFN):
                for m in block.ffn.modules():
                    _init_gpt2(m, std)
        blocks = cast("list[Block]", list(self.blocks))
        for m in (self.tok_emb, self.lm_head, *(b.attn for b in blocks)):
            for mm in m.modules():
                _init_gpt2(mm, std)
        scaled: set[int] = set()  # a shared pool's table is scaled once
        for block in blocks:
            nn.init.normal_(block.attn.proj.weight, std=std * scale)
            if isinstance(block.ffn, DenseFFN):
                nn.init.normal_(block.ffn.w2.weight, std=std * scale)
            if isinstance(block.sparse, SparseFeedForward):
                table = block.sparse.residual_table()
                if table is not None and id(table) not in scaled:
                    scaled.add(id(table))
                    table.mul_(scale)

    # ------------------------------------------------------------------ API
    def sparse_layers(self) -> dict[str, SparseFeedForward]:
        """name (as in ``named_modules``) -> PEER / PKM / MoE module, for the blocks in ``cfg.sparse_block_ids()``."""
        where = "mem" if self.config.sparse_placement == "beside" else "ffn"
        layers = {f"blocks.{i}.{where}": self.blocks[i].sparse for i in self.config.sparse_block_ids()}
        assert all(isinstance(m, SparseFeedForward) for m in layers.values())
        return layers  # type: ignore[return-value]

    def noncausal_layers(self) -> list[str]:
        """Names of the feed-forward layers whose evaluation output is not causal (see
        :meth:`FeedForward.causal`): empty when this model's perplexity is a causal LM perplexity."""
        return [n for n, m in self.named_modules() if isinstance(m, FeedForward) and not m.causal()]

    def new_kv_cache(
        self,
        batch_size: int,
        max_len: int | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> KVCache:
        """An empty KV cache for ``batch_size`` sequences of up to ``max_len`` (<= max_seq_len) positions."""
        cfg = self.config
        max_len = cfg.max_seq_len if max_len is None else max_len
        if not isinstance(batch_size, int) or batch_size <= 0:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        if not isinstance(max_len, int) or not 0 < max_len <= cfg.max_seq_len:
            raise ValueError(f"max_len must be an integer in 1..model.max_seq_len={cfg.max_seq_len}, got {max_len!r}")
        ref = self.tok_emb.weight
        return KVCache(
            cfg.n_layers,
            batch_size,
            cfg.n_heads,
            max_len,
            cfg.d_model // cfg.n_heads,
            device=device or ref.device,
            dtype=dtype or ref.dtype,
        )

    def forward(
        self, idx: torch.Tensor, targets: torch.Tensor | None = None, kv_cache: KVCache | None = None
    ) -> LMOutput:
        """idx [B, T] token ids -> LMOutput; with ``kv_cache`` the tokens continue the cached positions."""
        B, T = self._check_inputs(idx, targets, kv_cache)
        start = kv_cache.length if kv_cache is not None else 0
        cos, sin = self.rope_cos[start : start + T], self.rope_sin[start : start + T]
        x = self.emb_dropout(self.tok_emb(idx))
        aux_loss = torch.zeros((), device=idx.device)
        for block in self.blocks:
            x, aux = block(x, cos, sin, kv_cache, start)
            if aux is not None:
                aux_loss = aux_loss + aux
        if kv_cache is not None:
            kv_cache.length = start + T
        logits = self.lm_head(self.norm(x))
        loss = None
        if targets is not None:
            ce = F.cross_entropy(logits.float().view(B * T, -1), targets.reshape(B * T), ignore_index=-100)
            loss = ce + aux_loss
        return LMOutput(logits=logits, loss=loss, aux_loss=aux_loss)

    def _check_inputs(
        self, idx: torch.Tensor, targets: torch.Tensor | None, kv_cache: KVCache | None
    ) -> tuple[int, int]:
        cfg = self.config
        if not isinstance(idx, torch.Tensor) or idx.dim() != 2:
            shape = tuple(idx.shape) if isinstance(idx, torch.Tensor) else type(idx).__name__
            raise ValueError(f"idx must be a 2-D [batch, seq] tensor of token ids, got {shape}")
        if idx.dtype != torch.long:
            raise ValueError(f"idx must have dtype torch.long (int64), got {idx.dtype}")
        B, T = idx.shape
        if T == 0 or B == 0:
            raise ValueError(f"idx must be non-empty, got shape {tuple(idx.shape)}")
        if not torch.compiler.is_compiling():  # no host sync: see peer.errors.check_values
            lo, hi = torch.aminmax(idx)
            check_values(
                (lo >= 0) & (hi < cfg.vocab_size),
                f"idx holds token ids outside 0..vocab_size-1={cfg.vocab_size - 1}",
                lambda: f" (min {int(lo)}, max {int(hi)})",
            )
        if kv_cache is None:
            if T > cfg.max_seq_len:
                raise ValueError(f"idx has {T} positions, more than model.max_seq_len={cfg.max_seq_len}")
        else:
            if (
                not isinstance(kv_cache, KVCache)
                or len(kv_cache.k) != cfg.n_layers
                or kv_cache.n_heads != cfg.n_heads
                or kv_cache.head_dim != cfg.d_model // cfg.n_heads
            ):
                raise ValueError("kv_cache must come from this model's new_kv_cache()")
            if kv_cache.batch_size != B:
                raise ValueError(f"kv_cache was made for batch size {kv_cache.batch_size}, idx has batch {B}")
            if kv_cache.length + T > kv_cache.max_len:
                raise ValueError(
                    f"kv_cache holds {kv_cache.length} of max_len={kv_cache.max_len} positions; {T} more do not fit"
                )
        if targets is not None:
            if not isinstance(targets, torch.Tensor) or targets.shape != idx.shape or targets.dtype != torch.long:
                got = (
                    (tuple(targets.shape), targets.dtype)
                    if isinstance(targets, torch.Tensor)
                    else type(targets).__name__
                )
                raise ValueError(f"targets must be a torch.long tensor shaped like idx {tuple(idx.shape)}, got {got}")
        return B, T


@torch.no_grad()
def merge_lora(model: PeerLM) -> PeerLM:
    """The same function without LoRA: a PeerLM with ``lora_rank=0`` whose linear maps are
    ``W0 + (alpha / r) B A`` (:func:`peer.layers.lora.merged_weight`); ``model`` itself if it has no LoRA."""
    cfg = model.config
    if not cfg.lora_rank:
        return model
    ref = next(model.parameters())
    out = PeerLM(replace(cfg, lora_rank=0, lora_alpha=0.0)).to(device=ref.device, dtype=ref.dtype)
    state = {k: v for k, v in model.state_dict().items() if not is_lora_param(k)}
    for name, m in model.named_modules():
        if isinstance(m, LoRALinear):
            state[f"{name}.weight"] = merged_weight(m)
    out.load_state_dict(state, strict=True)
    return out.train(model.training)


# --------------------------------------------------------------------------------------
# Init helpers
# --------------------------------------------------------------------------------------
def _init_gpt2(m: nn.Module, std: float) -> None:
    if isinstance(m, (nn.Linear, LoRALinear)):  # LoRA's factors keep their own init (B = 0: no change)
        nn.init.normal_(m.weight, std=std)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.Embedding):
        nn.init.normal_(m.weight, std=std)


def _reset_in_order(module: nn.Module, pool_owner: nn.Module | None) -> None:
    """Call ``reset_parameters`` of the modules under ``module`` in registration (= construction) order;
    a module that has one initialises its whole subtree. Sparse layers after ``pool_owner`` (a shared
    pool) draw their pool without writing it, as their constructors' draws were discarded."""
    for child in module.children():
        if isinstance(child, SparseFeedForward):
            child.reset_parameters(pool=pool_owner is None or child is pool_owner)
        elif isinstance(child, FeedForward) or next(child.parameters(recurse=False), None) is not None:
            child.reset_parameters()  # type: ignore[operator]  # torch's modules that own parameters (Linear, Embedding, RMSNorm) have one
        else:
            _reset_in_order(child, pool_owner)


def _share_pool(layers: list[SparseFeedForward]) -> None:
    """Point every layer's expert tables and product keys at the first layer's (see module docstring)."""
    for layer in layers[1:]:
        layer.share_pool(layers[0])


@torch.no_grad()
def summed_nll(
    model: nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    device: torch.device | str = "cpu",
    autocast: Callable[[], contextlib.AbstractContextManager[Any]] = contextlib.nullcontext,
) -> tuple[float, int, int]:
    """Summed next-token cross-entropy over ``(x, y)`` batches in eval mode, softmax in float32:
    ``(nll, targets, windows)``. The one evaluation loss: the training loop's ``val_loss`` and
    ``peer eval``'s perplexities both come from here. ``autocast``: a context factory (bf16 runs).
    Its per-batch logits (~67 MB at 2048 tokens and 8192 words) reuse mapped pages
    (:func:`peer.memory.apply_memory_settings`, applied here too for programs that evaluate without the
    command line or training: 2x faster on the CPU, same numbers; docs/benchmarks.md)."""
    apply_memory_settings()
    was_training = model.training
    model.eval()
    nll, count, windows = 0.0, 0, 0
    try:
        for x, y in batches:
            with autocast():
                logits = model(x.to(device)).logits
            nll += float(F.cross_entropy(logits.float().flatten(0, 1), y.to(device).flatten(), reduction="sum"))
            count, windows = count + y.numel(), windows + y.shape[0]
    finally:
        model.train(was_training)
    return nll, count, windows
