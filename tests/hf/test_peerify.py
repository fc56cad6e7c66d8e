"""peerify on tiny random GPT-2, Llama and Qwen2: only the chosen blocks change, parameter counts,
forward / backward / generate, distillation, freezing, reloading, errors."""

import copy
import subprocess
import sys

import pytest
import torch
from transformers import (
    BertConfig,
    BertForMaskedLM,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

import peer
from peer.hf import PeerMLP, freeze_except_peer, load_peerified, peerify, unfreeze
from peer.layers import PEER

V = 96
PEER_ARGS = dict(num_experts=64, heads=2, topk=4, key_dim=8)


def gpt2():
    return GPT2LMHeadModel(
        GPT2Config(vocab_size=V, n_positions=64, n_embd=32, n_layer=3, n_head=2, bos_token_id=0, eos_token_id=0)
    )


def llama():
    return LlamaForCausalLM(
        LlamaConfig(
            vocab_size=V,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=64,
            bos_token_id=0,
            eos_token_id=0,
            pad_token_id=0,
        )
    )


def qwen2():
    return Qwen2ForCausalLM(
        Qwen2Config(
            vocab_size=V,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=64,
            bos_token_id=0,
            eos_token_id=0,
            pad_token_id=0,
        )
    )


MAKERS = {"gpt2": (gpt2, "transformer.h"), "llama": (llama, "model.layers"), "qwen2": (qwen2, "model.layers")}


def blocks(model, path):
    node = model
    for part in path.split("."):
        node = getattr(node, part)
    return node


def n_params(module):
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize("arch", sorted(MAKERS))
def test_only_chosen_blocks_change_and_param_counts(arch):
    make, path = MAKERS[arch]
    torch.manual_seed(0)
    model = make().eval()
    original = copy.deepcopy(model)
    replaced = [0, 2]
    mlp_params = sum(n_params(blocks(model, path)[i].mlp) for i in replaced)
    peerify(model, layers=replaced, **PEER_ARGS)

    layers = blocks(model, path)
    for i, block in enumerate(layers):
        assert isinstance(block.mlp, PeerMLP) == (i in replaced)
    peers = [layers[i].mlp.peer for i in replaced]
    assert all(
        isinstance(p, PEER) and p.dim == 32 and p.num_experts == 64 and p.heads == 2 and p.topk == 4 for p in peers
    )
    # parameter count = original - replaced MLPs + PEER layers
    assert n_params(model) == n_params(original) - mlp_params + sum(n_params(p) for p in peers)
    # every state-dict entry outside the replaced MLPs is untouched; the replaced ones are the PEERs'
    before, after = original.state_dict(), model.state_dict()
    prefixes = tuple(f"{path}.{i}.mlp." for i in replaced)
    kept = {k for k in before if not k.startswith(prefixes)}
    assert kept == {k for k in after if not k.startswith(prefixes)}
    assert all(torch.equal(before[k], after[k]) for k in kept)
    new = {k for k in after if k.startswith(prefixes)}
    assert new == {f"{path}.{i}.mlp.peer.{k}" for i in replaced for k in layers[i].mlp.peer.state_dict()}
    assert model.config.peerify["layers"] == replaced


@pytest.mark.parametrize("arch", sorted(MAKERS))
def test_forward_backward_generate(arch):
    make, path = MAKERS[arch]
    torch.manual_seed(0)
    model = peerify(make(), layers="middle", **PEER_ARGS)
    layer = blocks(model, path)[1].mlp.peer
    x = torch.randint(1, V, (2, 12))
    out = model(x, labels=x)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    assert layer.u.grad is not None and layer.u.grad.abs().sum() > 0
    assert layer.query_proj.weight.grad.abs().sum() > 0
    # the block output uses the PEER: changing its values changes the logits
    model.eval()
    with torch.no_grad():
        a = model(x).logits
        layer.v.mul_(2.0)
        assert not torch.allclose(model(x).logits, a)
    cached = model.generate(x[:1, :4], max_new_tokens=6, do_sample=False)
    uncached = model.generate(x[:1, :4], max_new_tokens=6, do_sample=False, use_cache=False)
    assert cached.shape == (1, 10) and torch.equal(cached, uncached)


def test_peer_mlp_keeps_the_model_dtype():
    torch.manual_seed(0)
    model = peerify(llama().to(torch.bfloat16), layers=[1], **PEER_ARGS)
    assert model.model.layers[1].mlp.peer.u.dtype == torch.float32  # the PEER stays fp32 inside a bf16 model
    mlp = model.model.layers[1].mlp
    x = torch.randn(2, 3, 32, dtype=torch.bfloat16)
    assert mlp(x).dtype == torch.bfloat16
    assert torch.allclose(mlp(x).float(), mlp.peer(x.float()), atol=1e-2, rtol=1e-2)
    assert torch.isfinite(model(torch.randint(0, V, (1, 6))).logits).all()


def test_distill_fits_the_replaced_mlp():
    torch.manual_seed(0)
    model = gpt2().eval()
    sample = torch.randint(0, V, (64, 64))  # 4096 tokens for 64 experts
    held_out = torch.randint(0, V, (8, 64))
    mlp = copy.deepcopy(model.transformer.h[1].mlp)
    captured = {}
    hook = model.transformer.h[1].mlp.register_forward_hook(lambda m, a, o: captured.setdefault("x", a[0]))
    with torch.no_grad():
        model(held_out)
    hook.remove()
    x_ho = captured["x"].reshape(-1, 32)
    with torch.no_grad():
        y_ho = mlp(x_ho)

    peerify(model, layers=[1], init="distill", sample_inputs={"input_ids": sample}, distill_steps=300, **PEER_ARGS)
    new = model.transformer.h[1].mlp
    rep = new.distill_report
    assert rep["tokens"] == 64 * 64
    assert rep["mse_after"] < 0.01 * rep["mse_before"]
    # better than the trivial fit (predicting 0), on the sample and on held-out tokens
    assert rep["mse_after"] < 0.6 * rep["mse_zero"]
    with torch.no_grad():
        mse_ho = float((new(x_ho) - y_ho).pow(2).mean())
    assert mse_ho < 0.7 * float(y_ho.pow(2).mean())
    assert not new.training  # back in the model's mode


def test_distill_uses_only_unmasked_tokens_and_needs_samples():
    torch.manual_seed(0)
    model = qwen2().eval()
    ids = torch.randint(1, V, (4, 16))
    mask = torch.ones_like(ids)
    mask[:, 12:] = 0
    peerify(
        model,
        layers=[2],
        init="distill",
        sample_inputs=[{"input_ids": ids, "attention_mask": mask}],
        distill_steps=0,
        **PEER_ARGS,
    )
    assert model.model.layers[2].mlp.distill_report["tokens"] == 4 * 12
    with pytest.raises(ValueError, match="sample_inputs"):
        peerify(qwen2(), layers=[0], init="distill", **PEER_ARGS)
    with pytest.raises(ValueError, match="sample_inputs"):
        peerify(qwen2(), layers=[0], init="distill", sample_inputs=torch.zeros(2, 3), **PEER_ARGS)


def test_freeze_and_unfreeze():
    torch.manual_seed(0)
    model = peerify(llama(), layers=[1], freeze_base=True, **PEER_ARGS)
    peer_params = {id(p) for p in model.model.layers[1].mlp.parameters()}
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert {id(p) for p in trainable} == peer_params
    x = torch.randint(0, V, (2, 8))
    model(x, labels=x).loss.backward()
    assert all(p.grad is None for p in model.parameters() if id(p) not in peer_params)
    assert unfreeze(model) == n_params(model)
    assert all(p.requires_grad for p in model.parameters())
    assert freeze_except_peer(model) == sum(p.numel() for p in model.model.layers[1].mlp.parameters())
    with pytest.raises(ValueError, match="no PEER layer"):
        freeze_except_peer(llama())


def test_save_and_load_peerified(tmp_path):
    torch.manual_seed(0)
    model = peerify(gpt2(), layers=[0, 2], **PEER_ARGS).eval()
    x = torch.randint(0, V, (2, 10))
    with torch.no_grad():
        ref = model(x).logits
    model.save_pretrained(tmp_path)
    loaded = load_peerified(tmp_path)
    assert isinstance(loaded.transformer.h[2].mlp, PeerMLP)
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, ref)


