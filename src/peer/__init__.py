"""peer: PEER (Parameter Efficient Expert Retrieval, 'Mixture of A Million Experts') for PyTorch.

    import peer
    layer = peer.PEER(dim=256, num_experts=256**2)          # the layer (peer.layers)
    model = peer.PeerLM(peer.ModelConfig(sparse_layer="peer"))
    print(peer.count_flops(model, seq_len=128).table())      # FLOPs (peer.flops), params (peer.count_params)
    cfg = peer.load_config("configs/peer.toml", ["train.flops=3e12"])
    run = peer.train_or_resume(cfg); report = peer.evaluate(cfg.train.out_dir)

The module names stay modules (``peer.flops``, ``peer.train``, ``peer.eval``, ...); the
entry points above are functions beside them. Training and evaluation import lazily.
"""

from .config import Config, ModelConfig, load_config
from .flops import FlopReport, ParamReport, count_params, train_flops_per_step
from .flops import flops as count_flops
from .layers import PEER, ProductKeyIndex
from .model import LMOutput, PeerLM

__version__ = "0.1.0"
__all__ = [
    "PEER",
    "ProductKeyIndex",
    "__version__",
    "PeerLM",
    "LMOutput",
    "Config",
    "ModelConfig",
    "load_config",
    "count_flops",
    "count_params",
    "train_flops_per_step",
    "FlopReport",
    "ParamReport",
    "train_or_resume",
    "load_run",
    "evaluate",
    "peerify",
]

_LAZY = {
    "peerify": ("hf.peerify", "peerify"),
    "train_or_resume": ("train", "train_or_resume"),
    "load_run": ("train", "load_run"),
    "evaluate": ("eval", "evaluate"),
}


def __getattr__(name):
    """Entry points imported on first use: ``import peer`` does not import transformers or the trainer."""
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        return getattr(importlib.import_module(f".{module}", __name__), attr)
    raise AttributeError(f"module 'peer' has no attribute {name!r}")
