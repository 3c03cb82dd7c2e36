"""When a Triton kernel of this package runs: on CUDA tensors, and on CPU tensors under TRITON_INTERPRET=1
(the interpreter, which is how CI checks every kernel without a GPU)."""

from __future__ import annotations

import os

import torch

try:
    import triton
except ImportError:  # pragma: no cover - CPU installs without Triton use the PyTorch paths
    triton = None

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_runs_on(x: torch.Tensor) -> bool:
    """Whether Triton is installed and can run on x's device (CUDA, or any device when interpreting)."""
    return triton is not None and (x.is_cuda or INTERPRET)