def test_unknown_architecture_and_bad_layers():
    bert = BertForMaskedLM(
        BertConfig(vocab_size=V, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
    )
    with pytest.raises(ValueError, match="unsupported architecture 'bert'.*gpt2.*llama.*qwen2"):
        peerify(bert, **PEER_ARGS)
    with pytest.raises(ValueError, match="unsupported architecture"):
        peerify(torch.nn.Linear(2, 2), **PEER_ARGS)
    with pytest.raises(ValueError, match="layers: 3 is not a block index"):
        peerify(gpt2(), layers=[3], **PEER_ARGS)
    with pytest.raises(ValueError, match="layers must be"):
        peerify(gpt2(), layers="first", **PEER_ARGS)
    with pytest.raises(ValueError, match="init must be"):
        peerify(gpt2(), init="zeros", **PEER_ARGS)
    with pytest.raises(ValueError, match="num_experts"):
        peerify(gpt2(), num_experts=60)
    model = peerify(gpt2(), layers=[-1], **PEER_ARGS)
    assert isinstance(model.transformer.h[2].mlp, PeerMLP)
    with pytest.raises(ValueError, match="already has a PEER"):
        peerify(model, layers=[2], **PEER_ARGS)


def test_top_level_peerify_is_lazy():
    code = "import sys, peer; assert 'transformers' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
    assert peer.peerify is peerify
