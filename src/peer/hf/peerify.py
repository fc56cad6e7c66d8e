"""peerify: put PEER layers into an existing ``transformers`` causal LM.

    model = AutoModelForCausalLM.from_pretrained("my-llama")
    peer.peerify(model, layers=[8], num_experts=512**2, heads=8, topk=16,
                 init="distill", sample_inputs=batch["input_ids"], freeze_base=True)

The MLP (feed-forward sub-block) of each chosen transformer block is replaced by :class:`PeerMLP`, a
wrapper with the MLP's call signature (hidden states in, a tensor of the same shape out) around a
:class:`peer.layers.PEER` of width ``hidden_size``. Nothing else in the model changes: the other
blocks, attention, norms, embeddings and the LM head keep their weights.

Initialisation:
- ``init="random"``: PEER's own init (output variance ~ input variance, see peer.layers.peer).
- ``init="distill"``: fit each new PEER to the MLP it replaces, on hidden states from
  ``sample_inputs`` (see :mod:`peer.hf.distill`): forward hooks capture the replaced MLP's input x
  and output y on the sample tokens; the query BatchNorm's running statistics are set to the
  queries' statistics on x; the values v are solved in closed form (ridge least squares by
  conjugate gradients: with retrieval and u fixed the output is linear in v, eqs. 3 and 6); then
  ``distill_steps`` Adam steps of MSE regression of PEER(x) onto y refine all PEER parameters,
  everything else untouched. MSEs before / after are kept in the PeerMLP's ``distill_report``.

The peerify settings are recorded in ``model.config.peerify`` (saved in config.json), so
:func:`load_peerified` can rebuild the architecture and load a saved peerified model.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

import torch
from torch import nn

from ..layers import PEER
from .distill import capture, distill

__all__ = ["SUPPORTED_ARCHITECTURES", "PeerMLP", "peerify", "freeze_except_peer", "unfreeze", "load_peerified"]

# config.model_type -> dotted path of the list of transformer blocks; each block's FFW is ``.mlp``,
# called as mlp(hidden_states) -> tensor of the same shape
SUPPORTED_ARCHITECTURES: dict[str, str] = {
    "gpt2": "transformer.h",
    "gpt_neox": "gpt_neox.layers",
    "phi": "model.layers",
    **{
        t: "model.layers"
        for t in (
            "llama",
            "mistral",
            "qwen2",
            "qwen3",
            "gemma",
            "gemma2",
            "gemma3_text",
            "phi3",
            "olmo",
            "olmo2",
            "granite",
            "stablelm",
            "starcoder2",
            "smollm3",
        )
    },
}


class PeerMLP(nn.Module):
    """Drop-in replacement of a block's MLP: ``forward(hidden_states) -> tensor``, a PEER layer inside.

    The input is cast to the PEER's parameter dtype and the output back to the input's dtype, so a
    float32 PEER works inside a bfloat16 model.
    """

    def __init__(self, peer: PEER):
        super().__init__()
        self.peer = peer
        self.distill_report: dict[str, float] | None = None

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        dtype = hidden_states.dtype
        return self.peer(hidden_states.to(self.peer.query_proj.weight.dtype)).to(dtype)


# --------------------------------------------------------------------------------------
# Locating blocks
# --------------------------------------------------------------------------------------
def _blocks(model: nn.Module) -> nn.ModuleList:
    """The model's list of transformer blocks; ValueError for an architecture peerify does not know."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    path = SUPPORTED_ARCHITECTURES.get(model_type)
    if path is None:
        raise ValueError(
            f"peerify: unsupported architecture {model_type or type(model).__name__!r}; "
            f"supported model types: {', '.join(sorted(SUPPORTED_ARCHITECTURES))}"
        )
    node = model
    for part in path.split("."):
        node = getattr(node, part, None)
        if node is None:
            raise ValueError(
                f"peerify: a {model_type!r} model without {path!r} (is it a causal LM such as "
                f"{model_type.capitalize()}ForCausalLM?); supported model types: "
                f"{', '.join(sorted(SUPPORTED_ARCHITECTURES))}"
            )
    if not isinstance(node, nn.ModuleList) or not all(hasattr(b, "mlp") for b in node):
        raise ValueError(f"peerify: {path!r} of this {model_type!r} model is not a list of blocks with an 'mlp'")
    return node


