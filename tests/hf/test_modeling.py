"""PeerConfig / PeerForCausalLM: save/load round trip, labels and aux losses, generate with the KV cache."""

import json

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.modeling_outputs import CausalLMOutputWithPast

import peer.hf  # noqa: F401  (registers the "peer" model type)
from peer.config import ConfigError, ModelConfig, PEERConfig
from peer.hf import PeerCache, PeerConfig, PeerForCausalLM
from peer.model import PeerLM

V = 61


def tiny_config(**kw):
    base = dict(
        vocab_size=V,
        d_model=32,
        n_layers=2,
        n_heads=2,
        max_seq_len=48,
        sparse_layer="peer",
        sparse_blocks=[1],
        peer={"num_experts": 64, "heads": 2, "topk": 4, "key_dim": 8},
    )
    return PeerConfig(**{**base, **kw})


def tiny_model(**kw):
    torch.manual_seed(0)
    model = PeerForCausalLM(tiny_config(**kw))
    # a few training-mode forwards so the query BatchNorm's running statistics are not the defaults
    with torch.no_grad():
        for _ in range(3):
            model(torch.randint(0, V, (4, 16)))
    return model.eval()


def test_config_mirrors_model_config_and_round_trips(tmp_path):
    mc = ModelConfig(
        vocab_size=V,
        d_model=32,
        n_layers=3,
        n_heads=2,
        sparse_layer="peer",
        peer=PEERConfig(num_experts=64, heads=2, topk=4, key_dim=8),
        tie_embeddings=False,
    )
    cfg = PeerConfig.from_model_config(mc, eos_token_id=0)
    assert cfg.to_model_config() == mc
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads) == (32, 3, 2)
    assert cfg.tie_word_embeddings is False
    cfg.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["model_type"] == "peer" and saved["peer"]["num_experts"] == 64
    again = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(again, PeerConfig) and again.to_model_config() == mc and again.eos_token_id == 0


def test_bad_config_names_the_field():
    with pytest.raises(ConfigError, match="model.peer.num_experts"):
        PeerForCausalLM(tiny_config(peer={"num_experts": 60}))
    with pytest.raises(ValueError, match="peer must be a dict"):
        PeerConfig(peer=3)


@pytest.mark.parametrize("tie", [True, False])
def test_save_pretrained_from_pretrained_identical_logits(tmp_path, tie):
    model = tiny_model(tie_embeddings=tie)
    x = torch.randint(0, V, (2, 12))
    with torch.no_grad():
        ref = model(x).logits
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file() and (tmp_path / "config.json").is_file()
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert type(loaded) is PeerForCausalLM and not loaded.training
    with torch.no_grad():
        out = loaded(x).logits
    assert torch.equal(out, ref)
    lm = loaded.model
    assert (lm.lm_head.weight is lm.tok_emb.weight) == tie
    # every saved tensor (BatchNorm running stats included) came back
    sd, sd2 = model.state_dict(), loaded.state_dict()
    assert sd.keys() == sd2.keys() and all(torch.equal(sd[k], sd2[k]) for k in sd)


def test_weights_are_the_peer_lm_under_model_prefix():
    model = tiny_model()
    lm = PeerLM(model.config.to_model_config())
    assert {f"model.{k}" for k in lm.state_dict()} == set(model.state_dict())


def test_labels_give_shifted_cross_entropy_plus_aux_loss():
    # token-choice MoE sets a nonzero load-balancing aux loss
    model = tiny_model(
        sparse_layer="moe", moe={"num_experts": 4, "routing": "token_choice", "topk": 1, "aux_loss_weight": 0.5}
    )
    x = torch.randint(0, V, (2, 10))
    labels = x.clone()
    labels[0, 4] = -100
    out = model(x, labels=labels)
    assert isinstance(out, CausalLMOutputWithPast)
    ce = F.cross_entropy(out.logits[:, :-1].reshape(-1, V), labels[:, 1:].reshape(-1), ignore_index=-100)
    assert float(out.aux_loss) > 0
    assert torch.allclose(out.loss, ce + out.aux_loss, atol=1e-6)
    # the same as PeerLM's own loss with pre-shifted targets
    targets = torch.cat([labels[:, 1:], torch.full((2, 1), -100)], 1)
    assert torch.allclose(out.loss, model.model(x, targets=targets).loss, atol=1e-6)
    assert model(x).loss is None
    loss, logits = model(x, labels=labels, return_dict=False)[:2]
    assert torch.equal(loss, out.loss) and torch.equal(logits, out.logits)


def test_padding_only_on_the_right():
    model = tiny_model()
    x = torch.randint(0, V, (2, 8))
    right = torch.ones(2, 8, dtype=torch.long)
    right[1, 6:] = 0
    with torch.no_grad():
        assert torch.equal(model(x, attention_mask=right).logits, model(x).logits)
    with pytest.raises(ValueError, match="right padding"):
        model(x, attention_mask=right.flip(1))
    with pytest.raises(ValueError, match="inputs_embeds"):
        model(inputs_embeds=torch.zeros(1, 2, 32))


