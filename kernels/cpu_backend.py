"""The "cpu" backend: block plans on the CPU with a few large operations and the CPU's fused attention.

The reference executor walks query ranges one at a time in Python (it is the oracle, written for
clarity); this backend runs every query range of every (batch, head) at once:

1. Work items: each query range cut into pieces of at most 128 rows, each with its range's selected keys
   (the keys of its selected key ranges, back to back). Items are sorted by selection size and cut into
   8 groups, so neither a long range nor a wide selection pads the others much.
2. Per group, query rows [1, n, 128, D] and keys/values [1, n, Lk, D] are copied whole (`index_select`
   over storage rows) straight from the caller's tensors, permutations included: work and memory scale
   with the density, not with S^2.
3. One `scaled_dot_product_attention` call per group (a key-padding mask only where selections differ).
4. Output rows are copied to their original tokens (`index_copy_`).

The index arithmetic depends on the plan alone and is cached in it (a reused plan pays it once).

Reading plan data on the host (the widest range and selection) costs nothing on a CPU. No LSE or tile
statistics (the reference executor provides them, e.g. for `skip`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from dit_sparse.plan import BlockPlan, row_view, storage_rows

from .backend_call import raise_if_unsupported, softmax_scale
from .dispatch import Backend, register_backend
from .result import AttentionResult

Tensor = torch.Tensor


def supports_setting(device: torch.device, dtype: torch.dtype | None) -> str | None:
    if device.type != "cpu":
        return "the cpu backend runs CPU tensors"
    return None


def supports(q: Tensor, plan: BlockPlan) -> str | None:
    return supports_setting(q.device, q.dtype)


def _key_positions(plan: BlockPlan) -> tuple[Tensor, Tensor]:
    """Plan-order key positions of each query range's selection, packed left: (int64 [B, H, NQ, Lk],
    bool valid [B, H, NQ, Lk]). Lk is the widest selection (at least 1)."""
    B, H, NQ, W = plan.kv_indices.shape
    k_off = plan.k_offsets.long()
    k_len = k_off[..., 1:] - k_off[..., :-1]  # [B, H, NK]
    slot_ok = torch.arange(W) < plan.kv_counts[..., None].long()  # [B, H, NQ, W]
    idx = plan.kv_indices.long()
    start = torch.gather(k_off[..., :-1][:, :, None, :].expand(B, H, NQ, -1), 3, idx)  # [B, H, NQ, W]
    length = torch.where(slot_ok, torch.gather(k_len[:, :, None, :].expand(B, H, NQ, -1), 3, idx), 0)
    ends = length.cumsum(-1)  # selection-local end of each slot's keys
    total = ends[..., -1]  # keys per query range
    Lk = max(int(total.max()), 1)
    pos = torch.arange(Lk)
    # Slot holding each packed position, then its offset inside that slot's key range.
    slot = torch.searchsorted(ends.reshape(-1, W), pos.expand(B * H * NQ, Lk).contiguous(), right=True)
    slot = slot.clamp_(max=W - 1).view(B, H, NQ, Lk)
    before = torch.gather(ends - length, 3, slot)
    keys = torch.gather(start, 3, slot) + (pos - before)
    valid = pos < total[..., None]
    return torch.where(valid, keys, 0), valid


_ROWS = 128  # query rows per work item: long ranges are cut, so no range pads the others
_GROUPS = 8  # work items are sorted by selection size and cut into this many equal groups


@dataclass
class _Group:
    """Work items of similar selection size: n items of `rows` query rows against `keys` keys each."""

    q_tok: Tensor  # int64 [n, rows] original query token of each row (0 for padding)
    k_tok: Tensor  # int64 [n, keys] original key token of each key (0 for padding)
    bh: Tensor  # int64 [n] flat (batch * H + head) of each item
    mask: Tensor | None  # bool [1, n, 1, keys] valid keys, None when no key is padding
    written: Tensor  # bool [n * rows] rows that exist


def _groups(plan: BlockPlan) -> list[_Group]:
    """The plan's work cut into items (<= _ROWS query rows of one range, with that range's keys), grouped by
    selection size so padding stays small. Index arithmetic only; cached in the plan."""
    keys, key_ok = _key_positions(plan)
    B, H, NQ, Lk = keys.shape
    total = key_ok.sum(-1).reshape(-1)  # keys per (b, h, range)
    q_off = plan.q_offsets.long().reshape(B * H, NQ + 1)
    q_len = (q_off[:, 1:] - q_off[:, :-1]).reshape(-1)
    rows = max(1, min(_ROWS, int(q_len.max())))
    n_chunks = torch.where(total > 0, (q_len + rows - 1) // rows, 0)  # ranges with no keys: rows stay 0
    item_range = torch.repeat_interleave(torch.arange(B * H * NQ), n_chunks)
    if item_range.numel() == 0:
        return []
    first = torch.repeat_interleave(n_chunks.cumsum(0) - n_chunks, n_chunks)
    chunk = torch.arange(item_range.numel()) - first
    order = torch.argsort(total[item_range], stable=True)
    keys_flat, ok_flat = keys.reshape(-1, Lk), key_ok.reshape(-1, Lk)
    q_perm = None if plan.q_perm is None else plan.q_perm.reshape(B * H, -1)
    k_perm = None if plan.k_perm is None else plan.k_perm.reshape(B * H, -1)
    out = []
    for part in torch.tensor_split(order, min(_GROUPS, order.numel())):
        r = item_range[part]  # flat (b, h, range) of each item
        bh = r // NQ
        width = max(1, int(total[r].max()))
        start = q_off[bh, r % NQ] + chunk[part] * rows
        pos = start[:, None] + torch.arange(rows)
        row_ok = pos < q_off[bh, r % NQ + 1][:, None]
        pos = torch.where(row_ok, pos, 0)
        kpos, kok = keys_flat[r, :width], ok_flat[r, :width]
        q_tok = pos if q_perm is None else torch.gather(q_perm[bh], 1, pos)
        k_tok = kpos if k_perm is None else torch.gather(k_perm[bh], 1, kpos)
        mask = None if bool(kok.all()) else kok[None, :, None, :]
        out.append(_Group(q_tok, k_tok, bh, mask, row_ok.reshape(-1)))
    return out


def _rows(x: Tensor, bh: Tensor, tok: Tensor) -> Tensor | None:
    """Storage row of x[b, h, tok] for x [B, H, S, D] (bh = b * H + h per item, tok [n, L]), or None."""
    H = x.shape[1]
    return storage_rows(x, tok, (bh // H)[:, None], (bh % H)[:, None])


def _take(x: Tensor, bh: Tensor, tok: Tensor) -> Tensor:
    """x [B, H, S, D] at (item's head, token) for tok [n, L]: [1, n, L, D], one row copy."""
    n, L = tok.shape
    D = x.shape[-1]
    rows = _rows(x, bh, tok)
    if rows is None:
        flat = x.reshape(-1, x.shape[2], D)  # copies when x's strides are not whole rows
        return flat[bh[:, None], tok].view(1, n, L, D)
    return row_view(x).index_select(0, rows.reshape(-1)).view(1, n, L, D)


def cpu_block_sparse_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    plan: BlockPlan,
    scale: float | None = None,
    return_lse: bool = False,
    return_tile_stats: bool = False,
) -> AttentionResult:
    """Run `plan` on the CPU (same contract as the reference executor, without LSE or tile statistics)."""
    if return_lse or return_tile_stats:
        raise ValueError("the cpu backend computes no LSE or tile statistics; use backend='reference'")
    raise_if_unsupported("cpu", supports(q, plan))
    B, H, S, D = q.shape
    scale = softmax_scale(scale, D)
    out = torch.zeros(B, H, S, D, dtype=q.dtype)  # rows of ranges that selected nothing stay 0
    out_rows = row_view(out)
    for g in plan.cached("cpu.groups", lambda: _groups(plan)):
        o = F.scaled_dot_product_attention(_take(q, g.bh, g.q_tok), _take(k, g.bh, g.k_tok),
                                           _take(v, g.bh, g.k_tok), attn_mask=g.mask, scale=scale)
        dest = _rows(out, g.bh, g.q_tok).reshape(-1)[g.written]
        out_rows.index_copy_(0, dest, o.reshape(-1, D)[g.written].to(q.dtype))
    return AttentionResult(out=out)


register_backend(Backend(name="cpu", run=cpu_block_sparse_attention, supports=supports,
                         supports_setting=supports_setting, lse=False))
