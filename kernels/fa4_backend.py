"""The "fa4" backend: flash-attn-4's block-sparse forward (CuTe DSL kernels) on fixed-block plans.

flash-attn-4 (PyPI `flash-attn-4`, `pip install dit-sparse[fa4]`) takes FlexAttention's block format: per
(batch, head, query block) a count and the indices of the key blocks to compute, as "full" blocks (no
mask evaluated inside). A `BlockPlan` with fixed blocks is exactly that (its `kv_indices` already have the
static width NK that flash-attn-4 expects), so the plan is passed through without any preparation.

What it runs: CUDA sm90 (H100/H200) and sm100 GPUs, bfloat16/float16, head dim 64 or 128, query blocks
that are a multiple of 64 tokens and key blocks of 64 or 128 tokens. Tile statistics are not available
(`skip` uses the Triton kernel). Plans with a token order (window3d's tile-major order, semantic's
clusters) are permuted physically around the call: one Triton row copy (`permute.gather_rows`) per
operand, and the output (and LSE) are put back in original order the same way.
flash-attn-4 compiles each new configuration once (a few seconds) on first use.
"""

from __future__ import annotations

import functools
import importlib.util

import torch

from dit_sparse.plan import BlockPlan, shares_order

from .backend_call import (
    checks_setting_first,
    cuda_half_reason,
    raise_if_tile_stats,
    raise_if_unsupported,
    softmax_scale,
)
from .dispatch import Backend, register_backend
from .permute import gather_rows
from .result import AttentionResult

Tensor = torch.Tensor

_HEAD_DIMS = (64, 128)
_ARCHS = (9, 10)  # sm90, sm100: where flash-attn-4 implements block sparsity


@functools.lru_cache(maxsize=1)
def installed() -> bool:
    """True when flash-attn-4 can be imported (checked once; importing it loads the CuTe DSL)."""
    if importlib.util.find_spec("flash_attn") is None:
        return False
    try:
        from flash_attn.cute import flash_attn_func  # noqa: F401
        from flash_attn.cute.block_sparsity import BlockSparseTensorsTorch  # noqa: F401
    except Exception:  # an incomplete install (e.g. a missing CUTLASS DSL library) is "not installed"
        return False
    return True


def supports_setting(device: torch.device, dtype: torch.dtype | None) -> str | None:
    """The part of `supports` known before any tensor exists (device, dtype if known)."""
    return cuda_half_reason(device, dtype, "flash-attn-4 needs CUDA tensors", " by flash-attn-4 here")


@checks_setting_first(supports_setting)
def supports(q: Tensor, plan: BlockPlan) -> str | None:
    """None if flash-attn-4 can run these inputs, else the reason it cannot."""
    if q.shape[-1] not in _HEAD_DIMS:
        return f"head dim {q.shape[-1]} is not supported by the flash-attn-4 backend (64 or 128)"
    if plan.block_size is None:
        return "flash-attn-4 needs fixed-size blocks (the plan has variable ranges)"
    bq, bk = plan.block_size
    if bq % 64 or bk not in (64, 128):
        return f"flash-attn-4 needs query blocks of a multiple of 64 and key blocks of 64 or 128, plan has {bq}x{bk}"
    if torch.cuda.get_device_capability(q.device)[0] not in _ARCHS:
        return "flash-attn-4 block sparsity runs on sm90/sm100 GPUs only"
    if not installed():
        return "flash-attn-4 is not installed (pip install 'dit-sparse[fa4]')"
    return None


def _to_plan_order(x: Tensor, perm: Tensor | None) -> Tensor:
    """x [B, H, S, D] (any strides) in plan order, returned as a [B, S, H, D] view with unit last stride."""
    if perm is None:
        return x.transpose(1, 2)
    # One Triton row copy straight into flash-attn-4's [B, S, H, D] layout, shared or per-head order alike:
    # on CogVideoX's CFG shape (B = 2, 48 heads of 64) PyTorch's index_select over tokens was the slower copy.
    return gather_rows(x, perm)


def _inverse(plan: BlockPlan) -> Tensor:
    """Inverse of the query order (original token -> plan position), cached in the plan."""
    def build() -> Tensor:
        p = plan.q_perm
        if shares_order(p):
            inv = torch.empty_like(p[0, 0])
            inv[p[0, 0]] = torch.arange(p.shape[-1], device=p.device)
            return inv.expand_as(p)
        inv = torch.empty_like(p)
        inv.scatter_(-1, p, torch.arange(p.shape[-1], device=p.device).expand_as(p))
        return inv

    return plan.cached("fa4.q_inverse", build)


def _tensors(plan: BlockPlan):
    from flash_attn.cute.block_sparsity import BlockSparseTensorsTorch

    def build():
        counts = plan.kv_counts.to(torch.int32).contiguous()
        idx = plan.kv_indices.to(torch.int32).contiguous()
        # Every selected block is a "full" block: no partial (masked) blocks at all.
        return BlockSparseTensorsTorch(
            mask_block_cnt=torch.zeros_like(counts),
            mask_block_idx=torch.zeros_like(idx),
            full_block_cnt=counts,
            full_block_idx=idx,
            block_size=plan.block_size,
        )

    return plan.cached("fa4.tensors", build)


def fa4_block_sparse_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    plan: BlockPlan,
    scale: float | None = None,
    return_lse: bool = False,
    return_tile_stats: bool = False,
) -> AttentionResult:
    """Run a fixed-block `plan` with flash-attn-4 (same contract as the reference, without tile stats)."""
    raise_if_unsupported("fa4", supports(q, plan))
    raise_if_tile_stats("fa4", return_tile_stats)
    if plan.kv_indices.shape[-1] != plan.num_k_blocks:
        raise ValueError("fa4 backend needs kv_indices of width NK (as BlockPlan.from_range_mask builds them)")
    from flash_attn.cute import flash_attn_func

    scale = softmax_scale(scale, q.shape[-1])
    qs = _to_plan_order(q, plan.q_perm)
    ks = _to_plan_order(k, plan.k_perm)
    vs = _to_plan_order(v, plan.k_perm)
    res = flash_attn_func(qs, ks, vs, softmax_scale=scale, block_sparse_tensors=_tensors(plan),
                          return_lse=return_lse)
    out, lse = (res[0], res[1]) if isinstance(res, tuple) else (res, None)
    out = out.transpose(1, 2)  # [B, H, S, D] view in plan order
    if plan.q_perm is not None:
        inv = _inverse(plan)
        out = gather_rows(out, inv).transpose(1, 2)  # stays [B, S, H, D] in memory
        if lse is not None:
            lse = lse.index_select(2, inv[0, 0]) if shares_order(plan.q_perm) else torch.gather(lse, 2, inv)
    if return_lse and lse is not None:
        lse = lse.float()
    return AttentionResult(out=out, lse=lse if return_lse else None)


register_backend(Backend(name="fa4", run=fa4_block_sparse_attention, supports=supports,
                         supports_setting=supports_setting), auto=True, first=True)
