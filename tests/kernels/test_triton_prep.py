"""The Triton kernel's launch metadata (kernels/triton_prep.py), checked on CPU without the interpreter:
chunk lists must cover exactly the selected key positions once, full chunks must need no mask, and the
query tiles must cover every query row exactly once."""

from __future__ import annotations

import math

import pytest
import torch
from dit_sparse.kernels.triton_prep import key_chunks, query_tiles

from dit_sparse.plan import BlockPlan


def _offsets(s: int, n: int, gen: torch.Generator) -> torch.Tensor:
    cuts = torch.randint(0, s + 1, (n - 1,), generator=gen).sort().values  # repeats give empty ranges
    return torch.cat([torch.tensor([0]), cuts, torch.tensor([s])]).to(torch.int32)


def _plans(gen: torch.Generator):
    B, H, S = 2, 3, 203
    mask = torch.rand(B, H, 13, 13, generator=gen) < 0.4
    mask[0, 0, 2] = False
    yield "fixed16", BlockPlan.from_block_mask(mask, 16, S), S
    mask = torch.rand(B, H, 7, 26, generator=gen) < 0.4
    yield "fixed32x8", BlockPlan.from_block_mask(mask, (32, 8), S), S
    nq, nk = 9, 17
    qo = torch.stack([_offsets(S, nq, gen) for _ in range(B * H)]).view(B, H, nq + 1)
    ko = torch.stack([_offsets(S, nk, gen) for _ in range(B * H)]).view(B, H, nk + 1)
    mask = torch.rand(B, H, nq, nk, generator=gen) < 0.5
    mask[..., 0, :] = True  # long runs of consecutive ranges
    yield "var", BlockPlan.from_range_mask(mask, qo, ko), S


@pytest.mark.parametrize("block_n", [8, 16, 32])
@pytest.mark.parametrize("stats", [False, True])
def test_key_chunks_cover_selected_keys_once(block_n: int, stats: bool) -> None:
    gen = torch.Generator().manual_seed(block_n + 100 * stats)
    for name, plan, S in _plans(gen):
        ch = key_chunks(plan, S, block_n, stats)
        B, H, NQ = plan.kv_counts.shape
        bm = plan.block_mask()
        ko = plan.k_offsets
        tok_range = torch.searchsorted(ko[..., 1:].contiguous(), torch.arange(S).expand(B, H, S).contiguous(), right=True)
        for b in range(B):
            for h in range(H):
                bh = b * H + h
                for r in range(NQ):
                    want = torch.zeros(S, dtype=torch.int32)
                    want[bm[b, h, r][tok_range[b, h]]] = 1
                    n_full, n_mask = ch.counts[bh, r].tolist()
                    got = torch.zeros(S, dtype=torch.int32)
                    for c in range(n_full + n_mask):
                        s0 = int(ch.starts[bh, r, c])
                        end = abs(int(ch.ends[bh, r, c]))
                        e0 = s0 + block_n if c < n_full else end
                        assert 0 <= s0 < e0 <= min(s0 + block_n, S), (name, r, c)
                        if c < n_full:  # an unmasked chunk must be entirely selected keys
                            assert bool(want[s0:e0].all()), f"{name}: full chunk {c} of range {r} has unselected keys"
                        got[s0:e0] += 1
                        # The slot code names a kv slot that selects the range holding the chunk start.
                        slot = int(ch.slots[bh, r, c]) // 4
                        assert int(plan.kv_indices[b, h, r, slot]) == int(tok_range[b, h, s0])
                        if stats:  # every chunk inside its own key range; a slot has at most one tail
                            assert e0 <= int(ko[b, h, int(tok_range[b, h, s0]) + 1]), (name, r, c)
                    if stats:
                        tails = [int(ch.slots[bh, r, c]) // 4 for c in range(n_full, n_full + n_mask)]
                        assert len(tails) == len(set(tails)), f"{name}: a slot with two masked chunks"
                    assert torch.equal(got, want), f"{name}: range {r} of (b={b}, h={h}) covered wrongly"
                    # Merging: no more chunks than the spans need.
                    assert n_full + n_mask <= math.ceil(int(want.sum()) / block_n) + int(plan.kv_counts[b, h, r])


@pytest.mark.parametrize("block_m", [16, 32, 64])
def test_query_tiles_cover_rows_once(block_m: int) -> None:
    gen = torch.Generator().manual_seed(block_m)
    for name, plan, S in _plans(gen):
        ch = key_chunks(plan, S, 16, False)
        qt = query_tiles(plan, S, block_m, ch)
        B, H, NQ = plan.kv_counts.shape
        work = ch.counts.sum(-1)
        for bh in range(B * H):
            qo = qt.q_offsets[bh]
            seen = torch.zeros(S, dtype=torch.int32)
            prev_work = math.inf
            for r, row0 in qt.tiles[bh].tolist():
                if r < 0:
                    prev_work = -1
                    continue
                assert prev_work >= int(work[bh, r]), f"{name}: tiles not ordered by descending work"
                prev_work = int(work[bh, r])
                lo, hi = int(qo[r]), int(qo[r + 1])
                assert lo <= row0 < hi, f"{name}: tile row {row0} outside range {r} [{lo}, {hi})"
                seen[row0 : min(row0 + block_m, hi)] += 1
            assert torch.equal(seen, torch.ones(S, dtype=torch.int32)), f"{name}: rows not covered exactly once"
