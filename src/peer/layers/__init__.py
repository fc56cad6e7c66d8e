"""Layers: PEER (eqs. 1-7) and its product-key index; the paper's baselines DenseFFN, MoE, PKM."""

from .index import ProductKeyIndex
from .peer import PEER

__all__ = ["PEER", "ProductKeyIndex"]
try:  # baselines are added alongside
    from .dense import DenseFFN  # noqa: F401

    __all__.append("DenseFFN")
except ImportError:
    pass
try:
    from .moe import MoE  # noqa: F401

    __all__.append("MoE")
except ImportError:
    pass
try:
    from .pkm import PKM  # noqa: F401

    __all__.append("PKM")
except ImportError:
    pass
