"""Hardening of `peer train` (issue: no command loses data, every user error is one clear line):
folder locks, devices and budgets that cannot run, stopping on SIGTERM with a checkpoint, and
non-finite values that must not enter BatchNorm statistics."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from peer.cli import main
from peer.config import ConfigError, load_config
from peer.fsutil import FolderBusy, FolderLock, folder_kind

ROOT = Path(__file__).resolve().parents[2]


def _base(corpus, out, *more):
    return [
        str(ROOT / "configs" / "tiny.toml"),
        "--set",
        f"data.corpus={corpus}",
        "model.vocab_size=64",
        "train.progress=false",
        "train.tensorboard=false",
        "train.threads=1",
        *more,
        "--out",
        str(out),
    ]


def _one_error_line(err: str) -> bool:
    """Exactly one ``error:`` line and no traceback (a progress line before it is fine)."""
    return "Traceback" not in err and sum("error:" in line for line in err.splitlines()) == 1


def _hold_lock(folder: Path) -> subprocess.Popen:
    """Another process that holds ``folder``'s lock until killed."""
    code = (
        "import sys, time; from peer.fsutil import FolderLock\n"
        f"with FolderLock({str(folder)!r}):\n    print('held', flush=True); time.sleep(60)"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_second_train_on_a_locked_run_folder_fails_naming_the_pid(corpus, tmp_path, capsys):
    out = tmp_path / "run"
    holder = _hold_lock(out)
    try:
        assert main(["train", *_base(corpus, out, "--set", "train.steps=2")]) == 2
        err = capsys.readouterr().err
        assert f"pid {holder.pid}" in err and _one_error_line(err), err
        assert not (out / "config.toml").exists() and not (out / "metrics.jsonl").exists()
    finally:
        holder.kill()
        holder.wait()
    assert main(["train", *_base(corpus, out, "--set", "train.steps=2")]) == 0  # released when the holder died


def test_lock_is_reentrant_in_one_process_and_exclusive_across(tmp_path):
    d = tmp_path / "x"
    with FolderLock(d):
        with FolderLock(d):  # nested: no deadlock
            pass
        code = f"from peer.fsutil import FolderLock\nwith FolderLock({str(d)!r}): pass"
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        assert r.returncode != 0 and "FolderBusy" in r.stderr and f"pid {os.getpid()}" in r.stderr
    with FolderLock(d):  # released: this process can take it again
        pass
    assert issubclass(FolderBusy, __import__("peer.errors").errors.PeerError)


@pytest.mark.parametrize("device,msg", [("cuda", "no CUDA device"), ("foo", "not a device"), ("cuda:7", "CUDA")])
def test_unusable_device_is_one_line_and_leaves_no_folder(corpus, tmp_path, capsys, device, msg):
    if torch.cuda.is_available() and device != "foo":
        pytest.skip("this machine has CUDA")
    out = tmp_path / "sub" / "run"
    assert main(["train", *_base(corpus, out, "--set", f"train.device={device}", "train.steps=2")]) == 2
    err = capsys.readouterr().err
    assert "train.device" in err and msg in err and _one_error_line(err), err
    assert not out.exists() and not out.parent.exists()


def test_out_naming_a_file_is_one_line(corpus, tmp_path, capsys):
    f = tmp_path / "afile"
    f.write_text("keep me")
    assert main(["train", *_base(corpus, f, "--set", "train.steps=2")]) == 2
    err = capsys.readouterr().err
    assert "is a file" in err and _one_error_line(err)
    assert f.read_text() == "keep me"


def test_infinite_budget_and_steps_next_to_a_budget_are_errors(corpus, tmp_path, capsys):
    with pytest.raises(ConfigError, match="train.flops"):
        load_config(ROOT / "configs" / "tiny.toml", ["train.flops=inf"])
    assert main(["train", *_base(corpus, tmp_path / "r", "--set", "train.flops=1e9", "train.steps=5")]) == 2
    err = capsys.readouterr().err
    assert "train.steps" in err and "train.flops=0" in err and _one_error_line(err)
    assert not (tmp_path / "r").exists()


def test_internal_errors_keep_their_traceback(monkeypatch):
    """The CLI turns the project's error types into one line, not every ValueError (a bug stays visible)."""
    import peer.demo

    def boom(args):
        raise ValueError("an internal bug")

    monkeypatch.setattr(peer.demo, "run", boom)
    with pytest.raises(ValueError, match="internal bug"):
        main(["demo"])


def test_sigterm_saves_a_checkpoint_at_the_current_step_and_resume_finishes(corpus, tmp_path):
    out = tmp_path / "run"
    args = _base(corpus, out, "--set", "train.steps=100000", "train.ckpt_every=100000", "train.log_every=1")
    proc = subprocess.Popen(
        [sys.executable, "-m", "peer", "train", *args],
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (metrics.is_file() and len(metrics.read_text().splitlines()) >= 3):
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "stopped by SIGTERM" in err and "--resume" in err
    ckpts = sorted((out / "checkpoints").glob("step_*"))
    assert len(ckpts) == 1  # none was due (ckpt_every is huge): this one is the signal's
    step = json.loads((ckpts[0] / "meta.json").read_text())["step"]
    logged = [json.loads(line)["step"] for line in metrics.read_text().splitlines()]
    assert step == logged[-1] >= 3  # the checkpoint is at the last finished step: no work is redone
    assert main(["train", str(out), "--resume", "--set", "train.flops=0", f"train.steps={step + 2}"]) == 0
    assert json.loads((out / "checkpoints" / f"step_{step + 2:07d}" / "meta.json").read_text())["step"] == step + 2


@pytest.mark.parametrize("layer", ["peer", "pkm"])
def test_a_nan_token_does_not_poison_batchnorm_statistics(layer):
    from peer.layers import PEER
    from peer.layers.pkm import PKM

    torch.manual_seed(0)
    m = (
        PEER(16, num_experts=64, heads=2, topk=4, key_dim=8)
        if layer == "peer"
        else PKM(16, num_memories=64, heads=2, topk=4, key_dim=8)
    )
    m.train()
    m(torch.randn(32, 16))
    before = {k: v.clone() for k, v in m.query_norm.state_dict().items()}
    x = torch.randn(32, 16)
    x[3, 5] = float("nan")
    y = m(x)
    assert not torch.isfinite(y).all()  # the bad batch still shows (the loss turns NaN, training stops)
    for k, v in m.query_norm.state_dict().items():
        assert torch.equal(v, before[k]), k  # ... but the running statistics kept their values
    m(torch.randn(32, 16))  # a clean batch updates them again
    assert not torch.equal(m.query_norm.running_mean, before["running_mean"])
    m.eval()
    assert torch.isfinite(m(torch.randn(8, 16))).all()


def test_folder_kind(tmp_path):
    assert folder_kind(tmp_path / "missing") is None
    (tmp_path / "empty").mkdir()
    assert folder_kind(tmp_path / "empty") is None
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    assert folder_kind(tmp_path / "run") == "run"
    (tmp_path / "c" / "splits").mkdir(parents=True)
    assert folder_kind(tmp_path / "c") == "corpus"
    (tmp_path / "e").mkdir()
    (tmp_path / "e" / "config.json").write_text(json.dumps({"peer_source": {}}))
    assert folder_kind(tmp_path / "e") == "export"
    (tmp_path / "e" / "notes.txt").write_text("x")
    assert folder_kind(tmp_path / "e") == "other"


def test_a_run_folder_is_portable(corpus, tmp_path, monkeypatch, capsys):
    """Trained with a relative corpus path in one directory, the run resumes and evaluates from any other,
    accepts the corpus spelled as an absolute path, still evaluates after being moved, and a missing
    corpus is a clear error (never a silent drop of the corpus splits)."""
    import shutil

    work = tmp_path / "work"
    shutil.copytree(corpus, work / "data" / "c")
    monkeypatch.chdir(work)
    args = [
        str(ROOT / "configs" / "tiny.toml"),
        "--set",
        "data.corpus=data/c",
        "model.vocab_size=64",
        "train.progress=false",
        "train.tensorboard=false",
        "train.threads=1",
        "train.steps=2",
        "--out",
        "runs/r",
    ]
    assert main(["train", *args]) == 0
    run = work / "runs" / "r"
    assert f'corpus = "{work / "data" / "c"}"' in (run / "config.toml").read_text()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert main(["train", str(run), "--resume", "--set", "train.steps=3"]) == 0
    assert main(["train", str(run), "--resume", "--set", f"data.corpus={work / 'data' / 'c'}", "train.steps=4"]) == 0
    assert (
        main(["train", str(run), "--resume", "--set", f"data.corpus={work / 'data' / '.' / 'c'}", "train.steps=5"]) == 0
    )
    moved = tmp_path / "moved_run"
    run.rename(moved)
    capsys.readouterr()
    assert main(["eval", str(moved), "--json"]) == 0
    sets = json.loads(capsys.readouterr().out)["sets"]
    assert "val" in sets
    text = tmp_path / "t.txt"
    text.write_text("hello world " * 50)
    (work / "data" / "c").rename(work / "data" / "gone")
    assert main(["eval", str(moved), "--text", str(text)]) == 2
    err = capsys.readouterr().err
    assert "does not exist" in err and "--corpus" in err and _one_error_line(err)
    assert main(["eval", str(moved), "--corpus", str(work / "data" / "gone"), "--json"]) == 0
    assert "val" in json.loads(capsys.readouterr().out)["sets"]


def test_eval_text_that_is_not_utf8(tmp_path, capsys):
    """The error suggests --replace-errors, and peer eval has that option."""
    from peer.data.userdata import build_corpus

    words = "the state of the union is strong and the people are free to speak and vote".split()
    rng = __import__("random").Random(0)
    for i in range(8):
        (tmp_path / "in").mkdir(exist_ok=True)
        (tmp_path / "in" / f"d{i}.txt").write_text(" ".join(rng.choice(words) for _ in range(400)))
    build_corpus([tmp_path / "in"], tmp_path / "c", vocab_size=300, min_tokens=100, log=lambda *_: None)
    out = tmp_path / "r"
    args = [
        str(ROOT / "configs" / "tiny.toml"),
        "--set",
        f"data.corpus={tmp_path / 'c'}",
        "model.vocab_size=300",
        "train.progress=false",
        "train.tensorboard=false",
        "train.threads=1",
        "train.steps=2",
        "--out",
        str(out),
    ]
    assert main(["train", *args]) == 0
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"fine text " * 40 + b"\xff\xfe broken " + b"more text " * 40)
    capsys.readouterr()
    assert main(["eval", str(out), "--text", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "--replace-errors" in err and _one_error_line(err)
    assert main(["eval", str(out), "--text", str(bad), "--replace-errors", "--json"]) == 0
    assert "bad.txt" in json.loads(capsys.readouterr().out)["sets"]


def test_corrupted_latest_checkpoint_names_the_newest_intact_one(corpus, tmp_path, capsys):
    out = tmp_path / "run"
    assert (
        main(["train", *_base(corpus, out, "--set", "train.steps=4", "train.ckpt_every=2", "train.keep_last=3")]) == 0
    )
    latest = out / "checkpoints" / "step_0000004" / "model.safetensors"
    data = bytearray(latest.read_bytes())
    data[-5] ^= 0xFF
    latest.write_bytes(bytes(data))
    capsys.readouterr()
    resume = ["train", str(out), "--resume", "--set", "train.flops=0", "train.steps=6"]
    assert main(resume) == 2
    err = capsys.readouterr().err
    intact = out / "checkpoints" / "step_0000002"
    assert "corrupted" in err and str(intact) in err and f"--from {intact}" in err and _one_error_line(err), err
    assert latest.is_file()  # nothing was deleted
    # eval, generate and export of the run name the same intact checkpoint, and work when given it
    for cmd in (
        ["eval", str(out)],
        ["generate", str(out), "--max-new-tokens", "2"],
        ["export", str(out), str(tmp_path / "hf")],
    ):
        assert main(cmd) == 2, cmd
        err = capsys.readouterr().err
        assert "corrupted" in err and f"give that checkpoint instead of the run: {intact}" in err, err
        assert _one_error_line(err)
    assert not (tmp_path / "hf").exists()
    assert main(["eval", str(intact), "--batches", "1"]) == 0
    capsys.readouterr()
    assert main([*resume, "--from", str(intact)]) == 0
    assert json.loads((out / "checkpoints" / "step_0000006" / "meta.json").read_text())["step"] == 6
    assert main(["train", *_base(corpus, tmp_path / "x", "--set", "train.steps=2"), "--from", str(intact)]) == 2


def test_bench_with_a_missing_optional_implementation_is_one_line(capsys):
    import importlib.util

    if importlib.util.find_spec("PEER_pytorch") is not None:
        pytest.skip("peer-pytorch is installed here")
    assert main(["bench", "layer", "--impls", "peer-pytorch", "--experts", "16"]) == 2
    err = capsys.readouterr().err
    assert "peer-pytorch is not installed" in err and _one_error_line(err)


def test_checkpoints_and_plots_follow_the_umask(corpus, tmp_path):
    import stat

    out = tmp_path / "run"
    old = os.umask(0o022)
    try:
        assert main(["train", *_base(corpus, out, "--set", "train.steps=2")]) == 0
        assert main(["plot", str(out), "--out", str(tmp_path / "plots")]) == 0
    finally:
        os.umask(old)
    files = [*(out / "checkpoints").glob("*/*"), *(tmp_path / "plots").glob("*.png")]
    assert any(f.suffix == ".png" for f in files) and any(f.name == "model.safetensors" for f in files)
    for f in files:
        assert stat.S_IMODE(f.stat().st_mode) == 0o644, f


def test_vocab_size_zero_is_taken_from_the_corpus_tokenizer(corpus, tmp_path):
    """tiny.toml ships vocab_size = 0: a run takes the corpus tokenizer's size and stores it."""
    import shutil

    from peer.data import train_tokenizer
    from peer.train import train
    from peer.train.loop import with_corpus_vocab

    corpus = Path(shutil.copytree(corpus, tmp_path / "corpus"))  # a copy: a tokenizer is added below
    tok = train_tokenizer(["some text to learn a few merges from, " * 40], vocab_size=300)
    assert tok.vocab_size >= 64  # the synthetic corpus holds ids < 64
    cfg = load_config(
        ROOT / "configs" / "tiny.toml",
        [
            f"data.corpus='{corpus}'",
            f"train.out_dir='{tmp_path / 'run'}'",
            "train.steps=1",
            "train.progress=false",
            "train.tensorboard=false",
            "train.threads=1",
        ],
    )
    assert cfg.model.vocab_size == 0
    with pytest.raises(ConfigError, match="model.vocab_size: 0 takes the size of the run's tokenizer"):
        with_corpus_vocab(cfg)  # the corpus has no tokenizer.json yet: no guess
    tok.save(corpus / "tokenizer.json")
    assert with_corpus_vocab(cfg).model.vocab_size == tok.vocab_size
    run = train(cfg)
    assert f"vocab_size = {tok.vocab_size}" in (run / "config.toml").read_text()
    missing = load_config(ROOT / "configs" / "tiny.toml", [f"data.corpus='{tmp_path / 'not-yet'}'"])
    assert with_corpus_vocab(missing).model.vocab_size == missing.data.vocab_size  # what `prepare` builds


def test_a_resume_without_its_metrics_file_says_so(corpus, tmp_path, capsys, caplog):
    out = tmp_path / "run"
    assert main(["train", *_base(corpus, out, "--set", "train.steps=2", "train.log_every=1")]) == 0
    (out / "metrics.jsonl").unlink()
    capsys.readouterr()
    assert main(["train", str(out), "--resume", "--set", "train.flops=0", "train.steps=4"]) == 0
    # the CLI's logging prints it on stderr; under pytest the log capture holds it
    assert "metrics.jsonl is missing: the metrics of steps 1-2 are lost" in caplog.text
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps and min(steps) >= 3
