"""The training loop's stateful parts (``peer.train.loop._train`` drives them):

- :class:`StepLog` - the run's record: ``metrics.jsonl``, TensorBoard, the progress bar;
- :class:`Saver` - checkpoints (single-process or sharded), never of non-finite weights, and
  the divergence stop that names the last good checkpoint.
"""

from __future__ import annotations

import contextlib
import json
import math
import sys
import time
from pathlib import Path
from typing import NamedTuple

import torch

from ..config import Config, ConfigError, config_to_dict
from ..data.batcher import Batcher, EvalBatches
from ..distributed import data_parallel as dpar
from ..errors import PeerError
from ..model import PeerLM
from .checkpoint import capture_rng, checkpoint_name, save_checkpoint
from .optim import clip_grad_norm

__all__ = [
    "TrainData",
    "build_data",
    "build_model",
    "GradClipper",
    "Stepper",
    "StepLog",
    "Saver",
    "save_distributed",
    "TrainingDiverged",
    "autocast",
    "forward_backward",
]


class TrainingDiverged(PeerError, RuntimeError):
    """The loss (or the gradient / weights) became NaN or inf; the run stopped at the next read of the
    step scalars (a log line, an evaluation or a checkpoint), before any checkpoint past the bad step."""

    def __init__(self, message: str, step: int, checkpoint: Path | None):
        super().__init__(message)
        self.step, self.checkpoint = step, checkpoint


def scalar_dtype(device: torch.device) -> torch.dtype:
    """The dtype the step scalars are summed and read in: float64, as Python floats (MPS has none: float32)."""
    return torch.float32 if device.type == "mps" else torch.float64


# ------------------------------------------------------------------ data
class TrainData(NamedTuple):
    batcher: Batcher  # this rank's share of each global batch, resumable
    val_batches: EvalBatches | None  # the first train.eval_batches batches of val, in order


def build_data(cfg: Config, denv) -> TrainData:
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
    return TrainData(batcher, val_batches)


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


# ------------------------------------------------------------------ model
def build_model(cfg: Config, denv, device: torch.device) -> tuple[PeerLM, torch.nn.Module]:
    """The PeerLM and what to call (``fwd``: DDP-wrapped, FSDP2-sharded or the model itself)."""
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
    return model, dpar.wrap_model(model, cfg, denv)  # DDP / FSDP2 / expert-sharded PEER; `model` on one process


# ------------------------------------------------------------------ one step
def autocast(cfg: Config, device: torch.device):
    if cfg.train.dtype == "bfloat16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def forward_backward(model, batcher, cfg: Config, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """``grad_accum`` micro-batches of forward + backward (loss / grad_accum); returns the mean
    cross-entropy and the mean auxiliary loss of the micro-batches as 0-dim tensors on ``device``,
    summed there in float64 (as Python floats were) so that nothing waits for the device."""
    n = cfg.train.grad_accum
    acc = scalar_dtype(device)
    ce_sum = aux_sum = torch.zeros((), dtype=acc, device=device)
    for i in range(n):
        x, y = batcher.next()
        with dpar.grad_sync(model, last=i == n - 1):  # one gradient all-reduce per step, not per micro-batch
            with autocast(cfg, device):
                out = model(x.to(device, non_blocking=True), y.to(device, non_blocking=True))
            (out.loss / n).backward()
        aux = out.aux_loss.detach().to(acc)
        ce_sum = ce_sum + (out.loss.detach().to(acc) - aux)
        aux_sum = aux_sum + aux
    return ce_sum / n, aux_sum / n


class GradClipper:
    """Clips every trainable gradient to one global norm (``optim.grad_clip``; 0: never clips, only
    measures) and returns the norm before clipping as a 0-dim device tensor. Across ranks the norm
    includes every rank's expert-table rows (:func:`peer.distributed.expert_shards`)."""

    def __init__(self, model: torch.nn.Module, max_norm: float, distributed: bool):
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.shards = dpar.expert_shards(model)
        self.max_norm = max_norm if max_norm > 0 else math.inf
        self.distributed = distributed

    def __call__(self) -> torch.Tensor:
        if self.distributed:  # global norm over shards
            return dpar.clip_grad_norm(self.params, self.max_norm, self.shards)
        return clip_grad_norm(self.params, self.max_norm)


