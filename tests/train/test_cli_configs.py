"""`peer train` on the command line, the presets in configs/, and the TOML writer."""

import json
import tomllib
from pathlib import Path

import pytest
from tomli_w import dumps

from peer.cli import main
from peer.config import config_to_dict, load_config
from peer.flops import count_params

ROOT = Path(__file__).resolve().parents[2]
PRESETS = ["dense", "moe", "pkm", "peer"]


def test_cli_train_then_resume(corpus, tmp_path, capsys):
    out = tmp_path / "cli run"
    base = [
        str(ROOT / "configs" / "tiny.toml"),
        "--set",
        f"data.corpus={corpus}",
        "model.vocab_size=64",
        "train.progress=false",
        "--set",
        "train.steps=3",
        "--out",
        str(out),
    ]
    assert main(["train", *base]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    assert json.loads((out / "checkpoints" / "step_0000003" / "meta.json").read_text())["step"] == 3
    # a run directory works as CONFIG (even after a move); --resume continues to the new number of steps
    moved = tmp_path / "moved"
    out.rename(moved)
    assert main(["train", str(moved), "--resume", "--set", "train.steps=5"]) == 0
    assert json.loads((moved / "checkpoints" / "step_0000005" / "meta.json").read_text())["step"] == 5
    out = moved
    # a changed setting is refused with the field named; exit status 2
    assert main(["train", str(out), "--resume", "--set", "optim.lr=0.1"]) == 2
    assert "optim.lr" in capsys.readouterr().err
    assert main(["train", *base, "--set", "train.stepz=3"]) == 2
    assert "train.stepz" in capsys.readouterr().err


def test_cli_train_says_when_a_models_losses_are_not_causal(corpus, tmp_path, capsys):
    base = [str(ROOT / "configs" / "tiny.toml"), "--set", f"data.corpus={corpus}", "model.vocab_size=64"]
    base += ["train.progress=false", "train.steps=1", "model.sparse_layer=moe", "model.moe.num_experts=4"]
    for routing, noted in (("expert_choice", True), ("dropless", False)):
        out = tmp_path / routing
        assert main(["train", *base, f"model.moe.routing={routing}", "--out", str(out)]) == 0
        err = capsys.readouterr().err
        assert ("not causal" in err) == noted, (routing, err)


@pytest.mark.parametrize("name", ["tiny", *PRESETS])
def test_presets_load_and_round_trip_through_toml(name):
    cfg = load_config(ROOT / "configs" / f"{name}.toml")
    d = config_to_dict(cfg)
    assert tomllib.loads(dumps(d)) == d


def test_presets_share_one_backbone():
    cfgs = {n: load_config(ROOT / "configs" / f"{n}.toml") for n in PRESETS}

    def backbone(c):
        return {k: v for k, v in config_to_dict(c.model).items() if k not in ("sparse_layer", "peer", "pkm", "moe")}

    ref = backbone(cfgs["dense"])
    for name, cfg in cfgs.items():
        assert backbone(cfg) == ref, name
        assert cfg.model.sparse_layer == ("none" if name == "dense" else name)
        assert cfg.model.sparse_block_ids() in ([], [cfg.model.n_layers // 2])
        assert config_to_dict(cfg.train) | {"out_dir": ""} == config_to_dict(cfgs["dense"].train) | {"out_dir": ""}
        assert cfg.data.corpus == "data/starter"
    # CPU scale: every preset fits comfortably in memory with its Adam state (< 100M parameters)
    assert all(count_params(c.model).total < 100e6 for c in cfgs.values())


def test_run_config_toml_round_trips_awkward_paths_and_numbers():
    """config.toml (written with tomli-w) reads back equal: quotes, backslashes, unicode, 1e-8, lists."""
    cfg = load_config(
        ROOT / "configs" / "peer.toml",
        ["train.out_dir='r\\u\"n é/x y'", "optim.eps=1e-8", "model.sparse_blocks=[0, 2]"],
    )
    d = config_to_dict(cfg)
    assert tomllib.loads(dumps(d)) == d


def test_cli_output_into_a_closed_pipe_is_quiet(tmp_path):
    # `peer ... | head -1`: the reader leaves early; the command ends quietly, no BrokenPipeError traceback
    import subprocess
    import sys

    script = tmp_path / "many_lines.py"
    script.write_text(
        "import sys, types\n"
        "import peer.cli as cli\n"
        "m = types.ModuleType('many_lines')\n"
        "m.add_arguments = lambda p: None\n"
        "def run(args):\n"
        "    for i in range(200000):\n"
        "        print('line', i, flush=True)\n"
        "m.run = run\n"
        "sys.modules['many_lines'] = m\n"
        "cli.COMMANDS['many'] = ('many_lines', 'prints many lines')\n"
        "sys.exit(cli.main(['many']))\n"
    )
    res = subprocess.run(
        f"{sys.executable} {script} | head -1", shell=True, capture_output=True, text=True, timeout=120
    )
    assert res.stdout == "line 0\n"
    assert "Traceback" not in res.stderr and "BrokenPipe" not in res.stderr, res.stderr