def _layer_ids(layers, n: int) -> list[int]:
    """'middle' (the paper's choice), 'all', an int or a list of ints (negative counts from the end)."""
    if layers == "middle":
        return [n // 2]
    if layers == "all":
        return list(range(n))
    items = [layers] if isinstance(layers, int) else layers
    if isinstance(items, str) or not isinstance(items, Iterable):
        raise ValueError(f"layers must be 'middle', 'all', a block index or a list of them, got {layers!r}")
    out = []
    for i in items:
        if isinstance(i, bool) or not isinstance(i, int) or not -n <= i < n:
            raise ValueError(f"layers: {i!r} is not a block index in {-n}..{n - 1} (the model has {n} blocks)")
        out.append(i % n)
    if not out:
        raise ValueError("layers must name at least one block")
    return sorted(set(out))


# --------------------------------------------------------------------------------------
# peerify
# --------------------------------------------------------------------------------------
def peerify(
    model: nn.Module,
    layers="middle",
    num_experts: int = 1024**2,
    heads: int = 8,
    topk: int = 16,
    key_dim: int = 128,
    init: str = "random",
    sample_inputs=None,
    freeze_base: bool = False,
    distill_steps: int = 300,
    distill_lr: float = 3e-3,
    distill_batch_tokens: int = 512,
    **peer_kwargs,
) -> nn.Module:
    """Replace the MLP of blocks ``layers`` of a transformers causal LM by PEER layers, in place.

    Args:
        model: a GPT-2, GPT-NeoX, Phi, Llama-, Mistral-, Qwen-, Gemma-... family causal LM
            (see ``SUPPORTED_ARCHITECTURES``).
        layers: "middle" (paper: only the middle block), "all", a block index or a list of them.
        num_experts, heads, topk, key_dim: the PEER layer (N, h, k, key width); other
            :class:`peer.layers.PEER` options (activation, score, query_norm, glu, ...) via ``peer_kwargs``.
        init: "random" (PEER's own init) or "distill" (fit to the replaced MLP on ``sample_inputs``).
        sample_inputs: for "distill": token ids [B, T], a dict / BatchEncoding of model inputs, or a
            list of either.
        freeze_base: freeze every parameter except the PEER layers (see :func:`freeze_except_peer`).
        distill_steps, distill_lr, distill_batch_tokens: the distillation's Adam steps, learning
            rate and tokens per minibatch.

    Returns the same model object.
    """
    if init not in ("random", "distill"):
        raise ValueError(f"init must be 'random' or 'distill', got {init!r}")
    if init == "distill":
        if sample_inputs is None:
            raise ValueError("sample_inputs is required with init='distill' (token ids or a dict of model inputs)")
        for name, v, low in (("distill_steps", distill_steps, 0), ("distill_batch_tokens", distill_batch_tokens, 1)):
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {v!r}")
        if not distill_lr > 0:
            raise ValueError(f"distill_lr must be positive, got {distill_lr!r}")
    blocks = _blocks(model)
    ids = _layer_ids(layers, len(blocks))
    for i in ids:
        if isinstance(blocks[i].mlp, PeerMLP):
            raise ValueError(f"layers: block {i} already has a PEER layer")
    dim = int(model.config.hidden_size)

    captured = capture(model, {i: blocks[i].mlp for i in ids}, sample_inputs) if init == "distill" else {}
    for i in ids:
        old = blocks[i].mlp
        ref = next(old.parameters(), None)
        layer = PEER(dim, num_experts=num_experts, heads=heads, topk=topk, key_dim=key_dim, **peer_kwargs)
        if ref is not None:
            layer.to(ref.device)
        new = PeerMLP(layer).train(old.training)
        if i in captured:
            new.distill_report = distill(layer, *captured.pop(i), distill_steps, distill_lr, distill_batch_tokens)
            layer.train(old.training)
        blocks[i].mlp = new

    record = {
        "layers": ids,
        "num_experts": num_experts,
        "heads": heads,
        "topk": topk,
        "key_dim": key_dim,
        **peer_kwargs,
    }
    model.config.peerify = record
    if freeze_base:
        freeze_except_peer(model)
    return model


# --------------------------------------------------------------------------------------
# Parameter-efficient fine-tuning controls, reloading
# --------------------------------------------------------------------------------------
def _peer_params(model: nn.Module) -> set[int]:
    return {id(p) for m in model.modules() if isinstance(m, PEER) for p in m.parameters()}


def freeze_except_peer(model: nn.Module) -> int:
    """Set ``requires_grad`` False on every parameter outside the PEER layers; returns the trainable count."""
    peer_ids = _peer_params(model)
    if not peer_ids:
        raise ValueError("freeze_except_peer: the model has no PEER layer (call peerify first)")
    for p in model.parameters():
        p.requires_grad_(id(p) in peer_ids)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def unfreeze(model: nn.Module) -> int:
    """Set ``requires_grad`` True on every parameter; returns the trainable count."""
    for p in model.parameters():
        p.requires_grad_(True)
    return sum(p.numel() for p in model.parameters())


def load_peerified(path: str | os.PathLike, **from_config_kwargs) -> nn.Module:
    """Load a peerified model saved with ``save_pretrained``: rebuild it from config.json (including the
    recorded ``peerify`` settings) and load its safetensors weights. Offline; nothing is downloaded."""
    from pathlib import Path

    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"load_peerified: {str(path / 'config.json')!r} does not exist")
    config = AutoConfig.from_pretrained(path)
    settings = getattr(config, "peerify", None)
    if not settings:
        raise ValueError(f"load_peerified: {str(path / 'config.json')!r} has no 'peerify' settings")
    model = AutoModelForCausalLM.from_config(config, **from_config_kwargs)
    peerify(model, **settings)
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"load_peerified: no *.safetensors weights in {str(path)!r}")
    state = {}
    for f in files:
        state.update(load_file(str(f)))
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = (
        {k for k in missing if k.endswith("lm_head.weight")} if getattr(config, "tie_word_embeddings", False) else set()
    )
    if set(missing) - tied or unexpected:
        raise ValueError(
            f"load_peerified: weights in {str(path)!r} do not match the model "
            f"(missing {sorted(set(missing) - tied)[:5]}, unexpected {sorted(unexpected)[:5]})"
        )
    model.tie_weights()
    return model.eval()