def test_kv_cache_forward_matches_full_forward():
    model = tiny_model()
    x = torch.randint(0, V, (2, 14))
    with torch.no_grad():
        full = model(x).logits
        first = model(x[:, :9], use_cache=True)
        cache = first.cache if hasattr(first, "cache") else first.past_key_values
        assert isinstance(cache, PeerCache) and cache.get_seq_length() == 9
        rest = model(x[:, 9:], past_key_values=cache).logits
    assert torch.allclose(torch.cat([first.logits, rest], 1), full, atol=1e-5)


def _record_lengths(model):
    seen = []
    inner = model.model.forward

    def forward(idx, *a, **k):
        seen.append(idx.shape[1])
        return inner(idx, *a, **k)

    model.model.forward = forward
    return seen


def test_greedy_generate_with_cache_equals_without_and_uses_the_cache():
    model = tiny_model()
    prompt = torch.randint(0, V, (2, 5))
    seen = _record_lengths(model)
    cached = model.generate(prompt, max_new_tokens=10, do_sample=False, use_cache=True)
    assert seen == [5] + [1] * 9  # prefill, then one token per step from the cache
    seen.clear()
    uncached = model.generate(prompt, max_new_tokens=10, do_sample=False, use_cache=False)
    assert seen == list(range(5, 15))
    assert cached.shape == (2, 15) and torch.equal(cached, uncached)
    # greedy = argmax of a full forward at every step
    with torch.no_grad():
        for t in range(5, 15):
            assert torch.equal(model.model(cached[:, :t]).logits[:, -1].argmax(-1), cached[:, t])


def test_sampling_is_reproducible_with_a_seed():
    model = tiny_model()
    prompt = torch.randint(0, V, (1, 4))
    kw = dict(max_new_tokens=12, do_sample=True, top_k=0, temperature=1.5)
    torch.manual_seed(123)
    a = model.generate(prompt, **kw)
    torch.manual_seed(123)
    b = model.generate(prompt, **kw)
    torch.manual_seed(123)
    c = model.generate(prompt, use_cache=False, **kw)
    torch.manual_seed(7)
    d = model.generate(prompt, **kw)
    assert torch.equal(a, b) and torch.equal(a, c)
    assert not torch.equal(a, d)  # the seed matters (12 tokens from 61 at temperature 1.5)


def test_beam_search_with_cache_equals_without():
    model = tiny_model()
    prompt = torch.randint(0, V, (2, 4))
    kw = dict(max_new_tokens=6, num_beams=3, do_sample=False, num_return_sequences=2)
    assert torch.equal(model.generate(prompt, **kw), model.generate(prompt, use_cache=False, **kw))


def test_generate_past_max_seq_len_is_a_clear_error():
    """Checked up front (no token generated first), naming max_seq_len and how many tokens would fit."""
    model = tiny_model(max_seq_len=16)
    calls = []
    real = model.forward
    model.forward = lambda *a, **k: (calls.append(1), real(*a, **k))[1]
    with pytest.raises(ValueError, match="max_seq_len=16.*at most 6 new tokens"):
        model.generate(torch.randint(0, V, (1, 10)), max_new_tokens=10, do_sample=False)
    assert calls == []
    out = model.generate(torch.randint(0, V, (1, 10)), max_new_tokens=6, do_sample=False)
    assert out.shape[1] == 16


def test_generate_with_a_padded_batch_equals_each_row_alone():
    """Right- or left-padded prompts: each row's result is that of its real tokens generated alone,
    right-padded with pad_token_id to one tensor."""
    model = tiny_model()
    model.generation_config.pad_token_id = 0
    x = torch.randint(1, V, (3, 8))
    right = torch.ones(3, 8, dtype=torch.long)
    right[1, 6:] = 0
    right[2, 3:] = 0
    kw = dict(max_new_tokens=4, do_sample=False)
    out = model.generate(x, attention_mask=right, **kw)
    alone = [model.generate(x[i, : int(right[i].sum())][None], **kw)[0] for i in range(3)]
    assert out.shape == (3, 12)
    for i, a in enumerate(alone):
        assert torch.equal(out[i, : a.numel()], a) and bool((out[i, a.numel() :] == 0).all())
    left_x, left = x.clone(), torch.ones(3, 8, dtype=torch.long)
    left_x[1], left[1, :2] = torch.cat([torch.zeros(2, dtype=torch.long), x[1, :6]]), 0  # row 1 left-padded
    out_left = model.generate(left_x, attention_mask=left, **kw)
    assert torch.equal(out_left[1, :10], alone[1])
    assert model.generate(x, attention_mask=torch.ones_like(right), **kw).shape == (3, 12)  # unpadded: one batch
    with pytest.raises(ValueError, match="return_dict_in_generate"):
        model.generate(x, attention_mask=right, return_dict_in_generate=True, **kw)
