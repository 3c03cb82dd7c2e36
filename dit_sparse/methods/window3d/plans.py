"""window3d's block plans: per-head patterns on a tiling as `BlockPlan`s, cached in the tiling."""

from __future__ import annotations

import torch

from dit_sparse.plan import BlockPlan, compact_indices

from .patterns import TilePattern, range_mask
from .tiling import VideoTiling

Tensor = torch.Tensor


def _pattern_indices(tiling: VideoTiling, patterns: tuple[TilePattern, ...]) -> tuple[Tensor, Tensor]:
    """Stacked (indices [P, NR, NR], counts [P, NR]) of distinct patterns on the tiling's device, cached."""
    key = ("pattern_indices", patterns)
    if key not in tiling._cache:
        per = [compact_indices(range_mask(tiling, p)) for p in patterns]
        tiling._cache[key] = (torch.stack([i for i, _ in per]).to(tiling.device),
                              torch.stack([c for _, c in per]).to(tiling.device))
    return tiling._cache[key]


def _plan_from(tiling: VideoTiling, kv_indices: Tensor, kv_counts: Tensor, batch: int, ordered: bool) -> BlockPlan:
    """The plan running per-head indices [H, NR, NR] / counts [H, NR] on the tiling's tile-major order;
    `ordered`: the tokens already come in that order (the model runs in it), so the plan has no permutation."""
    H, S = kv_indices.shape[0], tiling.seq_len
    offsets = tiling.offsets.view(1, 1, -1).expand(batch, H, -1)
    perm = None if ordered else tiling.perm.view(1, 1, -1).expand(batch, H, S)
    block = None if tiling.block is None else (tiling.block, tiling.block)
    return BlockPlan(offsets, offsets, kv_indices.unsqueeze(0).expand(batch, -1, -1, -1),
                     kv_counts.unsqueeze(0).expand(batch, -1, -1), q_perm=perm, k_perm=perm, block_size=block,
                     seq_lens=(S, S))


def build_plan(tiling: VideoTiling, patterns: tuple[TilePattern, ...], batch: int, ordered: bool = False
               ) -> BlockPlan:
    """The `BlockPlan` running head h with `patterns[h]` on `tiling` (cached in the tiling: same object on
    a hit, so a kernel's per-plan preparation is paid once). `ordered`: for tokens already in the tiling's
    order (`tiling.perm`), a plan without permutation."""
    key = ("plan", patterns, batch, ordered)
    if key not in tiling._cache:
        unique = tuple(dict.fromkeys(patterns))
        idx, cnt = _pattern_indices(tiling, unique)  # built once per distinct pattern
        head_of = torch.tensor([unique.index(p) for p in patterns], device=tiling.device)
        tiling._cache[key] = _plan_from(tiling, idx[head_of], cnt[head_of], batch, ordered)
    return tiling._cache[key]


def build_choice_plan(tiling: VideoTiling, candidates: tuple[TilePattern, ...], choice: Tensor,
                      batch: int, ordered: bool = False) -> BlockPlan:
    """The plan running head h with `candidates[choice[h]]`, `choice` an int64 [H] device tensor: built by
    indexing on the device, so a per-head choice made on the GPU is never read back."""
    idx, cnt = _pattern_indices(tiling, candidates)
    return _plan_from(tiling, idx[choice], cnt[choice], batch, ordered)
