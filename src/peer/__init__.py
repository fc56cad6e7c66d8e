"""peer: PEER (Parameter Efficient Expert Retrieval, 'Mixture of A Million Experts') for PyTorch."""

from .layers import PEER, ProductKeyIndex
from .model import LMOutput, PeerLM
from .flops import FlopReport, ParamReport, count_params, flops, train_flops_per_step  # peer.flops: the function

__version__ = "0.1.0"
__all__ = ["PEER", "ProductKeyIndex", "__version__", "PeerLM", "LMOutput", "flops", "count_params",
           "train_flops_per_step", "FlopReport", "ParamReport"]


def __getattr__(name):
    """``peer.peerify`` is imported on first use, so ``import peer`` does not import transformers."""
    if name == "peerify":
        from .hf.peerify import peerify

        return peerify
    raise AttributeError(f"module 'peer' has no attribute {name!r}")
