"""What every block-sparse attention backend does around its kernel, written once: check device and dtype
before the inputs, refuse what it cannot run with the reason, resolve the softmax scale, and move tokens
into a plan's order and back with PyTorch gathers (for the executors that read tokens in plan order: the
reference, FlexAttention, and the Triton kernel's "copy" mode; flash-attn-4 uses `permute.gather_rows`)."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import torch

from dit_sparse.plan import BlockPlan

__all__ = [
    "HALF_DTYPES",
    "checks_setting_first",
    "cuda_half_reason",
    "raise_if_tile_stats",
    "raise_if_unsupported",
    "softmax_scale",
    "to_plan_order",
    "to_token_order",
]

Tensor = torch.Tensor
SettingCheck = Callable[[torch.device, torch.dtype | None], str | None]  # a backend's `supports_setting`
InputCheck = Callable[[Tensor, BlockPlan], str | None]  # a backend's `supports`

HALF_DTYPES = (torch.float16, torch.bfloat16)  # what the GPU kernels compute in


def cuda_half_reason(
    device: torch.device, dtype: torch.dtype | None, needs_cuda: str, where: str = ""
) -> str | None:
    """Why a CUDA-only float16/bfloat16 kernel cannot run on `device` in `dtype` (None: it can, or the dtype
    is not known yet): `needs_cuda` off CUDA, else the dtype (`where` names the kernel in that message)."""
    if device.type != "cuda":
        return needs_cuda
    if dtype is not None and dtype not in HALF_DTYPES:
        return f"dtype {dtype} is not supported{where} (bfloat16 or float16)"
    return None


def checks_setting_first(setting: SettingCheck) -> Callable[[InputCheck], InputCheck]:
    """Decorator for a backend's `supports(q, plan)`: `setting(q.device, q.dtype)` is asked first and its
    reason returned, the decorated checks of the inputs run only when device and dtype are fine. So the
    tensor-free `supports_setting` (checked by the CLI before a model loads) and `supports` never disagree."""

    def wrap(inputs: InputCheck) -> InputCheck:
        @functools.wraps(inputs)
        def supports(q: Tensor, plan: BlockPlan) -> str | None:
            reason = setting(q.device, q.dtype)
            return reason if reason is not None else inputs(q, plan)

        return supports

    return wrap


def raise_if_unsupported(backend: str, reason: str | None) -> None:
    """Raise ValueError("<backend> backend: <reason>") when `reason` (from the backend's `supports`) is set:
    a backend called by name on inputs it cannot run fails instead of falling back."""
    if reason is not None:
        raise ValueError(f"{backend} backend: {reason}")


def raise_if_tile_stats(backend: str, wanted: bool) -> None:
    """Raise ValueError when tile statistics are `wanted` from a backend that computes none."""
    if wanted:
        raise ValueError(f"{backend} backend computes no tile statistics; use backend='triton'")


def softmax_scale(scale: float | None, head_dim: int) -> float:
    """The logit scale: `scale`, or 1/sqrt(head_dim) when None (scaled dot-product attention's default)."""
    return 1.0 / math.sqrt(head_dim) if scale is None else float(scale)


def to_plan_order(x: Tensor, perm: Tensor | None) -> Tensor:
    """x [B, H, S, D] reordered along S by perm [B, H, S] (plan position -> original token); x itself when
    the plan keeps the original order."""
    if perm is None:
        return x
    return torch.gather(x, 2, perm[..., None].expand(-1, -1, -1, x.shape[-1]))


def to_token_order(x: Tensor, perm: Tensor | None) -> Tensor:
    """Inverse of `to_plan_order` for an output [B, H, S, D] or LSE [B, H, S] computed in plan order: each
    plan position written back to its original token."""
    if perm is None:
        return x
    idx = perm if x.dim() == 3 else perm[..., None].expand(-1, -1, -1, x.shape[-1])
    return torch.empty_like(x).scatter_(2, idx, x)
