"""The "flex" backend: FlexAttention (PyTorch's compiled Triton template) on fixed-block plans.

Selectable by name (`backend="flex"`), never chosen by "auto": it exists so that the dispatcher can use
FlexAttention wherever it measures faster than our kernel (see benchmarks/kernels.md). Blocks are passed
as "full" blocks (no mask_mod is evaluated inside them). Permutations are applied physically around the
call. Tile statistics are not available from FlexAttention.
"""

from __future__ import annotations

import math

import torch

from dit_sparse.plan import BlockPlan

from .dispatch import Backend, register_backend
from .result import AttentionResult

Tensor = torch.Tensor

_COMPILED = None


def _flex():
    global _COMPILED
    if _COMPILED is None:
        from torch.nn.attention.flex_attention import flex_attention

        _COMPILED = torch.compile(flex_attention, dynamic=False)
    return _COMPILED


def flex_block_mask(plan: BlockPlan, seq_len_q: int, seq_len_k: int):
    """FlexAttention BlockMask with the plan's selected blocks as full (unmasked) blocks."""
    from torch.nn.attention.flex_attention import BlockMask

    counts = plan.kv_counts.to(torch.int32)
    idx = plan.kv_indices.to(torch.int32)
    # Pad to all key blocks: the compiled kernel then sees one shape per problem size, whatever the density.
    idx = torch.nn.functional.pad(idx, (0, plan.num_k_blocks - idx.shape[-1]))
    zeros = torch.zeros_like(counts)
    kwargs = dict(
        full_kv_num_blocks=counts,
        full_kv_indices=idx,
        BLOCK_SIZE=plan.block_size,
        seq_lengths=(seq_len_q, seq_len_k),
    )
    try:
        return BlockMask.from_kv_blocks(zeros, torch.zeros_like(idx), compute_q_blocks=False, **kwargs)
    except TypeError:  # older torch without compute_q_blocks
        return BlockMask.from_kv_blocks(zeros, torch.zeros_like(idx), **kwargs)


def supports_setting(device: torch.device, dtype: torch.dtype | None) -> str | None:
    """None if FlexAttention can run on `device` in `dtype` (None: not known yet), else the reason."""
    if device.type != "cuda":
        return "FlexAttention backend needs CUDA tensors"
    if dtype is not None and dtype not in (torch.float16, torch.bfloat16):
        return f"dtype {dtype} is not supported (bfloat16 or float16)"
    return None


def supports(q: Tensor, plan: BlockPlan) -> str | None:
    """None if FlexAttention can run `plan` on these inputs, else the reason it cannot."""
    reason = supports_setting(q.device, q.dtype)
    if reason is not None:
        return reason
    if plan.block_size is None:
        return "FlexAttention needs fixed-size blocks (plan.block_size is None)"
    if any(b % 128 for b in plan.block_size):
        return f"FlexAttention blocks must be multiples of 128, plan has {plan.block_size}"
    return None


def flex_block_sparse_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    plan: BlockPlan,
    scale: float | None = None,
    return_lse: bool = False,
    return_tile_stats: bool = False,
    block_mask=None,
) -> AttentionResult:
    """Run a fixed-block `plan` with FlexAttention (same contract as the reference, without tile stats)."""
    reason = supports(q, plan)
    if reason is not None:
        raise ValueError(f"flex backend: {reason}")
    if return_tile_stats:
        raise ValueError("flex backend computes no tile statistics; use backend='triton'")
    D = q.shape[-1]
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    if plan.q_perm is not None:
        q = torch.gather(q, 2, plan.q_perm[..., None].expand(-1, -1, -1, D))
    if plan.k_perm is not None:
        idx = plan.k_perm[..., None].expand(-1, -1, -1, D)
        k, v = torch.gather(k, 2, idx), torch.gather(v, 2, idx)
    bm = block_mask if block_mask is not None else flex_block_mask(plan, q.shape[2], k.shape[2])
    out, lse = _flex()(q, k, v, block_mask=bm, scale=scale, return_lse=True)
    if plan.q_perm is not None:
        out = torch.empty_like(out).scatter_(2, plan.q_perm[..., None].expand(-1, -1, -1, D), out)
        lse = torch.empty_like(lse).scatter_(2, plan.q_perm, lse)
    return AttentionResult(out=out, lse=lse.float() if return_lse else None)


register_backend(Backend(name="flex", run=flex_block_sparse_attention, supports=supports,
                         supports_setting=supports_setting), auto=False)
