"""Models COOM trains."""
from coom.models.transformer import Transformer

__all__ = ["Transformer"]
