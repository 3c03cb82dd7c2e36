"""dit-sparse: training-free sparse attention for video and image diffusion transformers.

    import dit_sparse
    handle = dit_sparse.apply(pipe, method="semantic", sparsity=0.9)
    video = pipe(prompt).frames[0]
    print(handle.stats())
    dit_sparse.remove(pipe)
"""

from .api import SparseHandle, apply, remove, sparse_attention
from .config import ConfigError, SparseConfig, WarmupConfig
from .layout import VideoLayout
from .method import SparseMethod, register_method
from .methods import available_methods
from .plan import BlockPlan

__version__ = "0.1.0"

__all__ = [
    "BlockPlan",
    "ConfigError",
    "SparseConfig",
    "SparseHandle",
    "SparseMethod",
    "VideoLayout",
    "WarmupConfig",
    "apply",
    "available_methods",
    "register_method",
    "remove",
    "sparse_attention",
]
