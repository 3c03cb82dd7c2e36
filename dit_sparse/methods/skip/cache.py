"""The skip cache's data and math: bit-packed skip sets, the per-tile mass bound, the greedy choice of
tiles to skip, range membership hashes, and the per-(layer, branch) `SkipState`."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from dit_sparse.lagged import LaggedFlag
from dit_sparse.plan import BlockPlan, token_to_range
from dit_sparse.state import LayerState

Tensor = torch.Tensor

_SUM_SLACK = 1e-5  # float32 cumulative sums: decide against a slightly smaller tolerance


# ---------------------------------------------------------------------------------------------- bits
def pack_bits(mask: Tensor) -> Tensor:
    """Bool [..., N] -> uint8 [..., ceil(N / 8)] (bit b of byte j is element 8 j + b)."""
    n = mask.shape[-1]
    pad = (-n) % 8
    m = torch.nn.functional.pad(mask.to(torch.uint8), (0, pad)).unflatten(-1, (-1, 8))
    # Built on the device (a host tensor would be a synchronising copy on every call).
    weights = torch.bitwise_left_shift(torch.ones(8, dtype=torch.uint8, device=mask.device),
                                       torch.arange(8, dtype=torch.uint8, device=mask.device))
    return (m * weights).sum(-1, dtype=torch.uint8)


def unpack_bits(packed: Tensor, n: int) -> Tensor:
    """Inverse of `pack_bits`: uint8 [..., ceil(n / 8)] -> bool [..., n]."""
    shifts = torch.arange(8, dtype=torch.uint8, device=packed.device)
    bits = (packed[..., None] >> shifts) & 1
    return bits.flatten(-2)[..., :n].bool()


def skip_cache_bytes(
    num_layers: int,
    heads: int,
    tokens: int,
    block: int = 64,
    branches: int = 2,
    batch: int = 1,
    variable_ranges: bool = False,
) -> int:
    """Persistent GPU bytes of the skip cache for a whole model (bits + per-row budget [+ range hashes]).

    `variable_ranges`: the base plan's ranges can change membership (a token order or variable ranges),
    so an int64 membership hash per query and key range is kept too.

    Wan2.1-14B 720p (40 layers, 40 heads, 75,600 tokens, 64-token tiles, CFG): 1182 x 148 bytes of bits
    plus 4 bytes of budget per query range -> 575 MB, 0.72% of 80 GB.
    """
    n = -(-tokens // block)
    rows = num_layers * branches * batch * heads * n
    total = rows * (-(-n // 8)) + rows * 4
    if variable_ranges:  # int64 membership hashes of the previous call's query and key ranges
        total += num_layers * branches * batch * heads * 2 * n * 8
    return total


# ---------------------------------------------------------------------------------------------- bound
def tile_log_bounds(plan: BlockPlan, lse: Tensor, tile_lse: Tensor) -> Tensor:
    """log of the per-tile mass bound exp(tile_lse - min row LSE), aligned with `plan.kv_indices`.

    `lse` is [B, H, S] in original token order, `tile_lse` [B, H, NQ, MAXK] (`AttentionResult.tile_lse`: the
    largest row log-sum-exp over the tile's keys). Unusable entries (no rows, no keys) give -inf (bound 0);
    undefined ones (NaN) give +inf, so they are never skipped.
    """
    B, H, NQ, MAXK = tile_lse.shape
    lse = lse.float()
    if plan.q_perm is not None:
        lse = torch.gather(lse, 2, plan.q_perm)
    q_range = token_to_range(plan.q_offsets, lse.shape[-1])
    min_lse = torch.full((B, H, NQ), math.inf, dtype=torch.float32, device=lse.device)
    min_lse.scatter_reduce_(2, q_range, lse, reduce="amin")
    lb = tile_lse.float() - min_lse[..., None]
    return torch.nan_to_num(lb, nan=math.inf, posinf=math.inf, neginf=-math.inf)


def greedy_skips(
    log_bounds: Tensor,
    kv_indices: Tensor,
    kv_counts: Tensor,
    budget: Tensor,
    tol: float,
    cap_left: Tensor,
    num_k: int,
) -> tuple[Tensor, Tensor]:
    """Pick, per row, the smallest-bound slots while `budget` + their summed bounds stays < `tol`.

    Args are [..., MAXK] (bounds, indices), [...] (counts, already committed budget, how many more tiles
    the cap allows). Returns (bool [..., num_k] new skips by key-range index, float32 [...] added budget).
    """
    maxk = log_bounds.shape[-1]
    slots = torch.arange(maxk, device=log_bounds.device)
    bounds = torch.exp(log_bounds).masked_fill(slots >= kv_counts[..., None], math.inf)
    sorted_b, order = torch.sort(bounds, dim=-1)
    cum = torch.cumsum(sorted_b, -1) + budget[..., None]
    # Bounds are >= 0, so `take` is a prefix of the sorted order: the greedy rule.
    take = (cum < tol * (1.0 - _SUM_SLACK)) & (slots < cap_left[..., None])
    added = torch.where(take, sorted_b, torch.zeros_like(sorted_b)).sum(-1)
    idx = torch.gather(kv_indices.long(), -1, order)
    hits = torch.zeros(*idx.shape[:-1], num_k, dtype=torch.uint8, device=idx.device)
    # scatter_add: untaken slots may repeat an index (padding) and must not clear a taken one.
    hits.scatter_add_(-1, idx, take.to(torch.uint8))
    return hits > 0, added


# ---------------------------------------------------------------------------------------------- state
@dataclass
class SkipState(LayerState):
    """Cache of one (layer, CFG branch): packed skip bits, committed bound per query range, bookkeeping."""

    bits: Tensor | None = None  # uint8 [B, H, NQ, ceil(NK / 8)]
    budget: Tensor | None = None  # float32 [B, H, NQ]: summed bounds of the skipped tiles
    shape: tuple | None = None  # (B, H, NQ, NK, device) the cache was built for
    q_hash: Tensor | None = None  # int64 [B, H, NQ] membership hash of each query range (ranges that move)
    k_hash: Tensor | None = None  # int64 [B, H, NK]
    calls: int = 0
    updates: int = 0  # learning calls so far (they set the rotating re-check)
    version: int = 0  # bumped whenever `bits` change: a cached executed plan is valid for one version
    pending: dict[str, Any] | None = field(default=None, repr=False)
    executed: tuple | None = field(default=None, repr=False)  # (base plan, version, plan run between updates)
    empty: LaggedFlag = field(default_factory=LaggedFlag, repr=False)  # no skip cached after the last update
    next_update: int = 0  # call index of the next learning call
    interval: int = 0  # calls between the last two learning calls

    def clear(self) -> None:
        self.bits = self.budget = self.shape = self.q_hash = self.k_hash = None
        self.executed = None
        self.empty.clear()
        self.version += 1

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.bits, self.budget, self.q_hash, self.k_hash)
                   if t is not None)


_HASH_MUL, _HASH_MOD = 2654435761, 2**31 - 1


def range_hashes(offsets: Tensor, perm: Tensor | None, seq_len: int) -> Tensor:
    """int64 [B, H, N]: a hash of the set of original tokens in each range of a plan order.

    Each token gets a pseudo-random value below 2^31 and a range's hash is their sum (order-free), taken
    as a difference of prefix sums: equal sets give equal hashes, and a changed set collides only by
    chance. Sums stay far below 2^63 for any sequence length.
    """
    B, H = offsets.shape[:2]
    tok = torch.arange(seq_len, device=offsets.device).expand(B, H, seq_len) if perm is None else perm.long()
    cum = torch.cumsum((tok + 1) * _HASH_MUL % _HASH_MOD, -1)
    cum = torch.cat([torch.zeros_like(cum[..., :1]), cum], -1)
    off = offsets.long()
    return torch.gather(cum, 2, off[..., 1:]) - torch.gather(cum, 2, off[..., :-1])
