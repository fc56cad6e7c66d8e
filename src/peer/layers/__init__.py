"""Layers: PEER (eqs. 1-7), its product-key router and index; the paper's baselines DenseFFN, MoE, PKM;
the contract they all keep (FeedForward, SparseFeedForward: peer.layers.base)."""

from .base import FeedForward, SparseFeedForward
from .dense import DenseFFN
from .index import ProductKeyIndex
from .moe import MoE
from .peer import PEER
from .pkm import PKM
from .router import ProductKeyRouter

__all__ = ["FeedForward", "SparseFeedForward", "PEER", "ProductKeyIndex", "ProductKeyRouter", "DenseFFN", "MoE", "PKM"]
