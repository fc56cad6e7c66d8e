"""Hugging Face ``transformers`` integration: PeerConfig / PeerForCausalLM, export, peerify.

Importing ``peer.hf`` registers the ``"peer"`` model type with ``AutoConfig`` and
``AutoModelForCausalLM``, so ``AutoModelForCausalLM.from_pretrained(dir)`` loads an exported PEER model.
"""

from transformers import AutoConfig, AutoModelForCausalLM

from .configuration import PeerConfig
from .modeling import PeerCache, PeerCausalLMOutput, PeerForCausalLM, PeerPreTrainedModel
from .peerify import SUPPORTED_ARCHITECTURES, PeerMLP, freeze_except_peer, load_peerified, peerify, unfreeze

__all__ = [
    "PeerConfig",
    "PeerForCausalLM",
    "PeerPreTrainedModel",
    "PeerCache",
    "PeerCausalLMOutput",
    "peerify",
    "PeerMLP",
    "SUPPORTED_ARCHITECTURES",
    "freeze_except_peer",
    "unfreeze",
    "load_peerified",
    "export_run",
    "save_tokenizer",
]


def _register() -> None:
    try:
        AutoConfig.register("peer", PeerConfig)
    except ValueError:  # already registered (module reloaded)
        pass
    try:
        AutoModelForCausalLM.register(PeerConfig, PeerForCausalLM)
    except ValueError:
        pass


_register()


def __getattr__(name):  # export pulls in peer.train only when used
    if name in ("export_run", "save_tokenizer"):
        from . import export

        return getattr(export, name)
    raise AttributeError(f"module 'peer.hf' has no attribute {name!r}")
