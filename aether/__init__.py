"""AETHER: align AlphaEarth embeddings with points of interest (Liu et al., arXiv 2510.09894)."""

from aether.core.errors import AetherError

__version__ = "0.2.0"
__all__ = ["AetherError", "__version__"]
