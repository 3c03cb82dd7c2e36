"""Token permutation for kernels that read tokens in order (flash-attn-4): one Triton row copy per operand.

`gather_rows(x, idx)` reads x [B, H, S, D] (any strides with unit stride in D, e.g. Diffusers' [B, S, H, D]
seen as [B, H, S, D]) at positions `idx` [B, H, L] and writes a contiguous [B, L, H, D] tensor, the
layout flash-attn-4 takes. A per-head order (semantic's clusters) is one launch that copies whole rows
of D values; PyTorch's row `index_select` over the storage rows moved the same bytes at about a quarter
of the H200's bandwidth (240 us per operand at Wan-1.3B's shape, four operands per call). The output
goes back with the same kernel and the inverse order.

On the CPU (and without Triton) the same result is built with PyTorch (`permute_tokens`); under
TRITON_INTERPRET=1 the kernel itself runs on CPU tensors, which is how CI checks it.
"""

from __future__ import annotations

import torch

from dit_sparse.plan import permute_tokens

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - CPU installs without Triton use PyTorch
    triton = None

from .triton_util import triton_runs_on

Tensor = torch.Tensor

_ROWS = 32  # rows of D values per program: 8 KB of bf16 at D = 128, enough bytes in flight per SM


def use_kernel(x: Tensor) -> bool:
    """Whether `gather_rows` runs the Triton kernel for x (CUDA, or any device under the interpreter)."""
    return triton_runs_on(x) and x.stride(-1) == 1


def gather_rows(x: Tensor, idx: Tensor) -> Tensor:
    """out[b, l, h] = x[b, h, idx[b, h, l]] for x [B, H, S, D] and idx [B, H, L] (int32/int64, valid
    positions; expanded views such as one order shared by every head are fine): contiguous [B, L, H, D]."""
    B, H, S, D = x.shape
    if idx.dim() != 3 or idx.shape[:2] != (B, H):
        raise ValueError(f"idx must be [B, H, L] = [{B}, {H}, L], got {tuple(idx.shape)}")
    L = idx.shape[-1]
    if not use_kernel(x):
        return permute_tokens(x, idx.long()).transpose(1, 2).contiguous()
    out = torch.empty(B, L, H, D, dtype=x.dtype, device=x.device)
    if out.numel() == 0:
        return out
    grid = (triton.cdiv(L, _ROWS), B * H)
    _gather_rows_kernel[grid](
        x, idx, out, L, H,
        *x.stride()[:3], *idx.stride(), *out.stride()[:3],
        D=D, BLOCK_D=triton.next_power_of_2(D), ROWS=_ROWS, num_warps=4,
    )
    return out


if triton is not None:

    @triton.jit
    def _gather_rows_kernel(
        X, IDX, OUT, L, H,
        sxb, sxh, sxs,
        sib, sih, sil,
        sob, sol, soh,
        D: tl.constexpr,
        BLOCK_D: tl.constexpr,
        ROWS: tl.constexpr,
    ):
        n = tl.program_id(1)  # b * H + h
        b = (n // H).to(tl.int64)  # offsets of large batches pass 2^31 elements
        h = (n % H).to(tl.int64)
        rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
        ok = rows < L
        pos = tl.load(IDX + b * sib + h * sih + rows.to(tl.int64) * sil, mask=ok, other=0).to(tl.int64)
        cols = tl.arange(0, BLOCK_D)
        m = ok[:, None] & (cols[None, :] < D)
        vals = tl.load(X + b * sxb + h * sxh + pos[:, None] * sxs + cols[None, :], mask=m)
        tl.store(OUT + b * sob + h * soh + rows.to(tl.int64)[:, None] * sol + cols[None, :], vals, mask=m)
