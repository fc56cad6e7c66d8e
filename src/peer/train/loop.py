"""Training: ``train(cfg, resume=False) -> run_dir`` and ``load_run(path) -> (model, cfg, meta)``.

``train`` checks the config (device, memory), locks the run folder and runs a :class:`Trainer`: a
holder of small stateful parts built by ``build_*`` functions (:mod:`peer.train.parts`): data, model
(and its DDP / FSDP2 / expert-sharded wrapper), optimizer, schedule, stepper (one optimizer step,
with its gradient clipper), checkpointer, metrics; signals are a ``with`` block around the loop.

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
import itertools
import json
import logging
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
from ..layers.lora import is_lora_param
from ..layers.router import ProductKeyRouter
from ..memory import apply_memory_settings, available_bytes
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
from .optim import build_optimizer
from .parts import GradClipper, Saver, StepLog, Stepper, TrainingDiverged, autocast, build_data, build_model
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
    """``cfg`` with ``data.corpus`` (and ``data.tokenizer``, ``train.init_from`` when set) as absolute paths."""
    d, t = cfg.data, cfg.train
    tok = str(Path(d.tokenizer).expanduser().resolve()) if d.tokenizer else ""
    init = str(Path(t.init_from).expanduser().resolve()) if t.init_from else ""
    bg = str(Path(t.background).expanduser().resolve()) if t.background else ""
    return replace(
        cfg,
        data=replace(d, corpus=str(Path(d.corpus).expanduser().resolve()), tokenizer=tok),
        train=replace(t, init_from=init, background=bg),
    )


def with_corpus_vocab(cfg: Config) -> Config:
    """``cfg`` with ``model.vocab_size=0`` ("the corpus's") replaced by the size of the tokenizer
    the run uses (``data.tokenizer``, else the corpus's own). A corpus not prepared yet counts
    as the one ``peer data prepare`` builds (``data.vocab_size``); the train-time id check
    (``peer.train.parts._open_split``) still guards the run."""
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
def evaluate_loss(model: torch.nn.Module, batches, cfg: Config, device: torch.device) -> float:
    """Mean cross-entropy per target over ``batches`` (a re-iterable of ``(x, y)``), in eval mode."""
    nll, count, _ = summed_nll(model, batches, device, lambda: autocast(cfg, device))
    return nll / max(count, 1)


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
    apply_memory_settings()  # no page-fault storm, a bounded kernel cache (peer.memory); a no-op once applied
    check_device(cfg.train.device)  # before the lock: a bad device leaves no run folder behind
    cfg = with_corpus_vocab(absolute_paths(cfg))  # the run's config.toml then works from any directory
    check_fits(cfg)  # before the lock: a model that cannot be allocated leaves no run folder behind
    if cfg.train.init_from and not resume:  # a missing or corrupt source fails before the run folder exists
        try:
            resolve_checkpoint(cfg.train.init_from)
        except CheckpointError as e:
            raise ConfigError(f"train.init_from: {e}") from None
    lock = (
        FolderLock(cfg.train.out_dir, "run folder") if os.environ.get("RANK", "0") == "0" else contextlib.nullcontext()
    )
    with lock:
        return Trainer(cfg, resume, from_checkpoint).fit(stop_after)


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


def init_weights_from(model: PeerLM, path: str | Path) -> Path:
    """Load the weights of a run (its latest checkpoint) or a checkpoint into ``model`` (same
    architecture: names, shapes and dtypes are checked); returns the checkpoint used."""
    try:
        ckpt = resolve_checkpoint(path)
        load_model_weights(ckpt, model, optional=is_lora_param)  # a model without LoRA fine-tunes with it
    except CheckpointError as e:
        raise ConfigError(f"train.init_from: {e}") from None
    log.info("initialised from %s", ckpt)
    return ckpt


def freeze_all_but_lora(model: PeerLM) -> int:
    """``requires_grad=False`` for every parameter but LoRA's factors (``train.trainable="lora"``); returns
    how many parameters stay trainable."""
    for name, p in model.named_parameters():
        p.requires_grad_(is_lora_param(name))
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def freeze_all_but_experts(model: PeerLM) -> int:
    """``requires_grad=False`` for every parameter but the sparse layers' expert tables, and the routers'
    query BatchNorm statistics frozen too (normalising with the running ones), so that retrieval stays
    what it was; returns how many parameters stay trainable."""
    keep = {id(p) for layer in model.sparse_layers().values() for p in layer.expert_parameters()}
    for p in model.parameters():
        p.requires_grad_(id(p) in keep)
    for layer in model.sparse_layers().values():
        if isinstance(layer, ProductKeyRouter):
            layer.query_norm_frozen = True
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


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


class Trainer:
    """A ``peer train`` run, made of stateful parts that each do one job (torchtitan's shape; the parts
    and their ``build_*`` functions are in :mod:`peer.train.parts`):

    ``data`` (this rank's batcher, the validation batches), ``model`` and ``fwd`` (what to call: the
    model, or its DDP / FSDP2 / expert-sharded wrapper), ``optimizer``, ``schedule``, ``stepper`` (one
    optimizer step, with its :class:`~peer.train.parts.GradClipper`), ``checkpointer``
    (:class:`~peer.train.parts.Saver`), ``metrics`` (:class:`~peer.train.parts.StepLog`); the signal
    handling is a ``with StopOnSignal()`` around the loop.

    ``Trainer(cfg, resume, from_checkpoint)`` plans the run (steps from the FLOP budget), checks it
    against the checkpoint it resumes, builds the parts and restores them; :meth:`fit` runs the loop
    and releases the parts (:meth:`close`) however it ends.
    """

    def __init__(self, cfg: Config, resume: bool = False, from_checkpoint: str | Path | None = None):
        steps = resolve_steps(cfg)
        self.cfg = cfg = replace(cfg, train=replace(cfg.train, steps=steps))
        t = cfg.train
        self.steps, self.run_dir, self.resumed = steps, Path(t.out_dir), resume
        ckpt = meta = None
        if resume:
            ckpt, meta = resume_checkpoint(self.run_dir, from_checkpoint)
            check_resume_config(meta["config"], cfg, self.run_dir)
        elif list_checkpoints(self.run_dir):
            raise ConfigError(
                f"train.out_dir: {str(self.run_dir)!r} already holds a run with checkpoints; "
                "pass --resume to continue it, or choose another --out"
            )
        self.denv = denv = dpar.setup(cfg)  # torch.distributed under torchrun (WORLD_SIZE > 1), else one process
        self.data = build_data(cfg, denv)
        if denv.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            clean_partial(self.run_dir)
            atomic_write_text(self.run_dir / "config.toml", toml_dumps(config_to_dict(cfg)))
        dpar.barrier()

        _seed_all(t.seed)
        if t.threads > 0:
            torch.set_num_threads(t.threads)
        self.device = torch.device(t.device)
        self.model, self.fwd = build_model(cfg, denv, self.device)
        if t.init_from and ckpt is None:  # fine-tuning: another run's weights (a resume has its own)
            init_weights_from(self.model, t.init_from)
        if t.trainable == "experts":
            freeze_all_but_experts(self.model)
        elif t.trainable == "lora":
            freeze_all_but_lora(self.model)
        if t.expert_rows > 0:
            self._restrict_rows(cfg, ckpt is not None)
        self.optimizer = build_optimizer(self.model, cfg.optim)
        self.schedule = Schedule.from_config(cfg.optim, steps)
        self.start = self._restore(ckpt, meta) if ckpt is not None else 0
        self.checkpointer = Saver(
            cfg, self.run_dir, self.model, self.optimizer, self.schedule, self.data.batcher, denv, last_good=ckpt
        )
        tb = _open_tb(self.run_dir, self.start if resume else None) if t.tensorboard and denv.is_main else None
        self.metrics = StepLog(cfg, self.run_dir, self.start, steps, denv, self.checkpointer.diverged, tb=tb)
        clipper = GradClipper(self.model, cfg.optim.grad_clip, denv.distributed)
        self.stepper = Stepper(self.fwd, self.optimizer, self.schedule, self.data.batcher, clipper, cfg, self.device)

    def _restrict_rows(self, cfg: Config, resumed: bool) -> None:
        """Sparse memory fine-tuning: only the rows :mod:`peer.train.memory_rows` picks, by TF-IDF against
        the background, chosen once with the starting weights (``row_selection="run"``) or per batch from an
        idf measured once (``"batch"``); what was measured is kept in the run folder, so a resume trains
        the same way."""
        from .. import data
        from .memory_rows import (
            IDF_FILE,
            BatchRows,
            background_idf,
            load_rows,
            restrict_gradients,
            save_rows,
            select_rows,
        )

        t = cfg.train

        def background():  # a seeded sample of windows of the background's train split (never its val: the
            # split forgetting is measured on must not choose the rows)
            b = data.Batcher(data.open_tokens(t.background, "train"), t.batch_size, t.seq_len, seed=0)
            return itertools.islice(iter(b), t.eval_batches)

        if t.row_selection == "batch":
            idf = load_rows(self.run_dir, IDF_FILE) if resumed else None
            if idf is None:
                idf = background_idf(self.model, background(), self.device)
                if self.denv.is_main:
                    save_rows(self.run_dir, idf, IDF_FILE)
            BatchRows(self.model, idf, t.expert_rows)  # its hooks keep it for the model's lifetime
            return
        keep = load_rows(self.run_dir) if resumed else None
        if keep is None:
            n = t.eval_batches * t.batch_size * t.seq_len
            own = data.eval_batches(data.open_tokens(cfg.data.corpus, cfg.data.train_split), t.batch_size, t.seq_len, n)
            keep = select_rows(self.model, own, background(), t.expert_rows, self.device)
            if self.denv.is_main:
                save_rows(self.run_dir, keep)
        restrict_gradients(self.model, keep)

    def _restore(self, ckpt: Path, meta: dict) -> int:
        """Load a checkpoint into the model, optimizer, batcher and RNGs; returns its step."""
        state = load_state(ckpt, meta)
        if (ckpt / "dcp").is_dir():  # sharded checkpoint (peer.distributed.checkpoint): loads on any number of ranks
            from ..distributed.checkpoint import load_sharded

            load_sharded(ckpt / "dcp", self.model, self.optimizer)
        else:
            load_model_weights(ckpt, self.model, meta)
            self.optimizer.load_state_dict(state["optimizer"])
        self.data.batcher.load_state_dict(dpar.rebatch_state(state["batcher"], self.data.batcher))
        restore_rng(state["rng"])
        start = int(state["step"])
        if self.denv.is_main:
            _truncate_metrics(self.run_dir / "metrics.jsonl", start)
        log.info("resumed %s at step %d", ckpt, start)
        return start

    def fit(self, stop_after: int | None = None) -> Path:
        """Steps ``start .. steps``: each step's record, evaluations, checkpoints; SIGINT/SIGTERM
        checkpoint the current step and stop (:class:`Interrupted`). ``stop_after``: stop once that
        many steps are done, without a final checkpoint, as if killed (for resume tests)."""
        t, steps, val = self.cfg.train, self.steps, self.data.val_batches
        self.model.train()
        try:
            with StopOnSignal(enabled=not self.denv.distributed) as stop:
                for s in range(self.start, steps):
                    t0 = time.perf_counter()
                    done = s + 1
                    lr, scalars = self.stepper(s)
                    evaluate = val is not None and ((t.eval_every and done % t.eval_every == 0) or done == steps)
                    # the step's scalars stay on the device until a line is logged, or before an eval or a
                    # checkpoint: then one read checks every pending step for divergence, in order
                    record = self.metrics.step(done, t0, lr, *scalars, flush=evaluate)
                    if evaluate:
                        record = self.metrics.val(done, record, evaluate_loss(self.fwd, val, self.cfg, self.device))
                    self.metrics.write(record)
                    if done % t.ckpt_every == 0 or done == steps or stop.requested:
                        self.metrics.flush()  # no checkpoint past a step that was not checked
                        self.checkpointer.save(done, record)
                    if stop.requested and done < steps:
                        raise Interrupted(
                            f"stopped by {stop.name} after step {done} of {steps}; checkpoint saved: "
                            f"{self.checkpointer.last_good}; continue with: peer train {self.run_dir} --resume",
                            stop.signum,
                        )
                    if stop_after is not None and done >= stop_after:
                        break
        except RuntimeError as e:  # a failed collective (peer died / timed out) -> peer.distributed.DistributedError
            err = dpar.explain_failure(e, self.denv)
            if err is e:
                raise
            raise err from e
        finally:
            self.close()
        return self.run_dir

    def close(self) -> None:
        """Close the record (metrics file, TensorBoard, bar) and leave the process group."""
        self.metrics.close()
        dpar.finish(self.denv)


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
