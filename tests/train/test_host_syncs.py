"""No host sync on the training hot path: a step reads nothing back from its tensors.

On a GPU a host sync drains the launch queue. On the CPU there is no queue, so these tests watch
for the operations that *would* sync on a GPU: every read of a tensor's value (``aten::
_local_scalar_dense``, behind ``.item()``, ``bool()``, ``float()``, ``int()``; and ``.tolist()``),
and the ops whose output size depends on the data (``nonzero``, ``unique``, boolean masks,
``repeat_interleave`` without a size, ``bincount``...), seen by a TorchDispatchMode on every op
the step dispatches, its backward included. (On a GPU, ``peer bench gpu`` counts the real syncs
with ``torch.cuda.set_sync_debug_mode``.)
"""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from peer.train import parts, train

aten = torch.ops.aten
# ops that make a CUDA host wait: a value read, or an output whose size depends on the values
SYNCING = {
    aten._local_scalar_dense.default,
    aten.nonzero.default,
    aten.nonzero_static.default,
    aten.masked_select.default,
    aten.unique_consecutive.default,
    aten._unique2.default,
    aten.unique_dim.default,
    aten.is_nonzero.default,
    aten.equal.default,
    aten.bincount.default,
}


class SyncWatch(TorchDispatchMode):
    """Records the syncing ops (and value reads from Python) dispatched while active."""

    def __init__(self):
        super().__init__()
        self.seen: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in SYNCING:
            self.seen.append(str(func))
        elif func is aten.repeat_interleave.Tensor and kwargs.get("output_size") is None:
            self.seen.append(str(func))
        elif func in (aten.index.Tensor, aten.index_put.default, aten.index_put_.default) and any(
            isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (args[1] or ())
        ):
            self.seen.append(f"{func} (boolean mask)")
        return func(*args, **kwargs)


@pytest.fixture
def watched_steps(monkeypatch):
    """Wraps the trainer's step (``parts.Stepper``): each call's syncing ops (and any ``.tolist()``) recorded."""
    calls: list[list[str]] = []
    real_step, real_tolist = parts.Stepper.__call__, torch.Tensor.tolist

    def step(*a, **k):
        calls.append([])
        with SyncWatch() as watch:
            monkeypatch.setattr(torch.Tensor, "tolist", tolist)
            try:
                out = real_step(*a, **k)
            finally:
                monkeypatch.setattr(torch.Tensor, "tolist", real_tolist)
        calls[-1] += watch.seen
        return out

    def tolist(self):  # reads the values without an aten op (a CUDA tensor's would sync)
        calls[-1].append("tolist")
        return real_tolist(self)

    monkeypatch.setattr(parts.Stepper, "__call__", step)
    return calls


@pytest.mark.parametrize(
    "overrides",
    [
        pytest.param(("model.sparse_layer=none",), id="dense"),
        pytest.param(("model.sparse_layer=peer",), id="peer"),
        pytest.param(("model.sparse_layer=peer", "model.peer.backend=reference"), id="peer-reference"),
        pytest.param(("model.sparse_layer=pkm",), id="pkm"),
        pytest.param(("model.sparse_layer=moe",), id="moe-expert-choice"),
        pytest.param(
            ("model.sparse_layer=moe", "model.moe.routing=token_choice", "model.moe.topk=2"), id="moe-token-choice"
        ),
        pytest.param(("model.sparse_layer=none", "train.grad_accum=2", "optim.grad_clip=0.01"), id="accum-clipped"),
    ],
)
def test_a_training_step_makes_no_host_sync(tiny, watched_steps, overrides):
    train(tiny("train.steps=6", "train.log_every=3", "train.ckpt_every=100", *overrides))
    assert len(watched_steps) == 6
    assert watched_steps == [[]] * 6, f"host syncs inside training steps: {watched_steps}"


