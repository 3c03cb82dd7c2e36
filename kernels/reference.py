"""Pure-PyTorch executor of a `BlockPlan`: the CPU path and the oracle every kernel is tested against.

Memory is O(S x chunk) per (batch, head) slice, never O(S^2): queries are processed one query range
(split into chunks of at most `chunk` rows) at a time against a token-level key mask derived from that
range's selected key ranges.
"""

from __future__ import annotations

import math

import torch

from dit_sparse.plan import BlockPlan, token_to_range

from .backend_call import softmax_scale, to_plan_order, to_token_order
from .result import AttentionResult

Tensor = torch.Tensor


def reference_block_sparse_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    plan: BlockPlan,
    scale: float | None = None,
    return_lse: bool = False,
    return_tile_stats: bool = False,
    chunk: int = 256,
    compute_dtype: torch.dtype = torch.float32,
) -> AttentionResult:
    """Block-sparse attention of q, k, v ([B, H, S, D]) under `plan`, computed in `compute_dtype`.

    Returns the output in original token order with q's dtype; rows with no selected key give zeros and
    an LSE of -inf. Tile statistics are the max scaled logit per (query range, selected key slot) aligned
    with `plan.kv_indices` (-inf for padded slots and empty tiles).
    """
    B, H, Sq, D = q.shape
    Sk = k.shape[2]
    scale = softmax_scale(scale, D)
    qp = to_plan_order(q, plan.q_perm).to(compute_dtype)
    kp = to_plan_order(k, plan.k_perm).to(compute_dtype)
    vp = to_plan_order(v, plan.k_perm).to(compute_dtype)

    bmask = plan.block_mask()  # [B, H, NQ, NK]
    k_range = token_to_range(plan.k_offsets, Sk)  # [B, H, Sk]
    q_off = plan.q_offsets.long()
    NQ, NK = plan.num_q_blocks, plan.num_k_blocks
    out_p = torch.zeros(B, H, Sq, D, dtype=compute_dtype, device=q.device)
    lse_p = torch.full((B, H, Sq), -math.inf, dtype=torch.float32, device=q.device)
    tile_lse = torch.full((B, H, NQ, NK), -math.inf, dtype=torch.float32, device=q.device) if return_tile_stats else None

    arange_chunk = torch.arange(chunk, device=q.device)
    for i in range(NQ):
        start = q_off[..., i]  # [B, H]
        length = q_off[..., i + 1] - start
        max_len = int(length.max())
        if max_len == 0:
            continue
        keymask = torch.gather(bmask[:, :, i, :], 2, k_range)  # [B, H, Sk]
        # Gather only the selected keys (padded to the widest (b, h)), so work scales with density.
        n_sel = keymask.sum(-1)  # [B, H]
        kmax = int(n_sel.max())
        if kmax == 0:
            continue
        sel = torch.argsort(keymask.to(torch.int8), dim=-1, descending=True, stable=True)[..., :kmax]
        sel_ok = torch.arange(kmax, device=q.device) < n_sel[..., None]  # [B, H, kmax]
        ks = torch.gather(kp, 2, sel[..., None].expand(-1, -1, -1, D))
        vs = torch.gather(vp, 2, sel[..., None].expand(-1, -1, -1, D))
        sel_range = torch.gather(k_range, 2, sel)
        for c0 in range(0, max_len, chunk):
            rows = c0 + arange_chunk[: min(chunk, max_len - c0)]  # [L]
            row_ok = rows < length[..., None]  # [B, H, L]
            pos = (start[..., None] + rows).clamp(max=Sq - 1)  # [B, H, L]
            qc = torch.gather(qp, 2, pos[..., None].expand(-1, -1, -1, D))
            s = torch.matmul(qc, ks.transpose(-1, -2)) * scale  # [B, H, L, kmax]
            s = s.masked_fill(~sel_ok[:, :, None, :], -math.inf)
            m = s.amax(-1, keepdim=True)
            m_safe = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
            p = torch.exp(s - m_safe)
            denom = p.sum(-1, keepdim=True)
            o = torch.matmul(p, vs) / denom.clamp_min(torch.finfo(compute_dtype).tiny)
            o = torch.where(denom > 0, o, torch.zeros_like(o))
            lse = (m_safe + torch.log(denom)).squeeze(-1).float()  # -inf where the row is empty
            o = torch.where(row_ok[..., None], o, torch.zeros_like(o))
            # Only write valid rows (padded rows alias the last valid position).
            idx = torch.where(row_ok, pos, torch.full_like(pos, -1))
            _masked_row_write(out_p, idx, o)
            _masked_row_write(lse_p[..., None], idx, lse[..., None])
            if tile_lse is not None:
                # Each row's sum over each key range (selected keys are all in `ks`), then the max over rows.
                sums = torch.zeros(B, H, p.shape[2], NK, dtype=p.dtype, device=q.device)
                sums.scatter_add_(3, sel_range[:, :, None, :].expand(-1, -1, p.shape[2], -1), p)
                row_lse = (m_safe + torch.log(sums)).float().masked_fill(~row_ok[..., None], -math.inf)
                tile_lse[:, :, i] = torch.maximum(tile_lse[:, :, i], row_lse.amax(2))

    out, lse = to_token_order(out_p, plan.q_perm), to_token_order(lse_p, plan.q_perm)
    stats = None
    if tile_lse is not None:
        stats = torch.gather(tile_lse, 3, plan.kv_indices.long())
        slot_ok = torch.arange(plan.kv_indices.shape[-1], device=q.device) < plan.kv_counts[..., None]
        stats = stats.masked_fill(~slot_ok, -math.inf)
    return AttentionResult(
        out=out.to(q.dtype), lse=lse if return_lse else None, tile_lse=stats
    )


def _masked_row_write(dst: Tensor, idx: Tensor, src: Tensor) -> None:
    """dst[b, h, idx[b, h, l]] = src[b, h, l] for every idx >= 0 (rows are unique per (b, h))."""
    B, H, L = idx.shape
    ok = idx >= 0
    b = torch.arange(B, device=idx.device)[:, None, None].expand(B, H, L)[ok]
    h = torch.arange(H, device=idx.device)[None, :, None].expand(B, H, L)[ok]
    dst[b, h, idx[ok]] = src[ok].to(dst.dtype)
