"""Knobs that give every method the same kind of tuning (issue 28's equal-effort protocol): the backbone's
init scale (dense) and the PKM value table's init scale (PEER's `value_init_scale`), defaults unchanged."""

from __future__ import annotations

import math

import pytest
import torch

from peer.config import ConfigError, ModelConfig, load_config
from peer.layers.pkm import PKM
from peer.model import PeerLM


def _lm(**kw) -> PeerLM:
    cfg = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=2, d_ff=64, max_seq_len=16, **kw)
    cfg.pkm.num_memories, cfg.pkm.heads, cfg.pkm.topk, cfg.pkm.key_dim = 256, 2, 4, 8
    torch.manual_seed(0)
    return PeerLM(cfg)


def test_init_std_scales_the_backbone_and_its_default_is_gpt2s():
    base, wide = _lm(), _lm(init_std=0.05)
    assert torch.equal(_lm(init_std=0.02).tok_emb.weight, base.tok_emb.weight)  # the default, drawn the same
    ratio = (wide.tok_emb.weight.std() / base.tok_emb.weight.std()).item()
    assert ratio == pytest.approx(2.5, rel=1e-5)  # same draws, scaled
    proj = (wide.blocks[0].attn.proj.weight.std() / base.blocks[0].attn.proj.weight.std()).item()
    assert proj == pytest.approx(2.5, rel=1e-5)  # residual projections too (with their 1/sqrt(2L))


def test_pkm_value_init_scale():
    torch.manual_seed(0)
    a = PKM(16, 256, heads=2, topk=4, key_dim=8)
    torch.manual_seed(0)
    b = PKM(16, 256, heads=2, topk=4, key_dim=8, value_init_scale=0.1)
    assert a.values.std().item() == pytest.approx(math.sqrt(4 / 2), rel=0.05)
    torch.testing.assert_close(b.values, 0.1 * a.values)
    with pytest.raises(ValueError, match="value_init_scale"):
        PKM(16, 256, heads=2, topk=4, key_dim=8, value_init_scale=0.0)


@pytest.mark.parametrize(
    "override,field",
    [("model.init_std=0", "model.init_std"), ("model.pkm.value_init_scale=-1", "model.pkm.value_init_scale")],
)
def test_bad_values_name_their_field(override, field):
    from tests.train.conftest import ROOT

    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        load_config(ROOT / "configs" / "tiny.toml", ["model.sparse_layer=pkm", override])


def test_a_run_written_before_a_field_existed_resumes(tiny):
    """A config field added later counts as its default in an older run's config."""
    from peer.config import config_to_dict
    from peer.train.loop import check_resume_config

    cfg = tiny()
    old = config_to_dict(cfg)
    del old["model"]["init_std"], old["model"]["pkm"]["value_init_scale"]
    check_resume_config(old, cfg, cfg.train.out_dir)  # no error
    with pytest.raises(ConfigError, match="model.init_std"):
        check_resume_config(old, tiny("model.init_std=0.03"), cfg.train.out_dir)
