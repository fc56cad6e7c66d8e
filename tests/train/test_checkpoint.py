"""Checkpoint files: round trip, atomic layout, keep-last-K, and clear errors on corruption or mismatch."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from peer.config import config_to_dict, load_config
from peer.model import PeerLM
from peer.train.checkpoint import (
    CheckpointError,
    list_checkpoints,
    load_model_weights,
    load_state,
    resolve_checkpoint,
    save_checkpoint,
)

ROOT = Path(__file__).resolve().parents[2]


def _cfg(*overrides):
    return load_config(ROOT / "configs" / "tiny.toml", ["model.vocab_size=64", *overrides])


def _save(run, model, cfg, step, keep_last=0, state=None):
    meta = {"step": step, "tokens": 0, "flops": 0.0, "config": config_to_dict(cfg)}
    return save_checkpoint(run, model, state if state is not None else {"step": step}, meta, keep_last)


def test_round_trip_keeps_weights_and_tying(tmp_path):
    cfg = _cfg("model.sparse_layer=peer")
    torch.manual_seed(0)
    a = PeerLM(cfg.model)
    ck = _save(tmp_path, a, cfg, 3)
    assert ck.name == "step_0000003" and (ck / "model.safetensors").is_file()
    meta = json.loads((ck / "meta.json").read_text())
    assert meta["tied"] == {"lm_head.weight": "tok_emb.weight"}
    torch.manual_seed(1)
    b = PeerLM(cfg.model)
    load_model_weights(ck, b)
    for (n, p), q in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(p, q), n
    assert b.lm_head.weight.data_ptr() == b.tok_emb.weight.data_ptr()  # still tied after loading


def test_round_trip_keeps_a_shared_expert_pool(tmp_path):
    cfg = _cfg("model.sparse_layer=peer", "model.n_layers=3", "model.sparse_blocks=all", "model.share_experts=true")
    torch.manual_seed(0)
    a = PeerLM(cfg.model)
    ck = _save(tmp_path, a, cfg, 1)
    torch.manual_seed(1)
    b = PeerLM(cfg.model)
    load_model_weights(ck, b)
    for (n, p), q in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(p, q), n
    layers = list(b.sparse_layers().values())
    assert all(m.u.data_ptr() == layers[0].u.data_ptr() and m.v is layers[0].v for m in layers)


def test_state_round_trip_with_numpy(tmp_path):
    cfg = _cfg()
    model = PeerLM(cfg.model)
    arr = np.arange(7, dtype=np.uint32)
    state = {"step": 2, "np": {"a": arr, "s": np.int64(5)}, "rng": np.random.get_state(), "big": 2**100}
    ck = _save(tmp_path, model, cfg, 2, state=state)
    got = load_state(ck)
    assert got["big"] == 2**100 and got["np"]["s"] == 5
    assert got["np"]["a"].dtype == np.uint32 and np.array_equal(got["np"]["a"], arr)
    np.random.set_state(got["rng"])  # a valid numpy RNG state


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_corrupted_weights_error_names_the_file(tmp_path, damage):
    cfg = _cfg()
    model = PeerLM(cfg.model)
    ck = _save(tmp_path, model, cfg, 1)
    path = ck / "model.safetensors"
    data = bytearray(path.read_bytes())
    if damage == "flip":
        data[len(data) // 2] ^= 0xFF
    else:
        data = data[: len(data) // 2]
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="model.safetensors.*corrupted"):
        load_model_weights(ck, PeerLM(cfg.model))
    if damage == "truncate":  # even without the checksum, the reader's error names the file
        with pytest.raises(CheckpointError, match="model.safetensors"):
            load_model_weights(ck, PeerLM(cfg.model), verify=False)


def test_corrupted_state_and_meta_errors_name_the_file(tmp_path):
    cfg = _cfg()
    model = PeerLM(cfg.model)
    ck = _save(tmp_path, model, cfg, 1, state={"step": 1, "x": torch.arange(100)})
    p = ck / "state.pt"
    data = bytearray(p.read_bytes())
    data[-30] ^= 0x01
    p.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="state.pt.*corrupted"):
        load_state(ck)
    (ck / "meta.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="meta.json"):
        load_model_weights(ck, model)


def test_different_model_shape_names_the_tensor(tmp_path):
    cfg = _cfg()
    ck = _save(tmp_path, PeerLM(cfg.model), cfg, 1)
    other = PeerLM(_cfg("model.d_ff=96").model)
    with pytest.raises(CheckpointError, match=r"model.safetensors.*'blocks\.0\.ffn\.w1\.weight'.*shape"):
        load_model_weights(ck, other)
    peer = PeerLM(_cfg("model.sparse_layer=peer").model)  # tensors missing from the file
    with pytest.raises(CheckpointError, match=r"model.safetensors.*'blocks\.1\.ffn\.[a-z_.]+'"):
        load_model_weights(ck, peer)


def test_keep_last_and_latest_by_scanning(tmp_path):
    cfg = _cfg()
    model = PeerLM(cfg.model)
    for step in (1, 2, 3, 10):
        _save(tmp_path, model, cfg, step, keep_last=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_0000003", "step_0000010"]
    # a half-written checkpoint (temp dir, or a step dir without meta.json) is never "latest"
    (tmp_path / "checkpoints" / ".tmp-step_0000011-1").mkdir()
    (tmp_path / "checkpoints" / "step_0000012").mkdir()
    assert resolve_checkpoint(tmp_path).name == "step_0000010"
    assert resolve_checkpoint(tmp_path / "checkpoints" / "step_0000003").name == "step_0000003"
    with pytest.raises(CheckpointError, match="no such"):
        resolve_checkpoint(tmp_path / "nope")
    with pytest.raises(CheckpointError, match="holds no checkpoints"):
        resolve_checkpoint(tmp_path / "checkpoints" / "step_0000012")


def test_resave_same_step_replaces_it(tmp_path):
    cfg = _cfg()
    a, b = PeerLM(cfg.model), PeerLM(cfg.model)
    with torch.no_grad():
        b.tok_emb.weight.add_(1.0)
    _save(tmp_path, a, cfg, 5)
    ck = _save(tmp_path, b, cfg, 5)
    c = PeerLM(cfg.model)
    load_model_weights(ck, c)
    assert torch.equal(c.tok_emb.weight, b.tok_emb.weight)
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step_0000005"]
