"""One dataclass tree for every setting: TOML in, ``--set key=value`` overrides, validation.

    cfg = load_config("configs/peer.toml", overrides=["train.flops=3e13", "model.d_model=256"])

Every field is validated on load; an error names the dotted field and the allowed values.

The conversion from TOML / ``--set`` values to the annotated types (:func:`_coerce`, ~60 lines) is
kept by hand after trying cattrs and pydantic on the same dataclasses: cattrs turns ``"false"`` into
True and ignores unknown keys by default, pydantic needs a compiled dependency, and both reject
``1e4`` for an integer (``--set train.steps=1e4``) and would need hooks for the CLI's strings anyway.
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

from .errors import PeerError

__all__ = [
    "ConfigError",
    "PEERConfig",
    "PKMConfig",
    "MoEConfig",
    "ModelConfig",
    "DataConfig",
    "OptimConfig",
    "TrainConfig",
    "DistConfig",
    "Config",
    "load_config",
    "config_from_dict",
    "config_to_dict",
    "apply_overrides",
    "validate",
    "read_toml",
    "find_preset",
    "PRESETS_DIR",
]


class ConfigError(PeerError, ValueError):
    """A configuration field has a bad value; the message names the dotted field."""


# --------------------------------------------------------------------------------------
# Layers
# --------------------------------------------------------------------------------------
@dataclass
class PEERConfig:
    """The PEER layer (paper §2). Defaults are the paper's: N=1024^2, h=8, k=16."""

    num_experts: int = 1024**2
    heads: int = 8
    topk: int = 16
    key_dim: int = 128
    activation: Literal["gelu", "relu"] = "gelu"
    score: Literal["softmax", "sigmoid", "relu"] = "softmax"
    query_norm: Literal["batchnorm", "layernorm", "none"] = "batchnorm"
    shared_keys: bool = True
    glu: bool = False
    backend: Literal["auto", "reference", "fused", "triton"] = "auto"
    table_dtype: Literal["float32", "bfloat16"] = "float32"
    value_init_scale: float = 1.0  # multiplies the init std of v (1: output std ~1 before the model's 1/sqrt(2L))


@dataclass
class PKMConfig:
    """Product key memory (Lample et al. 2019) as the paper's baseline: 1024^2 memories, h=8, k=32."""

    num_memories: int = 1024**2
    heads: int = 8
    topk: int = 32
    key_dim: int = 256
    query_norm: Literal["batchnorm", "layernorm", "none"] = "batchnorm"
    value_init_scale: float = 1.0  # multiplies the init std of the value table (PEER's lever, for equal tuning)


@dataclass
class MoEConfig:
    """Mixture of experts, each the size of the dense FFW. Paper: expert choice, 128 experts."""

    num_experts: int = 128
    routing: Literal["expert_choice", "token_choice", "dropless"] = "expert_choice"  # only dropless is causal
    topk: int = 1  # experts per token (token choice); expert choice uses capacity_factor
    capacity_factor: float = 1.0
    aux_loss_weight: float = 0.01  # load-balancing loss weight (token choice)


