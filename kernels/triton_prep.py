"""Launch metadata for the Triton block-sparse kernel, computed from a `BlockPlan` with tensor ops only.

Everything here runs on the plan's device without a host synchronisation: buffer sizes come from
shapes (static upper bounds), never from data.

* Key chunks (`key_chunks`): for each (batch*head, query range), the selected key ranges are merged into
  maximal runs of consecutive ranges ("spans"; empty ranges are transparent), and each span is cut into
  BLOCK_N-sized chunks. Chunks that are entirely valid come first ("full"), then the chunks that need a
  column bound ("masked": span tails). With statistics on, every selected range is its own span, so each
  chunk belongs to exactly one range (its slot's statistic needs no per-column attribution) and each slot
  has at most one masked chunk, its tail.
  Fixed-block plans whose key block equals BLOCK_N take a cheaper path over `kv_indices` directly.
* Query tiles (`query_tiles`): each query range is cut into BLOCK_M tiles; tiles are listed per
  (batch*head) with the most key chunks first (longest-processing-time order; the grid stays head-major
  so that programs running together share one head's keys in L2).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from dit_sparse.plan import BlockPlan

Tensor = torch.Tensor


@dataclass
class KeyChunks:
    """Per (batch*head, query range) list of key chunks; see the module docstring."""

    starts: Tensor  # int32 [BH, NQ, MAXC] first plan key position of each chunk
    ends: Tensor  # int32 [BH, NQ, MAXC] exclusive bound (read for masked chunks only)
    slots: Tensor  # int32 [BH, NQ, MAXC] kv slot of the key range holding the chunk start
    counts: Tensor  # int32 [BH, NQ, 2] (full chunks, masked chunks)


@dataclass
class QueryTiles:
    tiles: Tensor  # int32 [BH, T, 2] (query range or -1, first plan row), most work first
    q_offsets: Tensor  # int32 [BH, NQ + 1] contiguous

    @property
    def num(self) -> int:
        return self.tiles.shape[1]


def _cdiv(x: Tensor, d: int) -> Tensor:
    return torch.div(x + (d - 1), d, rounding_mode="floor")


def _slot_map(plan: BlockPlan) -> Tensor:
    """int32 [B, H, NQ, NK]: the kv slot selecting each key range (-1 if none)."""
    B, H, NQ, maxk = plan.kv_indices.shape
    nk = plan.num_k_blocks
    dev = plan.kv_indices.device
    valid = torch.arange(maxk, device=dev) < plan.kv_counts[..., None]
    idx = torch.where(valid, plan.kv_indices.long(), nk)  # padded slots go to a dummy column
    slot_of = torch.full((B, H, NQ, nk + 1), -1, dtype=torch.int32, device=dev)
    slot_of.scatter_(-1, idx, torch.arange(maxk, device=dev, dtype=torch.int32).expand(B, H, NQ, maxk))
    return slot_of[..., :nk]


def key_chunks(plan: BlockPlan, seq_len_k: int, block_n: int, stats: bool) -> KeyChunks:
    """Key chunk lists for BLOCK_N = `block_n`; `stats` asks for per-range attribution of max logits."""
    if plan.block_size is not None and plan.block_size[1] == block_n:
        return _fixed_key_chunks(plan, seq_len_k, block_n)
    return _span_key_chunks(plan, seq_len_k, block_n, stats)


def _fixed_key_chunks(plan: BlockPlan, sk: int, bn: int) -> KeyChunks:
    """Chunks = selected blocks in plan order; the padded last block (if selected) is moved to the end.

    Valid `kv_indices` entries are assumed distinct (as `BlockPlan.from_range_mask` builds them).
    No sort: a handful of elementwise ops, since this runs for every new plan.
    """
    B, H, NQ, maxk = plan.kv_indices.shape
    nk = plan.num_k_blocks
    dev = plan.kv_indices.device
    pos = torch.arange(maxk, device=dev)
    cnt = plan.kv_counts.long()
    idx = plan.kv_indices.long()
    last = (cnt - 1).clamp(min=0)[..., None]
    if sk % bn:
        is_tail = (pos < cnt[..., None]) & (idx == nk - 1)
        has_tail = is_tail.any(-1, keepdim=True)
        at = is_tail.long().argmax(-1, keepdim=True)
        # Swap the tail slot with the last valid slot.
        src = torch.where(has_tail & (pos == at), last, torch.where(has_tail & (pos == last), at, pos))
        idx = idx.gather(-1, src)
        n_mask = has_tail[..., 0].long()
    else:
        src = pos.expand(B, H, NQ, maxk)
        n_mask = torch.zeros_like(cnt)
    starts = idx * bn
    ends = (starts + bn).clamp(max=sk)
    counts = torch.stack([cnt - n_mask, n_mask], -1)
    bh = B * H
    return KeyChunks(
        starts=starts.to(torch.int32).reshape(bh, NQ, maxk),
        ends=ends.to(torch.int32).reshape(bh, NQ, maxk),
        slots=(src * 4 + 3).to(torch.int32).reshape(bh, NQ, maxk),  # every chunk is its own slot's run
        counts=counts.to(torch.int32).reshape(bh, NQ, 2),
    )


def _span_key_chunks(plan: BlockPlan, sk: int, bn: int, stats: bool) -> KeyChunks:
    B, H, NQ, maxk = plan.kv_indices.shape
    nk = plan.num_k_blocks
    dev = plan.kv_indices.device
    koff = plan.k_offsets.long()
    a = koff[..., :-1][:, :, None, :]  # [B, H, 1, NK] range starts
    e = koff[..., 1:][:, :, None, :]  # range ends
    sel = plan.block_mask()
    if stats:  # every selected range is its own span
        opens = closes = sel
    else:
        sel = sel | (a == e)  # empty ranges never break a span
        edge = torch.zeros_like(sel[..., :1])
        opens = sel & ~torch.cat([edge, sel[..., :-1]], -1)
        closes = sel & ~torch.cat([sel[..., 1:], edge], -1)
    # Span of each selected range: the last opening at or before it, the first closing at or after it.
    span_s = torch.where(opens, a, 0).cummax(-1).values
    span_e = torch.where(closes, e, sk).flip(-1).cummin(-1).values.flip(-1)
    # Chunks of a span start at span_s + i * bn; range j owns the chunks starting inside it.
    lo = _cdiv(a - span_s, bn)
    n_in = torch.where(sel, _cdiv(e - span_s, bn) - lo, 0)
    cum = n_in.cumsum(-1)
    maxc = math.ceil(sk / bn) + min(maxk, nk)  # >= sum over spans of ceil(len / bn)
    c = torch.arange(maxc, device=dev)
    rows = B * H * NQ
    j = torch.searchsorted(cum.reshape(rows, nk), c.expand(rows, maxc).contiguous(), right=True)
    j = j.clamp_(max=nk - 1).view(B, H, NQ, maxc)

    def at(x: Tensor) -> Tensor:
        return x.expand(B, H, NQ, nk).gather(-1, j)

    valid = c < cum[..., -1:]
    local = c - (at(cum) - at(n_in))
    start = at(span_s) + (at(lo) + local) * bn
    s_end = at(span_e)
    end = torch.minimum(start + bn, s_end)
    masked = start + bn > s_end
    slot_of = _slot_map(plan)
    slot = at(slot_of.long()).clamp(min=0)
    is_f = valid & ~masked
    is_m = valid & masked
    n_f = is_f.sum(-1, keepdim=True)
    pos = torch.where(is_f, is_f.cumsum(-1) - 1, n_f + is_m.cumsum(-1) - 1)
    pos = torch.where(valid, pos, maxc)  # unused entries land in a dummy column

    def compact(x: Tensor) -> Tensor:
        buf = torch.zeros(B, H, NQ, maxc + 1, dtype=torch.int32, device=dev)
        buf.scatter_(-1, pos, x.to(torch.int32))
        return buf[..., :maxc].reshape(B * H, NQ, maxc).contiguous()

    counts = torch.cat([n_f, is_m.sum(-1, keepdim=True)], -1)
    # Full chunks mark the first/last chunk of each slot's run (slot * 4 + first * 2 + last), so the kernel
    # combines a run's statistics in registers and writes them once.
    ends_c = compact(end)
    slot_c = compact(slot).view(B, H, NQ, maxc).long()
    k_pos = c.expand_as(slot_c)
    in_full = k_pos < n_f
    prev_s = torch.cat([torch.full_like(slot_c[..., :1], -1), slot_c[..., :-1]], -1)
    next_s = torch.cat([slot_c[..., 1:], torch.full_like(slot_c[..., :1], -1)], -1)
    first = (prev_s != slot_c) | (k_pos == 0)
    lastf = (next_s != slot_c) | (k_pos == n_f - 1)
    code = slot_c * 4 + torch.where(in_full, first.long() * 2 + lastf.long(), 0)
    return KeyChunks(
        starts=compact(start),
        ends=ends_c,
        slots=code.to(torch.int32).reshape(B * H, NQ, maxc),
        counts=counts.to(torch.int32).reshape(B * H, NQ, 2).contiguous(),
    )


def query_tiles(plan: BlockPlan, seq_len_q: int, block_m: int, chunks: KeyChunks) -> QueryTiles:
    """BLOCK_M tiles of every query range, per (batch*head), most key chunks first."""
    B, H = plan.kv_counts.shape[:2]
    NQ = plan.num_q_blocks
    dev = plan.kv_counts.device
    qoff = plan.q_offsets.long().reshape(B * H, NQ + 1)
    if plan.block_size is not None and plan.block_size[0] % block_m == 0:
        # Fixed blocks: tile t is piece t % per of block t // per (pieces past the end are invalid).
        bq = plan.block_size[0]
        per = bq // block_m
        T = NQ * per
        t = torch.arange(T, device=dev)
        r = (t // per).expand(B * H, T)
        row0 = (t // per) * bq + (t % per) * block_m
        valid = (row0 < seq_len_q).expand(B * H, T)
        row0 = row0.expand(B * H, T)
    else:
        n_t = _cdiv(qoff[:, 1:] - qoff[:, :-1], block_m)
        cum = n_t.cumsum(-1)
        T = math.ceil(seq_len_q / block_m) + NQ  # each range adds at most one partial tile
        t = torch.arange(T, device=dev).expand(B * H, T).contiguous()
        r = torch.searchsorted(cum.contiguous(), t, right=True).clamp_(max=NQ - 1)
        valid = t < cum[:, -1:]
        row0 = qoff.gather(-1, r) + (t - (cum.gather(-1, r) - n_t.gather(-1, r))) * block_m
    work = chunks.counts.sum(-1).long().gather(-1, r)
    work = torch.where(valid, work, -1)
    order = torch.sort(work, dim=-1, descending=True, stable=True).indices
    tiles = torch.stack([torch.where(valid, r, -1), row0], -1).gather(1, order[..., None].expand(-1, -1, 2))
    return QueryTiles(tiles=tiles.to(torch.int32).contiguous(), q_offsets=qoff.to(torch.int32).contiguous())
