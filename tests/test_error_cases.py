"""Bad input and a hostile environment (a full disk, Ctrl-C, nonsense arguments) get one clear line and
lose nothing: each case as a new user meets it, through the command line where it is one."""

from __future__ import annotations

import errno
import importlib
import importlib.util
from pathlib import Path

import pytest
import torch

from peer.cli import main
from peer.errors import DiskFull, disk_full_as_error, is_disk_full


def _one_line(capsys) -> tuple[str, str]:
    out, err = capsys.readouterr()
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return out, err


# ------------------------------------------------------------------ a full disk
@pytest.mark.parametrize(
    "exc",
    [
        OSError(errno.ENOSPC, "No space left on device"),
        RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 2304 vs 2192"),  # torch.save
        Exception(
            'Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space left on device" })'
        ),
    ],
)
def test_disk_full_errors_are_recognised(tmp_path, exc):
    assert is_disk_full(exc)
    with pytest.raises(DiskFull, match=r"no space left on the device of .*MiB free.* while writing the thing"):
        with disk_full_as_error(tmp_path / "x", "the thing"):
            raise exc
    with pytest.raises(ValueError, match="unrelated"):  # anything else passes through unchanged
        with disk_full_as_error(tmp_path / "x", "the thing"):
            raise ValueError("unrelated")


def test_checkpoint_on_a_full_disk_leaves_the_earlier_one_intact(tmp_path, monkeypatch):
    from peer.train import checkpoint as ck

    model = torch.nn.Linear(3, 2)
    ck.save_checkpoint(tmp_path, model, {"x": 1}, {"step": 1})
    before = {p.name: p.read_bytes() for p in (tmp_path / "checkpoints" / "step_0000001").iterdir()}

    def full(*a, **k):
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 2304 vs 2192")

    monkeypatch.setattr(ck.torch, "save", full)
    with pytest.raises(DiskFull, match="step_0000002.*checkpoint step 2"):
        ck.save_checkpoint(tmp_path, model, {"x": 2}, {"step": 2})
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_0000001"]  # no partial left
    assert {p.name: p.read_bytes() for p in (tmp_path / "checkpoints" / "step_0000001").iterdir()} == before


def test_a_new_folder_on_a_full_disk_is_not_left_behind(tmp_path, monkeypatch):
    from peer import fsutil

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(fsutil.os, "pwrite", full)
    target = tmp_path / "new" / "run"
    with pytest.raises(DiskFull, match="run folder's lock file"):
        with fsutil.FolderLock(target, "run folder"):
            pass
    assert not (tmp_path / "new").exists()  # neither the lock file nor the folders it made


def test_a_split_on_a_full_disk_leaves_no_temp_file(tmp_path, monkeypatch):
    from peer.data import tokens

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(tokens, "publish", full)
    with pytest.raises(DiskFull, match="split 'train'"):
        tokens.write_split(tmp_path, "train", ["d0"], [[1, 2, 3]], eos_id=0, vocab_size=10)
    assert list((tmp_path / "splits").iterdir()) == []


def test_the_cli_reports_any_full_disk_in_one_line(monkeypatch, capsys):
    import peer.demo

    def full(args):
        raise OSError(errno.ENOSPC, "No space left on device", "/some/file")

    monkeypatch.setattr(peer.demo, "run", full)
    assert main(["demo"]) == 2
    _, err = _one_line(capsys)
    assert err.startswith("peer demo: error: no space left on the device of '/some/file'")


# ------------------------------------------------------------------ Ctrl-C
@pytest.mark.parametrize(
    "command, module", [(["eval", "RUN"], "peer.eval"), (["data", "tokenize", "X", "--out", "Y"], "peer.data.cli")]
)
def test_ctrl_c_is_one_line_and_exit_130(command, module, monkeypatch, capsys):
    mod = importlib.import_module(module)

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(mod, "run", interrupted)
    assert main(command) == 130
    _, err = _one_line(capsys)
    assert err == f"peer {command[0]}: interrupted\n"


