"""Block-sparse attention kernels shared by every dit-sparse method (`dit_sparse.kernels`).

`block_sparse_attention(q, k, v, plan)` executes a `dit_sparse.plan.BlockPlan` on the fastest available
backend: flash-attn-4 where installed and the plan has fixed blocks, else Triton on CUDA GPUs; on the CPU
the batched CPU executor (the pure-PyTorch reference where LSE or tile statistics are needed).
"""

from .dispatch import (
    Backend,
    auto_order,
    available_backends,
    block_sparse_attention,
    check_backend,
    register_backend,
    run_backend,
    select_backend,
)
from .reference import reference_block_sparse_attention
from .result import AttentionResult

try:  # The Triton backend registers itself; its absence only removes the GPU fast path.
    from . import triton_backend  # noqa: F401
except ImportError:  # pragma: no cover - depends on the install
    pass

from . import (
    cpu_backend,  # noqa: E402,F401 - the batched CPU executor, after the GPU backends
    fa4_backend,  # noqa: E402,F401 - registers "fa4" ahead of Triton; flash-attn-4 is imported lazily
)

__all__ = [
    "AttentionResult",
    "Backend",
    "auto_order",
    "available_backends",
    "block_sparse_attention",
    "check_backend",
    "reference_block_sparse_attention",
    "register_backend",
    "run_backend",
    "select_backend",
]
