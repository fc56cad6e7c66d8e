"""Sampling: top-k / top-p filtering on hand-made logits, KV-cache greedy == full recompute, seeds, streaming."""

import pytest
import torch

from peer.config import ModelConfig, PEERConfig
from peer.generate import filter_logits, generate_ids, sample
from peer.model import PeerLM


def tiny_model(max_seq_len=32, seed=0):
    torch.manual_seed(seed)
    cfg = ModelConfig(
        vocab_size=300,
        d_model=32,
        n_layers=2,
        n_heads=2,
        max_seq_len=max_seq_len,
        sparse_layer="peer",
        sparse_blocks=[1],
        peer=PEERConfig(num_experts=64, heads=2, topk=4, key_dim=8),
    )
    model = PeerLM(cfg)
    # give the query BatchNorm non-trivial running statistics, as after training
    model.train()
    with torch.no_grad():
        model(torch.randint(0, 300, (4, 16)))
    return model.eval()


@pytest.fixture(scope="module")
def tokenizer():
    from peer.data.tokenizer import train_tokenizer

    text = ["The quick brown fox jumps over the lazy dog. Ünïcödé — ça marche, 日本語 too."] * 20
    return train_tokenizer(text, vocab_size=300, min_frequency=1)


# ------------------------------------------------------------------ filter_logits
def test_temperature_scales_logits():
    logits = torch.tensor([1.0, 5.0, 3.0, 2.0])
    assert torch.allclose(filter_logits(logits, 2.0), logits / 2)
    assert torch.equal(filter_logits(logits, 1.0, top_k=0, top_p=1.0), logits)


def test_top_k_keeps_the_k_largest():
    logits = torch.tensor([[1.0, 5.0, 3.0, 2.0], [4.0, -1.0, 0.0, 9.0]])
    out = filter_logits(logits, 1.0, top_k=2)
    keep = torch.isfinite(out)
    assert keep.tolist() == [[False, True, True, False], [True, False, False, True]]
    assert torch.equal(out[keep], logits[keep])


def test_top_p_keeps_smallest_nucleus():
    probs = torch.tensor([0.05, 0.5, 0.15, 0.3])
    logits = probs.log()
    # sorted: 0.5, 0.3, 0.15, 0.05; mass above each: 0, 0.5, 0.8, 0.95
    assert torch.isfinite(filter_logits(logits, 1.0, top_p=0.7)).tolist() == [False, True, False, True]
    assert torch.isfinite(filter_logits(logits, 1.0, top_p=0.85)).tolist() == [False, True, True, True]
    assert torch.isfinite(filter_logits(logits, 1.0, top_p=0.4)).tolist() == [False, True, False, False]
    # the surviving probabilities renormalise to the nucleus
    p = filter_logits(logits, 1.0, top_p=0.7).softmax(-1)
    assert torch.allclose(p, torch.tensor([0.0, 0.5 / 0.8, 0.0, 0.3 / 0.8]))


def test_top_k_then_top_p_and_greedy():
    logits = torch.tensor([0.0, 1.0, 2.0, 3.0, 4.0])
    # top-k=3 leaves softmax([2,3,4]) = .090 .245 .665; top-p 0.8 keeps 4 and 3
    out = filter_logits(logits, 1.0, top_k=3, top_p=0.8)
    assert torch.isfinite(out).tolist() == [False, False, False, True, True]
    greedy = filter_logits(logits, 0.0)
    assert torch.isfinite(greedy).tolist() == [False, False, False, False, True]


@pytest.mark.parametrize(
    "kw, field",
    [
        ({"temperature": -1}, "temperature"),
        ({"top_k": -2}, "top_k"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
    ],
)
def test_bad_settings_name_the_argument(kw, field):
    args = {"temperature": 1.0, "top_k": 0, "top_p": 1.0, **kw}
    with pytest.raises(ValueError, match=field):
        filter_logits(torch.zeros(4), **args)


# ------------------------------------------------------------------ generation loop
def test_greedy_with_kv_cache_equals_full_recompute():
    model = tiny_model()
    prompt = [5, 17, 42, 7, 99]
    cached = generate_ids(model, prompt, 20, temperature=0.0, use_cache=True)
    full = generate_ids(model, prompt, 20, temperature=0.0, use_cache=False)
    assert len(cached) == 20
    assert cached == full
    # and full recompute is plain argmax of the model's last logits
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(20):
            seq.append(int(model(torch.tensor([seq])).logits[0, -1].argmax()))
    assert seq[len(prompt) :] == full


def test_sampling_with_cache_matches_recompute_for_same_seed():
    model = tiny_model()
    a = generate_ids(model, [1, 2, 3], 15, temperature=1.0, top_k=20, top_p=0.9, seed=3, use_cache=True)
    b = generate_ids(model, [1, 2, 3], 15, temperature=1.0, top_k=20, top_p=0.9, seed=3, use_cache=False)
    assert a == b


def test_generation_past_the_context_keeps_going():
    model = tiny_model(max_seq_len=16)
    out = generate_ids(model, list(range(1, 13)), 30, temperature=0.0, use_cache=True)
    assert len(out) == 30 and all(0 <= t < 300 for t in out)
    assert model.training is False


def test_eos_stops_generation():
    model = tiny_model()
    first = generate_ids(model, [4, 5], 1, temperature=0.0)[0]
    assert generate_ids(model, [4, 5], 10, temperature=0.0, eos_id=first) == [first]


def test_seed_reproducibility(tokenizer):
    model = tiny_model()
    kw = dict(max_new_tokens=20, temperature=1.5, top_k=0, top_p=1.0)
    a = sample(model, tokenizer, "The quick", seed=1, **kw)
    b = sample(model, tokenizer, "The quick", seed=1, **kw)
    c = sample(model, tokenizer, "The quick", seed=2, **kw)
    assert a == b
    assert a != c


def test_streamed_pieces_add_up_to_the_text(tokenizer):
    model = tiny_model()
    pieces = []
    text = sample(
        model,
        tokenizer,
        "Ünïcödé",
        max_new_tokens=25,
        temperature=1.5,
        top_k=0,
        top_p=1.0,
        seed=0,
        stream=pieces.append,
        stop_at_eos=False,
    )
    assert "".join(pieces) == text
    assert len(pieces) > 1
    # no streamed piece except possibly the last ends in a half character
    assert all(not p.endswith("\ufffd") for p in pieces[:-1])


def test_empty_prompt_starts_from_eos(tokenizer):
    model = tiny_model()
    eos = tokenizer.eos_id
    ids = generate_ids(model, [eos], 5, temperature=0.0)
    text = sample(model, tokenizer, "", max_new_tokens=5, temperature=0.0, stop_at_eos=False)
    assert text == tokenizer.decode(ids)
