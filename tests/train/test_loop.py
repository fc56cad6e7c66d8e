"""The training loop: exact resume, FLOP-budget steps, NaN stop, keep-last-K, config checks, load_run."""

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from peer.config import ConfigError, load_config
from peer.flops import train_flops_per_step
from peer.train import TrainingDiverged, load_run, train
from peer.train import loop as loop_mod
from peer.train import parts as parts_mod
from peer.train.checkpoint import CheckpointError, list_checkpoints


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _weights(run: Path) -> dict:
    return load_file(str(list_checkpoints(run)[-1] / "model.safetensors"))


RESUME_CASES = {
    # dense with dropout (torch RNG in use) and grad accumulation; 10 steps cross an epoch of the data
    "dense": ["model.dropout=0.1", "train.grad_accum=2", "train.steps=10"],
    # PEER in the middle block, BatchNorm queries (running stats are part of the state)
    "peer": ["model.sparse_layer=peer", "model.peer.query_norm=batchnorm", "train.steps=10"],
    # PEER with the row-wise AdamW on u, v (sparse row gradients, two optimizers in one state)
    "peer_sparse": ["model.sparse_layer=peer", "optim.sparse_experts=true", "train.grad_accum=2", "train.steps=10"],
}


@pytest.mark.parametrize("case", sorted(RESUME_CASES))
def test_resume_is_bitwise_exact(tiny, case):
    over = [*RESUME_CASES[case], "train.ckpt_every=3", "train.eval_every=4", "train.keep_last=5"]
    full = train(tiny(*over, out="full"))
    # killed after step 8 (checkpoints at 3 and 6, none at 8): the resume restarts from 6
    part_cfg = tiny(*over, out="part")
    part = train(part_cfg, stop_after=8)
    assert [m["step"] for m in _metrics(part)][-1] == 8
    assert list_checkpoints(part)[-1].name == "step_0000006"
    train(part_cfg, resume=True)

    a, b = _metrics(full), _metrics(part)
    assert [m["step"] for m in b] == list(range(1, 11))  # steps 7, 8 were logged once, not twice
    for key in ("loss", "grad_norm", "lr", "val_loss"):
        assert [m.get(key) for m in a] == [m.get(key) for m in b], key  # bitwise (floats round-trip JSON)
    wa, wb = _weights(full), _weights(part)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    if case == "peer":
        assert any("query_norm.running_mean" in k for k in wa)


def test_flop_budget_sets_steps(tiny):
    cfg = tiny("train.ckpt_every=100")
    per_step = train_flops_per_step(cfg)
    budget = 5.7 * per_step
    run = train(tiny(f"train.flops={budget!r}", "train.steps=1000", "train.ckpt_every=100"))
    want = math.floor(budget / per_step)
    assert want == 5
    assert [m["step"] for m in _metrics(run)][-1] == want
    assert _metrics(run)[-1]["flops"] == pytest.approx(want * per_step)
    _, cfg_run, meta = load_run(run)
    assert meta["step"] == want and cfg_run.train.steps == want  # config.toml/meta hold the resolved steps
    assert load_config(run / "config.toml").train.steps == want
    with pytest.raises(ConfigError, match="train.flops.*less than one step"):
        train(tiny(f"train.flops={0.5 * per_step!r}", out="small"))


def test_metrics_fields(tiny):
    pytest.importorskip("torch.utils.tensorboard")
    cfg = tiny(
        "train.steps=4", "train.grad_accum=2", "train.log_every=2", "train.eval_every=3", "train.tensorboard=true"
    )
    run = train(cfg)
    m = _metrics(run)
    assert [r["step"] for r in m] == [2, 3, 4]
    tok = cfg.train.batch_size * cfg.train.grad_accum * cfg.train.seq_len
    for r in m:
        assert r["tokens"] == r["step"] * tok
    logged = [r for r in m if "loss" in r]
    assert all({"lr", "flops", "tokens_per_s", "grad_norm"} <= r.keys() for r in logged)
    assert [r["step"] for r in m if "val_loss" in r] == [3, 4]
    assert list((run / "tb").glob("events.out.tfevents.*"))


class _NaNAfter(loop_mod.PeerLM):
    """A PeerLM whose training loss becomes NaN from the 5th training forward on."""

    calls = 0

    def forward(self, idx, targets=None, kv_cache=None):
        out = super().forward(idx, targets, kv_cache)
        if self.training and targets is not None:
            type(self).calls += 1
            if type(self).calls >= 5:
                out.loss = out.loss * float("nan")
        return out


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tiny, monkeypatch):
    monkeypatch.setattr(parts_mod, "PeerLM", _NaNAfter)  # the model build_model makes
    _NaNAfter.calls = 0
    cfg = tiny("train.steps=10", "train.ckpt_every=2")
    with pytest.raises(TrainingDiverged) as err:
        train(cfg)
    msg = str(err.value)
    run = Path(cfg.train.out_dir)
    assert "loss is nan at step 5" in msg and str(run / "checkpoints" / "step_0000004") in msg
    assert err.value.step == 5
    assert [p.name for p in list_checkpoints(run)] == ["step_0000002", "step_0000004"]
    model, _, meta = load_run(run)
    assert meta["step"] == 4 and all(torch.isfinite(p).all() for p in model.parameters())


