"""The config tree: TOML in, --set overrides, validation errors that name the field."""

import pytest

from peer.config import Config, ConfigError, apply_overrides, config_from_dict, config_to_dict, load_config


def test_defaults_round_trip():
    cfg = Config()
    assert config_from_dict(config_to_dict(cfg)) == cfg


def test_toml_and_overrides(tmp_path):
    p = tmp_path / "c.toml"
    p.write_text(
        '[model]\nd_model = 128\nsparse_layer = "peer"\n[model.peer]\nnum_experts = 4096\ntopk = 8\n[train]\nsteps = 5\n'
    )
    cfg = load_config(p, ["model.peer.heads=2", "train.flops=3e13", "model.sparse_blocks=[0, 1]", "optim.fused=false"])
    assert cfg.model.d_model == 128 and cfg.model.peer.num_experts == 4096 and cfg.model.peer.topk == 8
    assert cfg.model.peer.heads == 2 and cfg.train.flops == 3e13 and cfg.model.sparse_blocks == [0, 1]
    assert cfg.optim.fused is False
    assert cfg.model.sparse_block_ids() == [0, 1]


@pytest.mark.parametrize(
    "override,field",
    [
        ("model.peer.num_experts=1000", "model.peer.num_experts"),
        ("model.peer.key_dim=7", "model.peer.key_dim"),
        ("model.peer.topk=100", "model.peer.topk"),
        ("model.peer.activation=tanh", "model.peer.activation"),
        ("model.n_heads=3", "model.n_heads"),
        ("train.batch_size=0", "train.batch_size"),
        ("model.nope=1", "model.nope"),
        ("train.steps=abc", "train.steps"),
        ("model.sparse_blocks=[9]", "model.sparse_blocks"),
        ("train.seq_len=100000", "train.seq_len"),
    ],
)
def test_errors_name_the_field(override, field):
    base = Config()
    base.model.sparse_layer = "peer"
    base.model.peer.num_experts = 64 * 64
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        apply_overrides(base, [override])


def test_coercion_of_cli_and_toml_values():
    """What the hand-written coercion does that cattrs/pydantic do not (see config.py): a float in
    exponent form is an integer when whole, a string bool is read, not taken as truthy; a fraction
    is not an integer and a bool is not a number."""
    cfg = apply_overrides(Config(), ["train.steps=1e4", "train.tensorboard=off"])
    assert cfg.train.steps == 10000 and type(cfg.train.steps) is int and cfg.train.tensorboard is False
    assert config_from_dict({"train": {"tensorboard": "false", "steps": 2.0}}).train.tensorboard is False
    for bad in ("train.steps=1.5", "train.steps=true", "optim.lr=true", "train.tensorboard=maybe"):
        with pytest.raises(ConfigError, match=bad.split("=")[0].replace(".", r"\.")):
            apply_overrides(Config(), [bad])


def test_literal_error_lists_allowed_values():
    with pytest.raises(ConfigError, match="'softmax', 'sigmoid'"):
        config_from_dict({"model": {"peer": {"score": "tanh"}}})


def test_missing_and_invalid_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[model\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(bad)


def test_presets_are_found_from_any_directory(tmp_path, monkeypatch):
    """The presets ship inside the package (an installed wheel has no ./configs): from a directory
    without them, configs/NAME.toml and NAME.toml resolve to the shipped copies, sweeps included."""
    from peer.config import PRESETS_DIR, find_preset, load_config
    from peer.experiments.sweep import load_sweep, plan

    assert (PRESETS_DIR / "peer.toml").is_file() and (PRESETS_DIR / "recipe" / "d64_1.5e13.toml").is_file()
    monkeypatch.chdir(tmp_path)
    assert find_preset("configs/peer.toml") == PRESETS_DIR / "peer.toml" == find_preset("peer.toml")
    assert load_config("configs/peer.toml").model.sparse_layer == "peer"
    spec = load_sweep("configs/sweep.toml")
    assert plan(spec)[0].config.model.vocab_size == 2048  # its base, next to the sweep file
    (tmp_path / "peer.toml").write_text("[model]\nd_model = 32\nn_heads = 2\n")
    assert load_config("peer.toml").model.d_model == 32  # a file here wins over the preset