@dataclass
class ModelConfig:
    """Decoder-only transformer. ``sparse_layer`` replaces the FFW of ``sparse_blocks``."""

    vocab_size: int = 8192  # 0: the size of the corpus's tokenizer (resolved when a run starts)
    d_model: int = 256
    n_layers: int = 4
    n_heads: int = 4
    d_ff: int = 0  # 0 -> 4 * d_model
    ffn_activation: Literal["gelu", "swiglu"] = "gelu"
    max_seq_len: int = 256
    tie_embeddings: bool = True
    rope_theta: float = 10000.0
    norm_eps: float = 1e-6
    dropout: float = 0.0
    init_std: float = 0.02  # backbone init N(0, init_std^2) (GPT-2: 0.02); residual outputs / sqrt(2 n_layers)
    sparse_layer: Literal["none", "peer", "pkm", "moe"] = "none"
    # "middle" (the paper), "all", "every:K" (blocks K-1, 2K-1, ...), or a list of block indices
    sparse_blocks: str | list[int] = "middle"
    # "replace": the sparse layer is the block's FFW (paper); "beside": it runs next to the dense
    # FFW on the same normed input and the two outputs add (UltraMemV2, Kim & Jung 2020)
    sparse_placement: Literal["replace", "beside"] = "replace"
    # one expert pool (PEER u, v, product keys; PKM keys and values) shared by every sparse block,
    # each block keeping its own query network (Memory Layers at Scale); PEER and PKM only
    share_experts: bool = False
    peer: PEERConfig = field(default_factory=PEERConfig)
    pkm: PKMConfig = field(default_factory=PKMConfig)
    moe: MoEConfig = field(default_factory=MoEConfig)
    # LoRA (peer.layers.lora) on every block's attention and dense-FFW linear maps: rank r (0: none) and
    # alpha (the update is scaled by alpha / r; 0: alpha = r). Fine-tune with train.trainable="lora".
    lora_rank: int = 0
    lora_alpha: float = 0.0

    @property
    def ffn_dim(self) -> int:
        return self.d_ff or 4 * self.d_model

    def sparse_block_ids(self) -> list[int]:
        """The block indices whose FFW is the sparse layer (empty when ``sparse_layer='none'``)."""
        if self.sparse_layer == "none":
            return []
        if self.sparse_blocks == "middle":
            return [self.n_layers // 2]
        if self.sparse_blocks == "all":
            return list(range(self.n_layers))
        if isinstance(self.sparse_blocks, str) and self.sparse_blocks.startswith("every:"):
            k = int(self.sparse_blocks.split(":", 1)[1])
            return list(range(k - 1, self.n_layers, k))
        return sorted(set(int(i) for i in self.sparse_blocks))


# --------------------------------------------------------------------------------------
# Data, optimisation, training
# --------------------------------------------------------------------------------------
@dataclass
class DataConfig:
    """Where tokens come from. ``corpus`` is a prepared corpus directory (``peer data prepare``)."""

    corpus: str = "data/starter"
    train_split: str = "train"
    val_split: str = "val"
    tokenizer: str = ""  # path to a tokenizer.json; "" -> the corpus's own
    vocab_size: int = 8192


@dataclass
class OptimConfig:
    """AdamW with separate groups for expert tables, product keys and the dense backbone."""

    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 50
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0
    expert_lr_mult: float = 1.0  # u, v (and gates) of PEER; values of PKM
    # how the expert multiplier moves over the run: "constant", or from expert_lr_mult at the first
    # step to expert_lr_mult_final at the last ("linear" / "cosine"), on top of the base schedule
    expert_lr_mult_schedule: Literal["constant", "linear", "cosine"] = "constant"
    expert_lr_mult_final: float = 1.0
    expert_weight_decay: float = 0.0
    key_lr_mult: float = 1.0  # product sub-keys
    key_weight_decay: float = 0.0
    sparse_experts: bool = False  # row-wise (lazy) AdamW on the expert tables
    # the expert tables' optimizer: "adamw", or "sgd" (plain SGD, no momentum, no decay: an update
    # proportional to the gradient; sparse memory fine-tuning found it forgets less, arXiv:2510.15103)
    expert_optimizer: Literal["adamw", "sgd"] = "adamw"
    fused: bool = True


@dataclass
class TrainConfig:
    """The run. ``flops > 0`` sets ``steps`` from the FLOP budget (paper's isoFLOP protocol)."""

    out_dir: str = "runs/run"
    steps: int = 200
    flops: float = 0.0
    batch_size: int = 16
    grad_accum: int = 1
    seq_len: int = 128
    seed: int = 0
    threads: int = 0  # 0 -> leave torch's default
    dtype: Literal["float32", "bfloat16"] = "float32"
    device: str = "cpu"
    log_every: int = 10
    eval_every: int = 0
    eval_batches: int = 20
    ckpt_every: int = 100
    keep_last: int = 2
    progress: bool = True
    tensorboard: bool = True
    # fine-tuning: start from another run's (or checkpoint's) weights, with a fresh optimizer at step 0
    init_from: str = ""
    # "experts": train only the sparse layers' expert tables (PEER u/v/gate, PKM values), everything else
    # frozen; with optim.sparse_experts a step changes only the rows it retrieved (sparse memory fine-tuning)
    # "lora": train only the LoRA factors (model.lora_rank > 0), everything else frozen
    trainable: Literal["all", "experts", "lora"] = "all"
    # with trainable="experts": train only the expert_rows rows per layer that the training data retrieves
    # most above the background (TF-IDF of retrievals, peer.train.memory_rows); 0: every retrieved row.
    # background: a corpus whose train split is the background (e.g. the pre-training corpus; a seeded
    # sample of train.eval_batches batches of it)
    expert_rows: int = 0
    background: str = ""
    # when the expert_rows are chosen: "run" (once, over the first batches of the fine-tuning data, with
    # the starting weights) or "batch" (afresh for every training forward: the rows that batch retrieves
    # most above the background, Lin et al.'s sparse memory fine-tuning)
    row_selection: Literal["run", "batch"] = "run"

    @property
    def tokens_per_step(self) -> int:
        """Tokens of one optimizer step over all ranks: batch_size (global) x grad_accum x seq_len."""
        return self.batch_size * self.grad_accum * self.seq_len


@dataclass
class DistConfig:
    """torch.distributed settings (used under ``torchrun``)."""

    data_parallel: Literal["ddp", "fsdp"] = "ddp"
    expert_parallel: bool = False
    timeout_s: float = 300.0
    backend: Literal["auto", "gloo", "nccl"] = "auto"


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    dist: DistConfig = field(default_factory=DistConfig)


# --------------------------------------------------------------------------------------
# Loading, overrides, validation
# --------------------------------------------------------------------------------------
def _field_types(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _coerce(value: Any, tp: Any, name: str) -> Any:
    """Convert ``value`` (from TOML or a ``--set`` string) to the annotated type ``tp``."""
    origin = get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{name}: expected a table of settings, got {value!r}")
        return _from_dict(tp, value, name)
    if origin is Literal:
        allowed = get_args(tp)
        if value not in allowed:
            raise ConfigError(f"{name}: {value!r} is not allowed; allowed values: {', '.join(map(repr, allowed))}")
        return value
    if origin in (Union, types.UnionType):
        errors = []
        for arg in get_args(tp):
            try:
                return _coerce(value, arg, name)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{name}: {value!r} does not fit any of: " + "; ".join(errors))
    if origin is list:
        (inner,) = get_args(tp)
        if isinstance(value, str):
            value = [v for v in value.strip("[] ").split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{name}: expected a list, got {value!r}")
        return [_coerce(v, inner, f"{name}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on", "false", "0", "no", "off"):
            return value.lower() in ("true", "1", "yes", "on")
        raise ConfigError(f"{name}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{name}: expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                f = float(value.replace("_", ""))
            except ValueError:
                f = math.nan
            if f.is_integer():
                return int(f)
        raise ConfigError(f"{name}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{name}: expected a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{name}: expected a number, got {value!r}") from None
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{name}: expected a string, got {value!r}")
        return value
    return value


def _from_dict(cls, data: dict, prefix: str = ""):
    hints = _field_types(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        dotted = f"{prefix}.{key}" if prefix else key
        if key not in names:
            raise ConfigError(f"{dotted}: unknown setting; known settings here: {', '.join(sorted(names))}")
        kwargs[key] = _coerce(value, hints[key], dotted)
    return cls(**kwargs)


def config_from_dict(data: dict) -> Config:
    cfg = _from_dict(Config, data)
    validate(cfg)
    return cfg


def config_to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def apply_overrides(cfg: Config, overrides: list[str]) -> Config:
    """Apply ``section.key=value`` strings (nested: ``model.peer.topk=8``) to ``cfg``; returns a new, validated Config."""
    data = config_to_dict(cfg)
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected key=value, e.g. train.steps=100")
        key, value = item.split("=", 1)
        parts = key.strip().split(".")
        node = data
        for i, p in enumerate(parts):
            if not isinstance(node, dict) or p not in node:
                known = f"; known settings here: {', '.join(sorted(node))}" if isinstance(node, dict) else ""
                raise ConfigError(f"{'.'.join(parts[: i + 1])}: unknown setting{known}")
            if i < len(parts) - 1:
                node = node[p]
        node[parts[-1]] = _parse_scalar(value.strip())
    return config_from_dict(data)


def _parse_scalar(text: str) -> Any:
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


PRESETS_DIR = Path(__file__).resolve().parent / "configs"  # shipped in the wheel; ./configs links here in a checkout


def find_preset(path: str | Path) -> Path:
    """``path`` if it exists, else the shipped preset of that name: ``configs/peer.toml``,
    ``peer.toml`` or ``configs/recipe/x.toml`` resolve to the package's copy when the working
    directory has none (an installed wheel has no ``configs/`` folder)."""
    p = Path(path)
    if p.exists() or p.is_absolute():
        return p
    parts = p.parts[1:] if p.parts and p.parts[0] == "configs" else p.parts
    shipped = PRESETS_DIR.joinpath(*parts) if parts else PRESETS_DIR
    return shipped if shipped.is_file() else p


def read_toml(path: str | Path, kind: str = "config") -> dict:
    """Parse a TOML file (or the shipped preset of that name, see :func:`find_preset`); a missing or
    malformed file is a ConfigError naming it."""
    p = find_preset(path)
    if not p.is_file():
        raise ConfigError(f"{kind} file {str(p)!r} does not exist")
    try:
        return tomllib.loads(p.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{kind} file {str(p)!r} is not valid TOML: {e}") from None


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Read a TOML config (or start from defaults when ``path`` is None) and apply overrides."""
    data = read_toml(path) if path is not None else {}
    cfg = config_from_dict(data)
    return apply_overrides(cfg, overrides) if overrides else cfg


def _check(cond: bool, name: str, msg: str) -> None:
    if not cond:
        raise ConfigError(f"{name}: {msg}")


def _check_keys(num_keys: int, key_dim: int, topk: int, heads: int, prefix: str, keys_name: str) -> None:
    """The layers' own product-key check (peer.layers.index.check_product_keys), as a ConfigError."""
    from .layers.index import check_product_keys

    try:
        check_product_keys(num_keys, key_dim, topk, heads, prefix, keys_name)
    except ValueError as e:
        name, _, msg = str(e).partition(" must ")
        raise ConfigError(f"{name}: must {msg}") from None


def validate(cfg: Config) -> Config:
    """Cross-field checks; raises ConfigError naming the field."""
    m = cfg.model
    _check(
        m.vocab_size >= 0,
        "model.vocab_size",
        f"must be positive, or 0 for the corpus tokenizer's size, got {m.vocab_size}",
    )
    for name in ("d_model", "n_layers", "n_heads", "max_seq_len"):
        _check(getattr(m, name) > 0, f"model.{name}", f"must be positive, got {getattr(m, name)}")
    _check(m.d_ff >= 0, "model.d_ff", "must be >= 0 (0 means 4 * d_model)")
    _check(m.d_model % m.n_heads == 0, "model.n_heads", f"must divide model.d_model={m.d_model}, got {m.n_heads}")
    _check((m.d_model // m.n_heads) % 2 == 0, "model.n_heads", "d_model / n_heads must be even (rotary embeddings)")
    _check(0.0 <= m.dropout < 1.0, "model.dropout", "must be in [0, 1)")
    if isinstance(m.sparse_blocks, str):
        every = m.sparse_blocks.startswith("every:") and m.sparse_blocks[6:].isdigit() and int(m.sparse_blocks[6:]) > 0
        _check(
            m.sparse_blocks in ("middle", "all") or every,
            "model.sparse_blocks",
            f"'middle', 'all', 'every:K' (K >= 1) or a list of block indices, got {m.sparse_blocks!r}",
        )
        if every:
            _check(
                int(m.sparse_blocks[6:]) <= m.n_layers,
                "model.sparse_blocks",
                f"{m.sparse_blocks!r} selects no block of model.n_layers={m.n_layers}",
            )
    else:
        for i in m.sparse_blocks:
            _check(0 <= i < m.n_layers, "model.sparse_blocks", f"block {i} is outside 0..{m.n_layers - 1}")
    p = m.peer
    if m.sparse_layer == "peer":
        _check_keys(p.num_experts, p.key_dim, p.topk, p.heads, "model.peer.", "num_experts")
        _check(
            p.value_init_scale > 0 and math.isfinite(p.value_init_scale),
            "model.peer.value_init_scale",
            f"must be a positive number, got {p.value_init_scale}",
        )
    _check(
        m.init_std > 0 and math.isfinite(m.init_std), "model.init_std", f"must be a positive number, got {m.init_std}"
    )
    _check(m.lora_rank >= 0, "model.lora_rank", f"must be >= 0 (0: no LoRA), got {m.lora_rank}")
    _check(
        m.lora_alpha >= 0 and math.isfinite(m.lora_alpha),
        "model.lora_alpha",
        f"must be a finite number >= 0 (0: = model.lora_rank), got {m.lora_alpha}",
    )
    k = m.pkm
    if m.sparse_layer == "pkm":
        _check_keys(k.num_memories, k.key_dim, k.topk, k.heads, "model.pkm.", "num_memories")
        _check(
            k.value_init_scale > 0 and math.isfinite(k.value_init_scale),
            "model.pkm.value_init_scale",
            f"must be a positive number, got {k.value_init_scale}",
        )
    if m.share_experts:
        _check(
            m.sparse_layer in ("peer", "pkm"),
            "model.share_experts",
            f"shares a PEER or PKM pool; model.sparse_layer is {m.sparse_layer!r}",
        )
    e = m.moe
    if m.sparse_layer == "moe":
        _check(e.num_experts > 0, "model.moe.num_experts", "must be positive")
        _check(0 < e.topk <= e.num_experts, "model.moe.topk", f"must be in 1..num_experts={e.num_experts}")
        _check(
            math.isfinite(e.capacity_factor) and e.capacity_factor > 0,
            "model.moe.capacity_factor",
            f"must be a positive number, got {e.capacity_factor}",
        )
    t = cfg.train
    _check(t.steps > 0 or t.flops > 0, "train.steps", "must be positive (or set train.flops)")
    _check(
        t.flops >= 0 and math.isfinite(t.flops),
        "train.flops",
        f"must be a finite number >= 0 (0: use train.steps), got {t.flops}",
    )
    for name in ("batch_size", "grad_accum", "seq_len", "log_every", "ckpt_every", "keep_last"):
        _check(getattr(t, name) > 0, f"train.{name}", f"must be positive, got {getattr(t, name)}")
    _check(
        t.seq_len <= m.max_seq_len, "train.seq_len", f"must be <= model.max_seq_len={m.max_seq_len}, got {t.seq_len}"
    )
    _check(t.threads >= 0, "train.threads", "must be >= 0")
    _check(t.expert_rows >= 0, "train.expert_rows", f"must be >= 0 (0: every retrieved row), got {t.expert_rows}")
    _check(
        t.expert_rows == 0 or (t.trainable == "experts" and bool(t.background) and cfg.optim.sparse_experts),
        "train.expert_rows",
        "needs train.trainable='experts', train.background (a corpus) and optim.sparse_experts=true",
    )
    _check(
        t.row_selection == "run" or t.expert_rows > 0,
        "train.row_selection",
        "'batch' chooses train.expert_rows rows per batch: set train.expert_rows (e.g. 500)",
    )
    _check(
        t.trainable != "experts" or m.sparse_layer in ("peer", "pkm"),
        "train.trainable",
        f"'experts' needs a layer with expert tables (model.sparse_layer 'peer' or 'pkm'), got {m.sparse_layer!r}",
    )
    _check(
        t.trainable != "lora" or m.lora_rank > 0,
        "train.trainable",
        "'lora' needs LoRA factors to train: set model.lora_rank (e.g. 8)",
    )
    o = cfg.optim
    _check(math.isfinite(o.lr) and o.lr > 0, "optim.lr", f"must be a positive number, got {o.lr}")
    _check(0 <= o.min_lr_ratio <= 1, "optim.min_lr_ratio", "must be in [0, 1]")
    _check(o.warmup_steps >= 0, "optim.warmup_steps", "must be >= 0")
    _check(0 <= o.beta1 < 1, "optim.beta1", "must be in [0, 1)")
    _check(0 <= o.beta2 < 1, "optim.beta2", "must be in [0, 1)")
    _check(o.grad_clip >= 0, "optim.grad_clip", "must be >= 0 (0 disables clipping)")
    for name in ("expert_lr_mult", "expert_lr_mult_final", "key_lr_mult"):
        v = getattr(o, name)
        _check(v >= 0 and math.isfinite(v), f"optim.{name}", f"must be a number >= 0 (0 freezes the group), got {v}")
    for name in ("weight_decay", "expert_weight_decay", "key_weight_decay"):
        v = getattr(o, name)
        _check(v >= 0 and math.isfinite(v), f"optim.{name}", f"must be >= 0, got {v}")
    _check(
        o.expert_optimizer == "adamw" or o.expert_weight_decay == 0,
        "optim.expert_weight_decay",
        f"must be 0 with optim.expert_optimizer='sgd' (plain SGD has no decay), got {o.expert_weight_decay}",
    )
    _check(cfg.data.vocab_size > 0, "data.vocab_size", "must be positive")
    for name in ("train_split", "val_split"):  # held-out test splits: never trained or chosen on
        _check(
            not getattr(cfg.data, name).startswith("test_"),
            f"data.{name}",
            f"must not be a held-out test_* split (read those with `peer eval --test`), got {getattr(cfg.data, name)!r}",
        )
    _check(
        math.isfinite(cfg.dist.timeout_s) and cfg.dist.timeout_s > 0,
        "dist.timeout_s",
        f"must be a positive number, got {cfg.dist.timeout_s}",
    )
    return cfg