class Stepper:
    """One optimizer step ``s`` (0-based): learning rate from the schedule, forward + backward of the
    micro-batches, clipping to the global norm, update. Returns ``(lr, (loss, aux_loss, grad_norm))``,
    the three as 0-dim device tensors that nothing here reads back (no host sync): :class:`StepLog`
    checks them for divergence when it reads them."""

    def __init__(self, fwd, optimizer, schedule, batcher, clipper: GradClipper, cfg: Config, device: torch.device):
        self.fwd, self.optimizer, self.schedule, self.batcher = fwd, optimizer, schedule, batcher
        self.clipper, self.cfg, self.device = clipper, cfg, device

    def __call__(self, s: int) -> tuple[float, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        lr = self.schedule.apply(self.optimizer, s)
        loss, aux_loss = dpar.mean_over_ranks(*forward_backward(self.fwd, self.batcher, self.cfg, self.device))
        grad_norm = self.clipper()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return lr, (loss, aux_loss, grad_norm)


# ------------------------------------------------------------------ record and checkpoints
class StepLog:
    """The run's record: a line of ``metrics.jsonl`` every ``train.log_every`` steps (loss, lr, tokens,
    FLOPs, throughput over the training steps only, grad norm; ``val_loss`` on eval steps), the
    same scalars in TensorBoard, and the progress bar.

    It is also where the step's scalars are read: :meth:`step` keeps each step's loss, auxiliary
    loss and gradient norm as device tensors and reads all pending ones at once when a line is due
    or the caller asks (before an evaluation or a checkpoint): one host sync per log interval, not
    several per step. A non-finite value raises ``diverged(what, step)`` for the first bad step."""

    def __init__(self, cfg: Config, run_dir: Path, start: int, steps: int, denv, diverged, tb=None):
        from tqdm.auto import tqdm

        from ..flops import train_flops_per_step

        t = cfg.train
        self.every, self.steps, self.denv, self.tb, self.diverged = t.log_every, steps, denv, tb, diverged
        self.tokens_per_step = t.tokens_per_step
        self.flops_per_step = train_flops_per_step(cfg)
        self.path = run_dir / "metrics.jsonl"
        self.busy, self.last = 0.0, start  # seconds in training steps since the last line (no eval/checkpoint)
        self.pending: list[tuple[int, tuple]] = []  # (step, (loss, aux_loss, grad_norm) tensors) not read yet
        self.bar = tqdm(
            total=steps,
            initial=start,
            disable=not (t.progress and denv.is_main and sys.stderr.isatty()),  # a bar only on a terminal
            unit="step",
            dynamic_ncols=True,
        )

    def _base(self, done: int) -> dict:
        return {"step": done, "tokens": done * self.tokens_per_step, "flops": done * self.flops_per_step}

    def flush(self) -> tuple[float, float, float] | None:
        """Read every pending step's (loss, aux_loss, grad_norm) in one transfer, check them in step
        order (TrainingDiverged at the first non-finite), return the last step's, or None if none."""
        if not self.pending:
            return None
        dev = torch.as_tensor(self.pending[0][1][0]).device
        dtype = scalar_dtype(dev)
        values = torch.stack(
            [torch.stack([torch.as_tensor(v).to(dev, dtype) for v in scalars]) for _, scalars in self.pending]
        ).tolist()
        steps = [step for step, _ in self.pending]
        self.pending.clear()
        for step, (loss, aux_loss, grad_norm) in zip(steps, values, strict=True):
            if not math.isfinite(loss + aux_loss):
                raise self.diverged(f"loss is {loss + aux_loss}", step)
            if not math.isfinite(grad_norm):
                raise self.diverged(f"gradient norm is {grad_norm}", step)
        return values[-1]

    def step(self, done: int, t0: float, lr: float, loss, aux_loss, grad_norm, flush: bool = False) -> dict | None:
        """Step ``done`` ended (it began at ``perf_counter()`` ``t0``); its scalars may be tensors or floats.
        Returns the metrics line when one is due (``train.log_every``, the last step), else None."""
        self.pending.append((done, (loss, aux_loss, grad_norm)))
        due = not done % self.every or done == self.steps
        if due or flush:
            loss, aux_loss, grad_norm = self.flush()
        self.busy += time.perf_counter() - t0  # after the read: a device's queued work is counted
        self.bar.update(1)
        if not due:
            return None
        tps = (done - self.last) * self.tokens_per_step / max(self.busy, 1e-9)
        self.busy, self.last = 0.0, done
        record = {
            "step": done,
            "loss": loss,
            "lr": lr,
            "tokens": done * self.tokens_per_step,
            "flops": done * self.flops_per_step,
            "tokens_per_s": tps,
            "grad_norm": grad_norm,
        }
        if aux_loss:
            record["aux_loss"] = aux_loss
        self.bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tps:,.0f}")
        return record

    def val(self, done: int, record: dict | None, val_loss: float) -> dict:
        record = record or self._base(done)
        record["val_loss"] = val_loss
        return record

    def write(self, record: dict | None) -> None:
        if record is None or not self.denv.is_main:
            return
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for k, v in record.items():
                if k not in ("step", "tokens", "flops"):
                    self.tb.add_scalar(f"train/{k}" if k != "val_loss" else "val/loss", v, record["step"])

    def close(self) -> None:
        self.bar.close()
        if self.tb is not None:
            self.tb.close()