def test_the_step_scalars_are_read_once_per_log_line(tiny, monkeypatch):
    """Between log lines nothing is read; a log line reads every pending step in one transfer."""
    reads = []
    real = parts.StepLog.flush

    def flush(self):
        reads.append(len(self.pending))
        return real(self)

    monkeypatch.setattr(parts.StepLog, "flush", flush)
    run = train(tiny("train.steps=8", "train.log_every=4", "train.ckpt_every=100", "model.sparse_layer=peer"))
    assert [n for n in reads if n] == [4, 4]  # steps 1-4 at step 4, 5-8 at step 8 (its checkpoint: nothing left)
    import json

    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [4, 8]
    assert all(isinstance(x["loss"], float) and isinstance(x["grad_norm"], float) for x in lines)


def test_a_checkpoint_or_an_eval_reads_the_pending_steps_first(tiny, monkeypatch):
    """A checkpoint is never written past an unread step (a NaN there must stop the run first)."""
    order = []
    real_flush, real_save = parts.StepLog.flush, parts.Saver.save

    def flush(self):
        if self.pending:
            order.append(("read", self.pending[-1][0]))
        return real_flush(self)

    def save(self, done, record):
        order.append(("save", done))
        return real_save(self, done, record)

    monkeypatch.setattr(parts.StepLog, "flush", flush)
    monkeypatch.setattr(parts.Saver, "save", save)
    train(tiny("train.steps=6", "train.log_every=100", "train.ckpt_every=3"))
    assert order == [("read", 3), ("save", 3), ("read", 6), ("save", 6)]


def test_nan_between_log_lines_names_its_step_and_keeps_the_last_good_checkpoint(tiny, monkeypatch):
    from peer.train import TrainingDiverged
    from peer.train.checkpoint import list_checkpoints
    from tests.train.test_loop import _NaNAfter  # loss NaN from the 5th training forward on

    monkeypatch.setattr(parts, "PeerLM", _NaNAfter)
    _NaNAfter.calls = 0
    cfg = tiny("train.steps=12", "train.log_every=8", "train.ckpt_every=4")
    with pytest.raises(TrainingDiverged, match="loss is nan at step 5") as err:
        train(cfg)
    assert err.value.step == 5
    # step 8's checkpoint is not written: the read before it finds step 5's NaN
    assert [p.name for p in list_checkpoints(cfg.train.out_dir)] == ["step_0000004"]


def test_the_distributed_clipping_reads_nothing_back_and_equals_torchs():
    """The multi-rank clipping (peer.distributed.data_parallel.clip_grad_norm, here on one process) keeps its
    norm and coefficient on the device (it read them back with float() before) and clips as torch does."""
    from peer.distributed import data_parallel as dpar

    torch.manual_seed(0)
    ps = [torch.nn.Parameter(torch.randn(5, 3)) for _ in range(3)]
    grads = [torch.randn(5, 3) * 4 for _ in ps]
    for p, g in zip(ps, grads, strict=True):
        p.grad = g.clone()
    with SyncWatch() as watch:
        norm = dpar.clip_grad_norm(ps, 1.0, shards=ps[2:])
    assert watch.seen == [] and isinstance(norm, torch.Tensor)
    ref = [torch.nn.Parameter(torch.zeros(5, 3)) for _ in ps]
    for p, g in zip(ref, grads, strict=True):
        p.grad = g.clone()
    ref_norm = torch.nn.utils.clip_grad_norm_(ref, 1.0)
    assert float(norm) == pytest.approx(float(ref_norm), rel=1e-6)
    for p, r in zip(ps, ref, strict=True):
        torch.testing.assert_close(p.grad, r.grad)
    for p in ps:  # a non-finite norm clips nothing (the step's record stops the run)
        p.grad = torch.full((5, 3), float("nan"))
    assert not torch.isfinite(dpar.clip_grad_norm(ps, 1.0))
    assert torch.isnan(ps[0].grad).all()