def test_nan_before_any_checkpoint_says_so(tiny, monkeypatch):
    monkeypatch.setattr(parts_mod, "PeerLM", _NaNAfter)  # the model build_model makes
    _NaNAfter.calls = 3
    with pytest.raises(TrainingDiverged, match="step 2.*no checkpoint was written yet"):
        train(tiny("train.steps=10", "train.ckpt_every=5"))


def test_keep_last_k(tiny):
    run = train(tiny("train.steps=5", "train.ckpt_every=1", "train.keep_last=2"))
    assert [p.name for p in list_checkpoints(run)] == ["step_0000004", "step_0000005"]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_0000004", "step_0000005"]


def test_resume_config_checks(tiny):
    run = train(tiny("train.steps=4"))
    with pytest.raises(ConfigError, match=r"optim\.lr: run has 0\.003, now 0\.001"):
        train(tiny("train.steps=4", "optim.lr=1e-3"), resume=True)
    with pytest.raises(ConfigError, match=r"model\.d_model"):
        train(tiny("train.steps=4", "model.d_model=32"), resume=True)
    with pytest.raises(ConfigError, match="already holds a run"):
        train(tiny("train.steps=4"))
    # more steps is allowed: the run continues to the new end
    train(tiny("train.steps=6", "train.log_every=2"), resume=True)
    assert [m["step"] for m in _metrics(run)] == [1, 2, 3, 4, 6]
    assert load_run(run)[2]["step"] == 6
    with pytest.raises(CheckpointError, match="nothing to resume"):
        train(tiny(out="empty"), resume=True)


def test_load_run_from_run_or_checkpoint_dir(tiny):
    run = train(tiny("train.steps=4", "train.ckpt_every=2", "model.sparse_layer=peer"))
    m1, cfg1, meta1 = load_run(run)
    m2, cfg2, meta2 = load_run(run / "checkpoints" / "step_0000002")
    assert meta1["step"] == 4 and meta2["step"] == 2 and cfg1 == cfg2
    assert not m1.training
    x = torch.randint(0, cfg1.model.vocab_size, (2, 8))
    with torch.no_grad():
        l1, l2 = m1(x).logits, m2(x).logits
    assert not torch.equal(l1, l2)
    # load_run's model reproduces the validation loss logged at the end of training
    from peer.data import eval_batches, open_tokens
    from peer.train.loop import evaluate_loss

    t = cfg1.train
    batches = eval_batches(
        open_tokens(cfg1.data.corpus, "val"),
        t.batch_size,
        t.seq_len,
        max_tokens=t.eval_batches * t.batch_size * t.seq_len,
    )
    assert evaluate_loss(m1, batches, cfg1, torch.device("cpu")) == _metrics(run)[-1]["val_loss"]


def test_bf16_autocast_trains_close_to_fp32(tiny):
    a = _metrics(train(tiny("train.steps=2", out="fp32")))
    b = _metrics(train(tiny("train.steps=2", "train.dtype=bfloat16", out="bf16")))
    assert a[0]["loss"] != b[0]["loss"]  # autocast is on
    assert abs(a[0]["loss"] - b[0]["loss"]) < 0.05


def test_bad_corpus_errors_name_the_field(tiny, tmp_path):
    with pytest.raises(ConfigError, match="data.corpus"):
        train(tiny(f"data.corpus='{tmp_path / 'missing'}'"))
    with pytest.raises(ConfigError, match="data.train_split.*'nope'"):
        train(tiny("data.train_split=nope"))
    with pytest.raises(ConfigError, match="model.vocab_size.*token id"):
        train(tiny("model.vocab_size=16"))
    with pytest.raises(ConfigError, match="data.train_split.*too small"):
        train(tiny("train.batch_size=64"))


def test_gradient_accumulation_syncs_only_the_last_micro_batch(tiny):
    """Under DDP the gradient all-reduce runs once per step: no_sync around all micro-batches but the last."""
    import contextlib

    from peer.data import Batcher, open_tokens
    from peer.model import PeerLM
    from peer.train.parts import forward_backward

    cfg = tiny("train.grad_accum=3")
    model = PeerLM(cfg.model)
    entered = []

    class FakeDDP(torch.nn.Module):  # DDP's interface: forward + no_sync()
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, *a):
            return self.m(*a)

        @contextlib.contextmanager
        def no_sync(self):
            entered.append("no_sync")
            yield

    batcher = Batcher(open_tokens(cfg.data.corpus, "train"), cfg.train.batch_size, cfg.train.seq_len, seed=0)
    forward_backward(FakeDDP(model), batcher, cfg, torch.device("cpu"))
    assert entered == ["no_sync", "no_sync"]
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
