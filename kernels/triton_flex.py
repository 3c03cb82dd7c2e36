"""The "flex" backend: FlexAttention (PyTorch's compiled Triton template) on fixed-block plans.

Selectable by name (`backend="flex"`), never chosen by "auto": it exists so that the dispatcher can use
FlexAttention wherever it measures faster than our kernel (see benchmarks/kernels.md). Blocks are passed
as "full" blocks (no mask_mod is evaluated inside them). Permutations are applied physically around the
call. Tile statistics are not available from FlexAttention.
"""

from __future__ import annotations

import torch

from dit_sparse.plan import BlockPlan

from .backend_call import (
    checks_setting_first,
    cuda_half_reason,
    raise_if_tile_stats,
    raise_if_unsupported,
    softmax_scale,
    to_plan_order,
    to_token_order,
)
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
    return cuda_half_reason(device, dtype, "FlexAttention backend needs CUDA tensors")


@checks_setting_first(supports_setting)
def supports(q: Tensor, plan: BlockPlan) -> str | None:
    """None if FlexAttention can run `plan` on these inputs, else the reason it cannot."""
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
    raise_if_unsupported("flex", supports(q, plan))
    raise_if_tile_stats("flex", return_tile_stats)
    scale = softmax_scale(scale, q.shape[-1])
    # FlexAttention reads tokens in order: permute physically around the call.
    q = to_plan_order(q, plan.q_perm)
    k, v = to_plan_order(k, plan.k_perm), to_plan_order(v, plan.k_perm)
    bm = block_mask if block_mask is not None else flex_block_mask(plan, q.shape[2], k.shape[2])
    out, lse = _flex()(q, k, v, block_mask=bm, scale=scale, return_lse=True)
    out, lse = to_token_order(out, plan.q_perm), to_token_order(lse, plan.q_perm)
    return AttentionResult(out=out, lse=lse.float() if return_lse else None)


register_backend(Backend(name="flex", run=flex_block_sparse_attention, supports=supports,
                         supports_setting=supports_setting), auto=False)
