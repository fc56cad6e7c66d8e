"""The shipped presets (configs/{dense,moe,pkm,peer}.toml: what `peer main` and a new user train) are
the confirmation study's frozen recipes: field for field (model and optimizer), the configs its runs
trained with (results/confirm/final/1.5e13/<method>/d48_l4/seed100/config.toml; docs/confirmation.md).
A preset edited away from its recipe fails here."""

from __future__ import annotations

from pathlib import Path

import pytest

from peer.config import PRESETS_DIR, config_to_dict, load_config

ROOT = Path(__file__).resolve().parents[1]


def _norm(cfg) -> tuple[dict, dict]:
    """The model and optimizer settings that decide what trains (d_ff 0 means 4 d; the settings of sparse
    layers the model does not have, and a dense model's expert/key optimizer settings, do nothing)."""
    m = config_to_dict(cfg.model) | {"d_ff": cfg.model.ffn_dim}
    m = {k: v for k, v in m.items() if k not in {"peer", "pkm", "moe"} - {cfg.model.sparse_layer}}
    o = config_to_dict(cfg.optim)
    if cfg.model.sparse_layer == "none":
        o = {k: v for k, v in o.items() if not k.startswith(("expert_", "key_"))}
    return m, o


@pytest.mark.parametrize("method", ["dense", "moe", "pkm", "peer"])
def test_preset_is_the_frozen_recipe(method):
    preset = load_config(PRESETS_DIR / f"{method}.toml")
    trained = load_config(ROOT / "results/confirm/final/1.5e13" / method / "d48_l4/seed100/config.toml")
    for section, got, want in zip(("model", "optim"), _norm(preset), _norm(trained), strict=True):
        diff = {k: (got.get(k), want[k]) for k in want if got.get(k) != want[k]}
        assert not diff and got.keys() == want.keys(), f"{method}.toml [{section}] (preset, recipe): {diff}"
    assert (preset.train.batch_size, preset.train.seq_len) == (trained.train.batch_size, trained.train.seq_len)
    from peer.train.loop import resolve_steps

    assert preset.train.flops == 1.5e13 and resolve_steps(preset) == trained.train.steps  # the same budget


def test_the_moe_preset_is_causal():
    import torch

    from peer.model import PeerLM

    with torch.device("meta"):
        assert PeerLM(load_config(PRESETS_DIR / "moe.toml").model).noncausal_layers() == []