class Saver:
    """Checkpoints (never of non-finite weights) and the divergence stop, which names the last good one."""

    def __init__(self, cfg: Config, run_dir: Path, model, optimizer, schedule, batcher, denv, last_good=None):
        from ..flops import train_flops_per_step

        self.cfg, self.run_dir, self.model, self.optimizer = cfg, run_dir, model, optimizer
        self.schedule, self.batcher, self.denv, self.last_good = schedule, batcher, denv, last_good
        t = cfg.train
        self.tokens_per_step, self.flops_per_step = t.tokens_per_step, train_flops_per_step(cfg)

    def diverged(self, what: str, step: int) -> TrainingDiverged:
        where = (
            f"the last good checkpoint is kept: {self.last_good}" if self.last_good else "no checkpoint was written yet"
        )
        return TrainingDiverged(
            f"{what} at step {step}; the run is stopped and nothing of this step was saved ({where}). "
            "A resumed run replays the same batches exactly, so start a new run with a lower optim.lr, "
            "more optim.warmup_steps or a tighter optim.grad_clip.",
            step,
            self.last_good,
        )

    def save(self, done: int, record: dict | None) -> Path:
        cfg = self.cfg
        if not dpar.all_finite(self.model):
            raise self.diverged("the weights (or BatchNorm statistics) became non-finite", done)
        state = {
            "step": done,
            "optimizer": self.optimizer.state_dict(),
            "schedule": self.schedule.state_dict(),
            "rng": capture_rng(),
            "batcher": self.batcher.state_dict(),
            "metrics": record,
        }
        meta_out = {
            "step": done,
            "tokens": done * self.tokens_per_step,
            "flops": done * self.flops_per_step,
            "config": config_to_dict(cfg),
            "metrics": record,
        }
        if self.denv.distributed or dpar.is_sharded_config(cfg):
            self.last_good = save_distributed(
                self.run_dir, self.model, self.optimizer, state, meta_out, cfg, self.denv, done == cfg.train.steps
            )
        else:
            self.last_good = save_checkpoint(self.run_dir, self.model, state, meta_out, keep_last=cfg.train.keep_last)
        return self.last_good


def save_distributed(run_dir: Path, model, optimizer, state: dict, meta: dict, cfg: Config, denv, final: bool) -> Path:
    """A checkpoint of a multi-rank or sharded run. Sharded state (expert rows, FSDP) goes through
    torch.distributed.checkpoint from every rank into ``dcp/``; rank 0 writes the rest and renames
    the directory into place after every rank has written. The final checkpoint of a sharded run
    also gets the full ``model.safetensors`` (gathered on rank 0), for load_run / peer eval."""
    name = checkpoint_name(int(meta["step"]))
    model_state = extra = None
    write_model = True
    if dpar.is_sharded_config(cfg):
        from ..distributed.checkpoint import full_model_state, save_sharded

        state = {k: v for k, v in state.items() if k != "optimizer"}  # in dcp/
        tmp = run_dir / "checkpoints" / f".tmp-dcp-{name}"
        save_sharded(tmp, model, optimizer)
        model_state = full_model_state(model) if final else None
        write_model, extra = final, {"dcp": tmp}
    if denv.is_main:
        save_checkpoint(
            run_dir,
            model,
            state,
            meta,
            keep_last=cfg.train.keep_last,
            model_state=model_state,
            write_model=write_model,
            extra_dirs=extra,
        )
    dpar.barrier()
    return run_dir / "checkpoints" / name