# ------------------------------------------------------------------ arguments
def test_export_without_transformers_says_what_to_install(monkeypatch, capsys, tmp_path):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "transformers" else real(name, *a)
    )
    assert main(["export", str(tmp_path / "run"), str(tmp_path / "out")]) == 2
    _, err = _one_line(capsys)
    assert 'pip install "peer-experts[hf]"' in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "flag, value, field",
    [
        ("--temperature", "nan", "temperature"),
        ("--temperature", "inf", "temperature"),
        ("--temperature", "-1", "temperature"),
        ("--top-p", "nan", "top_p"),
        ("--top-k", "-3", "top_k"),
        ("--max-new-tokens", "-1", "max_new_tokens"),
    ],
)
def test_generate_checks_its_arguments_before_printing_anything(flag, value, field, capsys, tmp_path):
    # checked before the run is even opened: the prompt is never echoed in front of the error
    assert main(["generate", str(tmp_path / "no-run"), "--prompt", "The", flag, value]) == 2
    out, err = _one_line(capsys)
    assert out == "" and err.startswith(f"peer generate: error: {field} must be")


@pytest.mark.parametrize(
    "args, message",
    [
        (["--experts", "1000"], "--experts must be a positive perfect square"),
        (["--experts", "49"], "--experts must be at least 64"),
        (["--steps", "0"], "--steps must be a positive integer"),
        (["--steps", "-1"], "--steps must be a positive integer"),
    ],
)
def test_demo_refuses_bad_arguments_in_one_line(args, message, capsys):
    assert main(["demo", *args]) == 2
    out, err = _one_line(capsys)
    assert out == "" and message in err


def test_a_model_too_large_for_memory_is_refused_before_its_folder_exists(tmp_path, capsys):
    out_dir = tmp_path / "runs" / "huge"
    tiny = Path(__file__).resolve().parents[1] / "configs" / "tiny.toml"
    assert main(["train", str(tiny), "--out", str(out_dir), "--set", "model.d_model=100000000"]) == 2
    _, err = capsys.readouterr()
    assert "Traceback" not in err and "GiB for the weights alone" in err and "model.d_model" in err
    assert not (tmp_path / "runs").exists()  # no config.toml, no .peer.lock left behind


def test_version(capsys):
    from importlib.metadata import version

    assert main(["--version"]) == 0
    assert capsys.readouterr().out == f"peer {version('peer-experts')}\n"


def test_an_unknown_set_key_lists_the_known_ones(capsys, tmp_path):
    tiny = Path(__file__).resolve().parents[1] / "configs" / "tiny.toml"
    assert main(["train", str(tiny), "--out", str(tmp_path / "r"), "--set", "model.peer.topkk=3"]) == 2
    _, err = _one_line(capsys)
    assert "model.peer.topkk: unknown setting; known settings here:" in err and "topk," in err
    assert main(["train", str(tiny), "--out", str(tmp_path / "r"), "--set", "modle.d_model=3"]) == 2
    assert "modle: unknown setting; known settings here: data, dist, model, optim, train" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_the_training_bar_shows_only_on_a_terminal(tmp_path, monkeypatch):
    from peer.config import load_config
    from peer.distributed import current_env
    from peer.train.parts import StepLog

    cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / "tiny.toml")
    cfg.model.vocab_size = 64
    for tty in (False, True):
        monkeypatch.setattr("sys.stderr.isatty", lambda tty=tty: tty)
        log = StepLog(cfg, tmp_path, 0, 10, current_env(), diverged=None)
        assert log.bar.disable is (not tty)
        log.bar.close()


@pytest.mark.parametrize("setting", ["optim.lr=nan", "optim.lr=inf", "optim.lr=-1", "dist.timeout_s=nan"])
def test_a_non_finite_setting_says_so(setting, capsys, tmp_path):
    tiny = Path(__file__).resolve().parents[1] / "configs" / "tiny.toml"
    assert main(["train", str(tiny), "--out", str(tmp_path / "r"), "--set", setting]) == 2
    _, err = _one_line(capsys)
    assert f"{setting.split('=')[0]}: must be a positive number, got {setting.split('=')[1]}" in err


def test_a_folder_given_as_a_file_and_a_file_given_as_a_folder_say_what_they_are(tmp_path, capsys):
    a_file = tmp_path / "notes.txt"
    a_file.write_text("x", encoding="utf-8")
    assert main(["eval", str(tmp_path / "run"), "--text", str(tmp_path)]) == 2  # checked before the run is read
    assert "is a folder, not a text file" in _one_line(capsys)[1]
    assert main(["export", str(a_file), str(tmp_path / "out")]) == 2
    assert "is a file, not a run or checkpoint folder" in _one_line(capsys)[1]
    assert main(["export", str(tmp_path / "run"), str(a_file)]) == 2
    assert "is a file, not a folder" in _one_line(capsys)[1]
    assert a_file.read_text(encoding="utf-8") == "x"
