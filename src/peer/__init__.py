"""peer: PEER (Parameter Efficient Expert Retrieval, 'Mixture of A Million Experts') for PyTorch."""

from .layers import PEER, ProductKeyIndex

__version__ = "0.1.0"
__all__ = ["PEER", "ProductKeyIndex", "__version__"]
