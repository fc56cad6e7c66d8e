"""The training loop: ``train(cfg, resume=False) -> run_dir`` and ``load_run(path) -> (model, cfg, meta)``.

Run directory (``cfg.train.out_dir``)::

    config.toml                       the resolved config (train.steps set from the FLOP budget)
    metrics.jsonl                     one JSON object per logged step: step, loss, lr, tokens, flops,
                                      tokens_per_s, grad_norm (+ aux_loss, val_loss when present)
    tb/                               TensorBoard events (train.tensorboard)
    checkpoints/step_XXXXXXX/         see peer.train.checkpoint

One step (``s`` = updates done so far, 0-based): set lr(s) on every group (warmup + cosine), run
``grad_accum`` micro-batches (loss / grad_accum, backward), clip the global grad norm, AdamW step.
``loss`` in the metrics is the mean cross-entropy of the step's micro-batches (``aux_loss``, when a
layer has one, is logged apart; the optimised objective is their sum).

Exact resume: a checkpoint holds the weights, optimizer moments, global RNG states and the
Batcher's position, so ``--resume`` replays the same batches and random draws as an uninterrupted
run, bit for bit (tested for a dense model with dropout and grad accumulation, PEER with BatchNorm
queries, and PEER with the row-wise expert optimizer). Resuming with a changed config is an error,
except for the fields in ``RESUME_MAY_CHANGE`` (length of the run and bookkeeping).

No host sync per step: a step's loss, auxiliary loss and gradient norm stay on the device and are
read together when a metrics line is due (every ``train.log_every`` steps) and before an
evaluation or a checkpoint (:class:`~peer.train.parts.StepLog`), so a GPU's launch queue never
drains mid-run. (Training data is checked where it enters: token ids against the vocabulary when
a split is opened.)

Divergence: a NaN/inf loss or gradient norm stops the run at the next read, at the latest before
the next checkpoint (:class:`TrainingDiverged` names the first bad step and the last good
checkpoint); with ``train.log_every=1`` that is before the next step. Weights are checked for
NaN/inf before every checkpoint, so no checkpoint ever holds them.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import random
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from tomli_w import dumps as toml_dumps

from ..config import Config, ConfigError, config_from_dict, config_to_dict
from ..distributed import data_parallel as dpar
from ..fsutil import FolderLock, atomic_copy, atomic_write_text
from ..memory import available_bytes, retain_freed_memory
from ..model import PeerLM, summed_nll
from .checkpoint import (
    CheckpointError,
    clean_partial,
    latest_checkpoint,
    list_checkpoints,
    load_model_weights,
    load_state,
    read_meta,
    resolve_checkpoint,
    restore_rng,
    verify_checksums,
)
from .optim import build_optimizer, clip_grad_norm
from .parts import Saver, StepLog, TrainingDiverged, scalar_dtype
from .schedule import Schedule
from .signals import Interrupted, StopOnSignal

__all__ = [
    "train",
    "train_or_resume",
    "check_device",
    "load_run",
    "resolve_steps",
    "check_resume_config",
    "evaluate_loss",
    "TrainingDiverged",
    "RESUME_MAY_CHANGE",
]

log = logging.getLogger("peer.train")

# config fields that may differ between a run and its resumption: they change neither the model
# nor the trajectory of a step (train.steps/flops lengthen or shorten the run and so the cosine tail)
RESUME_MAY_CHANGE = frozenset(
    {
        "train.steps",
        "train.flops",
        "train.out_dir",
        "train.progress",
        "train.tensorboard",
        "train.log_every",
        "train.eval_every",
        "train.eval_batches",
        "train.ckpt_every",
        "train.keep_last",
    }
)


# --------------------------------------------------------------------------------------
# Config helpers
# --------------------------------------------------------------------------------------
def resolve_steps(cfg: Config) -> int:
    """``train.steps``, or ``floor(train.flops / train_flops_per_step(cfg))`` when a FLOP budget is set."""
    if cfg.train.flops > 0:
        from ..flops import train_flops_per_step

        per_step = train_flops_per_step(cfg)
        steps = int(cfg.train.flops // per_step)
        if steps < 1:
            raise ConfigError(
                f"train.flops: the budget {cfg.train.flops:.4g} FLOPs is less than one step "
                f"({per_step:.4g} FLOPs/step at this model and batch size)"
            )
        return steps
    return cfg.train.steps


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        out.update(_flatten(v, key + ".") if isinstance(v, dict) else {key: v})
    return out


# config fields that name files: stored absolute (a run works from any working directory), and
# compared as resolved paths (an equivalent spelling of the same path is not a change)
PATH_FIELDS = ("data.corpus", "data.tokenizer")


def absolute_paths(cfg: Config) -> Config:
    """``cfg`` with ``data.corpus`` (and ``data.tokenizer`` when set) as absolute paths."""
    d = cfg.data
    tok = str(Path(d.tokenizer).expanduser().resolve()) if d.tokenizer else ""
    return replace(cfg, data=replace(d, corpus=str(Path(d.corpus).expanduser().resolve()), tokenizer=tok))


def with_corpus_vocab(cfg: Config) -> Config:
    """``cfg`` with ``model.vocab_size=0`` ("the corpus's") replaced by the size of the tokenizer
    the run uses (``data.tokenizer``, else the corpus's own). A corpus not prepared yet counts
    as the one ``peer data prepare`` builds (``data.vocab_size``); the train-time id check
    (``_open_split``) still guards the run."""
    if cfg.model.vocab_size:
        return cfg
    from ..data import load_tokenizer

    corpus = Path(cfg.data.corpus)
    where = Path(cfg.data.tokenizer) if cfg.data.tokenizer else corpus / "tokenizer.json"
    if where.is_file():
        vocab = load_tokenizer(where).vocab_size
    elif cfg.data.tokenizer or corpus.is_dir():
        raise ConfigError(
            f"model.vocab_size: 0 takes the size of the run's tokenizer, but {str(where)!r} "
            "does not exist; set model.vocab_size or data.tokenizer"
        )
    else:
        vocab = cfg.data.vocab_size
    return replace(cfg, model=replace(cfg.model, vocab_size=vocab))


def _same(key: str, a, b) -> bool:
    if key in PATH_FIELDS and isinstance(a, str) and isinstance(b, str) and a and b:
        return os.path.realpath(os.path.expanduser(a)) == os.path.realpath(os.path.expanduser(b))
    return a == b


def check_resume_config(run_cfg: dict, cfg: Config, where: Path) -> None:
    """ConfigError listing every field (outside RESUME_MAY_CHANGE) where ``cfg`` differs from the run's."""
    # a field added to the config since the run was written counts as its default there
    old = {**_flatten(config_to_dict(Config())), **_flatten(run_cfg)}
    new = _flatten(config_to_dict(cfg))
    diffs = [
        f"{k}: run has {old.get(k)!r}, now {new.get(k)!r}"
        for k in sorted(set(old) | set(new))
        if k not in RESUME_MAY_CHANGE and not _same(k, old.get(k), new.get(k))
    ]
    if diffs:
        raise ConfigError(
            f"cannot resume {where} with a different config (only "
            f"{', '.join(sorted(RESUME_MAY_CHANGE))} may change):\n  " + "\n  ".join(diffs)
        )


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop metric lines logged after ``step`` (work lost with an interruption) and torn lines. A run
    resumed without its metrics file says so (a new one starts at ``step``: the curve before it is lost)."""
    if not path.is_file():
        if step > 0:
            log.warning(
                "%s is missing: the metrics of steps 1-%d are lost (the weights are not); a new file starts at step %d",
                path,
                step,
                step + 1,
            )
        return
    keep = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            if json.loads(line)["step"] <= step:
                keep.append(line)
        except (json.JSONDecodeError, KeyError, TypeError):
            continue
    atomic_write_text(path, "".join(line + "\n" for line in keep))


# --------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------
def _open_split(cfg: Config, split: str, required: bool):
    from .. import data

    corpus = Path(cfg.data.corpus)
    if not corpus.is_dir():
        raise ConfigError(f"data.corpus: {str(corpus)!r} is not a directory (prepare one with `peer data prepare`)")
    if split not in data.list_splits(corpus):
        if required:
            raise ConfigError(
                f"data.train_split: corpus {str(corpus)!r} has no split {split!r} "
                f"(it has: {', '.join(data.list_splits(corpus))})"
            )
        return None
    tokens = data.open_tokens(corpus, split)
    if len(tokens) and int(tokens.max()) >= cfg.model.vocab_size:
        raise ConfigError(
            f"model.vocab_size: {cfg.model.vocab_size} is too small for split {split!r} of "
            f"{str(corpus)!r}, which holds token id {int(tokens.max())}"
        )
    return tokens


def evaluate_loss(model: torch.nn.Module, batches, cfg: Config, device: torch.device) -> float:
    """Mean cross-entropy per target over ``batches`` (a re-iterable of ``(x, y)``), in eval mode."""
    nll, count, _ = summed_nll(model, batches, device, lambda: _autocast(cfg, device))
    return nll / max(count, 1)


def _autocast(cfg: Config, device: torch.device):
    if cfg.train.dtype == "bfloat16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


# --------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------
def _seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _open_tb(run_dir: Path, purge_step: int | None):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as e:  # tensorboard is optional at run time
        log.warning("TensorBoard logging disabled (%s)", e)
        return None
    return SummaryWriter(log_dir=str(run_dir / "tb"), purge_step=purge_step)


def _forward_backward(model, batcher, cfg: Config, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """``grad_accum`` micro-batches of forward + backward (loss / grad_accum); returns the mean
    cross-entropy and the mean auxiliary loss of the micro-batches as 0-dim tensors on ``device``,
    summed there in float64 (as Python floats were) so that nothing waits for the device."""
    n = cfg.train.grad_accum
    acc = scalar_dtype(device)
    ce_sum = aux_sum = torch.zeros((), dtype=acc, device=device)
    for i in range(n):
        x, y = batcher.next()
        with dpar.grad_sync(model, last=i == n - 1):  # one gradient all-reduce per step, not per micro-batch
            with _autocast(cfg, device):
                out = model(x.to(device, non_blocking=True), y.to(device, non_blocking=True))
            (out.loss / n).backward()
        aux = out.aux_loss.detach().to(acc)
        ce_sum = ce_sum + (out.loss.detach().to(acc) - aux)
        aux_sum = aux_sum + aux
    return ce_sum / n, aux_sum / n


def train(
    cfg: Config, resume: bool = False, *, stop_after: int | None = None, from_checkpoint: str | Path | None = None
) -> Path:
    """Train ``PeerLM(cfg.model)`` on ``cfg.data`` and return the run directory.

    ``resume`` continues from the run's latest checkpoint. ``stop_after`` stops once that many
    steps are done, without a final checkpoint, as if the process were killed (for resume tests).
    Raises :class:`TrainingDiverged` on a NaN/inf loss, gradient or weights.

    The run folder is locked for the whole call (:class:`peer.fsutil.FolderLock`, by the main
    process under torchrun): a second ``train`` on the same folder fails at once, naming the pid.
    """
    retain_freed_memory()  # no page-fault storm from the per-step buffers (peer.memory); a no-op once applied
    check_device(cfg.train.device)  # before the lock: a bad device leaves no run folder behind
    cfg = with_corpus_vocab(absolute_paths(cfg))  # the run's config.toml then works from any directory
    check_fits(cfg)  # before the lock: a model that cannot be allocated leaves no run folder behind
    lock = (
        FolderLock(cfg.train.out_dir, "run folder") if os.environ.get("RANK", "0") == "0" else contextlib.nullcontext()
    )
    with lock:
        return _train(cfg, resume, stop_after, from_checkpoint)


def check_fits(cfg: Config) -> None:
    """ConfigError when the model's weights alone (at their storage width) exceed the memory the
    training device has available: such a run can only fail, after writing its folder. Training needs
    more (gradients, optimizer state, activations); this refuses only what is certain to fail."""
    from ..flops import count_params

    free = available_bytes(cfg.train.device)
    if free is None or cfg.dist.expert_parallel:  # expert-parallel ranks hold a share of the tables
        return
    need = 4 * count_params(cfg.model).total
    if need > free:
        raise ConfigError(
            f"model: {count_params(cfg.model).total:,} parameters need {need / 2**30:,.1f} GiB for the weights "
            f"alone, more than the {free / 2**30:,.1f} GiB available on {cfg.train.device}; choose a smaller model "
            "(model.d_model, model.n_layers, model.peer.num_experts, ...)"
        )


def check_device(device: str) -> None:
    """``train.device`` must name a device this torch build can use; the error says what is available."""
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ConfigError(f"train.device: {device!r} is not a device; use 'cpu', 'cuda', 'cuda:N' or 'mps'") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            f"train.device: {device!r} requested but this torch build sees no CUDA device "
            f"(torch {torch.__version__}); use train.device=cpu"
        )
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ConfigError(f"train.device: {device!r}: only {torch.cuda.device_count()} CUDA device(s) here")
    if dev.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ConfigError(f"train.device: {device!r} requested but MPS is not available here; use train.device=cpu")
    if dev.type not in ("cpu", "cuda", "mps"):
        raise ConfigError(f"train.device: {device!r} is not supported; use 'cpu', 'cuda', 'cuda:N' or 'mps'")


def train_or_resume(cfg: Config) -> str:
    """Train the run, resume it from its latest checkpoint, or skip it when complete; returns
    "trained", "resumed" or "complete" (``peer main`` and ``peer sweep`` use this)."""
    cfg = with_corpus_vocab(cfg)
    if cfg.train.threads > 0:  # also for a complete run: what the caller evaluates next runs on these threads
        torch.set_num_threads(cfg.train.threads)
    run_dir, steps = Path(cfg.train.out_dir), resolve_steps(cfg)
    with FolderLock(run_dir, "run folder"):
        ckpt = latest_checkpoint(run_dir)  # a leftover partial (.tmp-step_*) is not a checkpoint
        if ckpt is None:
            (run_dir / "metrics.jsonl").unlink(missing_ok=True)  # lines of a run killed before its first checkpoint
            # keep the tokenizer the run is trained with: `peer eval` / `peer generate` use it and
            # refuse a corpus rebuilt since (see peer.eval.check_corpus_tokenizer)
            tok = Path(cfg.data.corpus) / "tokenizer.json"
            if tok.is_file():
                atomic_copy(tok, run_dir / "tokenizer.json")
            train(cfg)
            return "trained"
        meta = read_meta(ckpt)
        planned = meta["config"]["train"]["steps"]
        if planned != steps:
            raise ConfigError(
                f"{run_dir} holds a run planned for {planned} steps, this one needs {steps} "
                "(another budget?): use another out dir or remove that run"
            )
        check_resume_config(meta["config"], cfg, run_dir)
        if int(meta["step"]) >= steps:
            return "complete"
        train(cfg, resume=True)
        return "resumed"


def resume_checkpoint(run_dir: Path, from_checkpoint: str | Path | None = None) -> tuple[Path, dict]:
    """The checkpoint to resume from and its meta: ``from_checkpoint`` if given, else the latest. A
    corrupted latest checkpoint is an error naming the newest intact one and the command that resumes
    from it (nothing is deleted: the user decides)."""
    if from_checkpoint is not None:
        ckpt = resolve_checkpoint(from_checkpoint)
        meta = read_meta(ckpt)
        verify_checksums(ckpt, meta, tuple(meta["files"]))
        return ckpt, meta
    ckpts = list_checkpoints(run_dir)
    if not ckpts:
        raise CheckpointError(f"{run_dir}: nothing to resume (no checkpoint under {run_dir / 'checkpoints'})")
    try:
        meta = read_meta(ckpts[-1])
        verify_checksums(ckpts[-1], meta, tuple(meta["files"]))
        return ckpts[-1], meta
    except CheckpointError as e:
        raise CheckpointError(
            f"{e}; {_newest_intact(run_dir, ckpts[:-1], f'resume from it with: peer train {run_dir} --resume --from')}"
        ) from None


def _newest_intact(run_dir: Path, older: list[Path], use: str) -> str:
    """The end of an error about a corrupt latest checkpoint: the newest intact older one and how to
    ``use`` it (the checkpoint's path is appended), or that none is left. Nothing is deleted."""
    for ckpt in reversed(older):
        try:
            meta = read_meta(ckpt)
            verify_checksums(ckpt, meta, tuple(meta["files"]))
        except CheckpointError:
            continue
        return f"the newest intact checkpoint is {ckpt} (step {meta['step']}): {use} {ckpt}"
    return f"no intact checkpoint is left in {run_dir / 'checkpoints'}"


def _train(cfg: Config, resume: bool, stop_after: int | None, from_checkpoint=None) -> Path:
    """The run, in parts: plan and check (here), data (:func:`_open_data`), model and optimizer
    (:func:`_build`), restore (:func:`_restore`), then the loop: one step (:func:`_step`), the
    step's record (:class:`~peer.train.parts.StepLog`), checkpoints and the divergence stop (:class:`~peer.train.parts.Saver`)."""
    steps = resolve_steps(cfg)
    cfg = replace(cfg, train=replace(cfg.train, steps=steps))
    t = cfg.train
    run_dir = Path(t.out_dir)
    ckpt = meta = None
    if resume:
        ckpt, meta = resume_checkpoint(run_dir, from_checkpoint)
        check_resume_config(meta["config"], cfg, run_dir)
    elif list_checkpoints(run_dir):
        raise ConfigError(
            f"train.out_dir: {str(run_dir)!r} already holds a run with checkpoints; "
            "pass --resume to continue it, or choose another --out"
        )
    denv = dpar.setup(cfg)  # torch.distributed under torchrun (WORLD_SIZE > 1), else one process
    batcher, val_batches = _open_data(cfg, denv)
    if denv.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        clean_partial(run_dir)
        atomic_write_text(run_dir / "config.toml", toml_dumps(config_to_dict(cfg)))
    dpar.barrier()

    _seed_all(t.seed)
    if t.threads > 0:
        torch.set_num_threads(t.threads)
    device = torch.device(t.device)
    model, fwd, optimizer, schedule = _build(cfg, denv, device, steps)
    start = _restore(ckpt, meta, model, optimizer, batcher, run_dir, denv) if ckpt is not None else 0
    saver = Saver(cfg, run_dir, model, optimizer, schedule, batcher, denv, last_good=ckpt)
    log_ = StepLog(
        cfg,
        run_dir,
        start,
        steps,
        denv,
        saver.diverged,
        tb=_open_tb(run_dir, start if resume else None) if t.tensorboard and denv.is_main else None,
    )
    params = [p for p in model.parameters() if p.requires_grad]
    clip = (params, dpar.expert_shards(model), cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else math.inf)
    model.train()
    stop = StopOnSignal(enabled=not denv.distributed)  # SIGINT/SIGTERM: checkpoint this step, then stop
    try:
        stop.__enter__()
        for s in range(start, steps):
            t0 = time.perf_counter()
            done = s + 1
            lr, scalars = _step(fwd, optimizer, schedule, batcher, cfg, device, denv, clip, s)
            evaluate = val_batches is not None and ((t.eval_every and done % t.eval_every == 0) or done == steps)
            # the step's scalars stay on the device until a line is logged, or before an eval or a
            # checkpoint: then one read checks every pending step for divergence, in order
            record = log_.step(done, t0, lr, *scalars, flush=evaluate)
            if evaluate:
                record = log_.val(done, record, evaluate_loss(fwd, val_batches, cfg, device))
            log_.write(record)
            if done % t.ckpt_every == 0 or done == steps or stop.requested:
                log_.flush()  # no checkpoint past a step that was not checked
                saver.save(done, record)
            if stop.requested and done < steps:
                raise Interrupted(
                    f"stopped by {stop.name} after step {done} of {steps}; checkpoint saved: "
                    f"{saver.last_good}; continue with: peer train {run_dir} --resume",
                    stop.signum,
                )
            if stop_after is not None and done >= stop_after:
                break
    except RuntimeError as e:  # a failed collective (peer died / timed out) -> peer.distributed.DistributedError
        err = dpar.explain_failure(e, denv)
        if err is e:
            raise
        raise err from e
    finally:
        stop.__exit__(None, None, None)
        log_.close()
        dpar.finish(denv)
    return run_dir


def _open_data(cfg: Config, denv):
    """The training batcher (this rank's share of each global batch) and the validation batches."""
    from .. import data

    t = cfg.train
    train_tokens = _open_split(cfg, cfg.data.train_split, required=True)
    val_tokens = _open_split(cfg, cfg.data.val_split, required=False)
    val_batches = None
    try:
        if val_tokens is not None:  # the first train.eval_batches batches of the validation split, in order
            val_batches = data.eval_batches(
                val_tokens, t.batch_size, t.seq_len, max_tokens=t.eval_batches * t.batch_size * t.seq_len
            )
    except ValueError as e:
        raise ConfigError(f"data.val_split: split {cfg.data.val_split!r} of {cfg.data.corpus!r}: {e}") from None
    try:
        batcher = data.Batcher(
            train_tokens,
            dpar.per_rank_batch(cfg, denv.world_size),
            t.seq_len,
            seed=t.seed,
            rank=denv.rank,
            world_size=denv.world_size,
        )  # train.batch_size is global
    except ValueError as e:
        raise ConfigError(f"data.train_split: split {cfg.data.train_split!r} of {cfg.data.corpus!r}: {e}") from None
    return batcher, val_batches


def _build(cfg: Config, denv, device: torch.device, steps: int):
    """The model (``model``: the PeerLM; ``fwd``: what to call, DDP-wrapped or sharded), its
    optimizer and its learning-rate schedule."""
    if denv.world_size > 1 and cfg.dist.expert_parallel:
        # meta -> shard -> allocate -> init (torchtitan's order): a rank allocates only its rows of the expert
        # tables, initialised as the full model's (PeerLM.init_weights replays the constructor's draws, on the CPU)
        model = PeerLM(cfg.model, device="meta")
        dpar.shard_experts(model)
        model.to_empty(device="cpu")
        model.init_weights()
        model = model.to(device)
    else:
        model = PeerLM(cfg.model).to(device)
    for layer in model.sparse_layers().values():  # row-wise AdamW wants sparse row gradients (nn.Embedding style)
        if layer.supports_sparse_grad:
            layer.sparse_grad = bool(cfg.optim.sparse_experts)
    fwd = dpar.wrap_model(model, cfg, denv)  # DDP / FSDP2 / expert-sharded PEER; `model` on one process
    return model, fwd, build_optimizer(model, cfg.optim), Schedule.from_config(cfg.optim, steps)


def _restore(ckpt: Path, meta: dict, model, optimizer, batcher, run_dir: Path, denv) -> int:
    """Load a checkpoint into the model, optimizer, batcher and RNGs; returns its step."""
    state = load_state(ckpt, meta)
    if (ckpt / "dcp").is_dir():  # sharded checkpoint (peer.distributed.checkpoint): loads on any number of ranks
        from ..distributed.checkpoint import load_sharded

        load_sharded(ckpt / "dcp", model, optimizer)
    else:
        load_model_weights(ckpt, model, meta)
        optimizer.load_state_dict(state["optimizer"])
    batcher.load_state_dict(dpar.rebatch_state(state["batcher"], batcher))
    restore_rng(state["rng"])
    start = int(state["step"])
    if denv.is_main:
        _truncate_metrics(run_dir / "metrics.jsonl", start)
    log.info("resumed %s at step %d", ckpt, start)
    return start


def _step(fwd, optimizer, schedule, batcher, cfg: Config, device, denv, clip, s: int) -> tuple:
    """Optimizer step ``s`` (0-based): lr, forward + backward of the micro-batches, clipping to the
    global grad norm, update. Returns (lr, (loss, aux_loss, grad_norm)), the three as 0-dim tensors
    that nothing here reads back (no host sync): :class:`~peer.train.parts.StepLog` checks them for
    divergence when it reads them."""
    lr = schedule.apply(optimizer, s)
    loss, aux_loss = dpar.mean_over_ranks(*_forward_backward(fwd, batcher, cfg, device))
    params, shards, max_norm = clip
    grad_norm = (
        dpar.clip_grad_norm(params, max_norm, shards)
        if denv.distributed  # global norm over shards
        else clip_grad_norm(params, max_norm)
    )
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return lr, (loss, aux_loss, grad_norm)


# --------------------------------------------------------------------------------------
# Loading a trained model
# --------------------------------------------------------------------------------------
def load_run(path: str | Path, device: str | torch.device = "cpu") -> tuple[PeerLM, Config, dict]:
    """(model in eval mode, its Config, the checkpoint's meta) from a run dir (latest checkpoint) or a
    checkpoint dir. ``meta['path']`` is the checkpoint directory. Errors name the file at fault."""
    ckpt = resolve_checkpoint(path)
    try:
        meta = read_meta(ckpt)
        try:
            cfg = config_from_dict(meta["config"])
        except ConfigError as e:
            raise CheckpointError(f"{ckpt / 'meta.json'}: its config is invalid ({e})") from None
        model = PeerLM(cfg.model)
        load_model_weights(ckpt, model, meta)
    except CheckpointError as e:
        if ckpt == Path(path):  # a checkpoint named by the user: no other one to suggest
            raise
        older = [c for c in list_checkpoints(Path(path)) if c != ckpt]
        raise CheckpointError(
            f"{e}; {_newest_intact(Path(path), older, 'give that checkpoint instead of the run:')}"
        ) from None
    model.to(device).eval()
    meta["path"] = str(ckpt)
    return model, cfg, meta
