"""The "semantic" method: k-means clusters of queries and keys, attention between similar clusters."""

from .method import SemanticConfig, SemanticPermutation

__all__ = ["SemanticConfig", "SemanticPermutation"]
