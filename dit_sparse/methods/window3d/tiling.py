"""`VideoTiling`: a tile-major token order for any video grid, with ragged edge tiles kept exact.

Video tokens arrive frame-major (frame, row, column). Cutting the grid into 3D tiles of shape
(tt, th, tw) and laying the tokens out tile after tile makes every tile one contiguous range, so a 3D
neighbourhood of tiles becomes a block-sparse pattern. Grids rarely divide evenly (Wan 480p is
21 x 30 x 52): the last tile along each axis is simply shorter, and its range is shorter too - no padding,
no dropped tokens. Text tokens (joint-attention models) stay where they are, cut into ranges of at most
`text_block` tokens, before or after the video ranges.

The "window3d" method owns the tilings it builds (one per grid, tile, block and device) and keeps its
derived data (masks, indices, plans) in each tiling's cache, so it all goes when dit-sparse is removed.
"""

from __future__ import annotations

import functools
from typing import Any

import torch

from dit_sparse.layout import VideoLayout

Tensor = torch.Tensor
Tile = tuple[int, int, int]


def _edges(n: int, size: int) -> Tensor:
    """Lengths of the tiles that cut an axis of `n` cells into pieces of `size` (last one ragged)."""
    count = -(-n // size)
    lengths = torch.full((count,), size, dtype=torch.int64)
    lengths[-1] = n - size * (count - 1)
    return lengths


@functools.lru_cache(maxsize=256)
def choose_tile(layout: VideoLayout, target: int = 128, max_frames: int = 4) -> Tile:
    """A tile shape for `layout` whose tiles fill `target`-token kernel tiles best.

    Among tiles of (target/2, target] tokens spanning at most `max_frames` frames, pick the one with the least
    padding when every tile is rounded up to a multiple of `target` (ragged edge tiles count), then the
    squarest spatial footprint, then the largest. E.g. Wan 480p (21 x 30 x 52) -> (3, 10, 4): 120-token
    tiles that divide the grid exactly.
    """
    F, R, C = layout.frames, layout.rows, layout.cols
    best, best_key = None, None
    for t in range(1, min(F, max_frames) + 1):
        for h in range(1, R + 1):
            for w in range(1, C + 1):
                n = t * h * w
                if n > target or 2 * n <= min(target, layout.video_tokens):
                    continue
                padded = 0
                for lt, ct in _pieces(F, t):
                    for lh, ch in _pieces(R, h):
                        for lw, cw in _pieces(C, w):
                            padded += ct * ch * cw * -(-(lt * lh * lw) // target) * target
                key = (round(padded / layout.video_tokens, 3), max(h, w) / min(h, w), -n, t)
                if best_key is None or key < best_key:
                    best, best_key = (t, h, w), key
    return best if best is not None else (1, min(R, 8), min(C, 8))


def _pieces(n: int, size: int) -> list[tuple[int, int]]:
    """(length, count) of the tiles cutting an axis of n cells into pieces of `size`."""
    full, rem = divmod(n, size)
    return [(size, full)] + ([(rem, 1)] if rem else [])


class VideoTiling:
    """Tile-major token permutation and the matching ranges for one `VideoLayout`.

    *Units* are the exact pieces: text ranges (at most `text_block` tokens) and one range per video tile
    (ragged at the grid's far edges). The plan's *ranges* are the units themselves (`block=None`), or
    fixed blocks of `block` tokens cut from the same tile-major order (`block=128`: no range is ever
    shorter than a kernel tile, at the price of blocks that straddle two units; a pattern then selects a
    block pair when any unit pair it overlaps is selected, a superset of the exact pattern).

    Attributes (all fixed after construction):
        layout, tile, text_block, block, device: what the tiling was built for.
        grid: tiles per axis (nT, nH, nW); tiles are numbered row-major over (t, h, w).
        extents: per axis, int64 [n_axis] token lengths of the tiles (CPU); the last may be short.
        perm: int64 [S] on `device`, plan position -> original token index.
        inverse: int64 [S] on `device`, original token index -> plan position.
        unit_offsets: int64 [NU + 1] (CPU) unit boundaries in plan order; `text_units` text units come first
            when the text is first, and `video_unit_start` is the index of the first tile's unit.
        offsets: int32 [NR + 1] on `device`, plan range boundaries; `offsets_cpu` the same on the CPU.
        range_units: None (ranges are the units) or bool [NR, NU] (CPU), which units each range overlaps.
        range_of_token: int64 [S] (CPU), original token index -> plan range index.
        unit_of_token: int64 [S] (CPU), original token index -> unit index.
    """

    def __init__(self, layout: VideoLayout, tile: Tile = (1, 8, 8), text_block: int = 128,
                 device: torch.device | str = "cpu", block: int | None = None) -> None:
        tile = tuple(int(x) for x in tile)
        if len(tile) != 3 or min(tile) < 1:
            raise ValueError(f"tile must be three positive sizes (frames, rows, cols), got {tile}")
        if text_block < 1:
            raise ValueError(f"text_block must be >= 1, got {text_block}")
        if block is not None and block < 1:
            raise ValueError(f"block must be None or >= 1, got {block}")
        self.layout = layout
        self.tile: Tile = tile  # type: ignore[assignment]
        self.text_block = int(text_block)
        self.block = None if block is None else int(block)
        self.device = torch.device(device)
        dims = (layout.frames, layout.rows, layout.cols)
        self.extents: tuple[Tensor, Tensor, Tensor] = tuple(  # type: ignore[assignment]
            _edges(n, s) for n, s in zip(dims, tile)
        )
        self.grid: Tile = tuple(int(e.numel()) for e in self.extents)  # type: ignore[assignment]
        self._cache: dict[Any, Any] = {}  # pattern masks etc., keyed by their users

        # Stable sort by tile id keeps (frame, row, col) order inside each tile: the original index is
        # already lexicographic in (f, r, c), so no within-tile key is needed.
        f, r, c = self._token_coords()
        nT, nH, nW = self.grid
        tile_id = ((f // tile[0]) * nH + r // tile[1]) * nW + c // tile[2]
        video_perm = torch.sort(tile_id, stable=True).indices + layout.video_start
        tile_sizes = (
            self.extents[0][:, None, None] * self.extents[1][None, :, None] * self.extents[2][None, None, :]
        ).reshape(-1)

        text_sizes = _edges(layout.text_tokens, self.text_block) if layout.text_tokens else torch.empty(0, dtype=torch.int64)
        text_perm = torch.arange(layout.text_tokens) + layout.text_start
        if layout.text_first:
            perm = torch.cat([text_perm, video_perm])
            sizes = torch.cat([text_sizes, tile_sizes])
            self.video_unit_start = int(text_sizes.numel())
        else:
            perm = torch.cat([video_perm, text_perm])
            sizes = torch.cat([tile_sizes, text_sizes])
            self.video_unit_start = 0
        S = int(perm.numel())
        self.text_units = int(text_sizes.numel())
        self.num_tiles = nT * nH * nW
        self.num_units = int(sizes.numel())
        self.tile_sizes = tile_sizes
        self.unit_offsets = torch.cat([torch.zeros(1, dtype=torch.int64), sizes.cumsum(0)])
        inverse = torch.empty_like(perm)
        inverse[perm] = torch.arange(S)
        unit_of_pos = torch.repeat_interleave(torch.arange(self.num_units), sizes)
        self.unit_of_token = unit_of_pos[inverse]
        if self.block is None:
            offsets = self.unit_offsets
            self.range_units: Tensor | None = None
            self.range_of_token = self.unit_of_token
        else:
            nb = -(-S // self.block)
            offsets = (torch.arange(nb + 1) * self.block).clamp(max=S)
            # Block i overlaps unit u when their half-open intervals intersect.
            uo = self.unit_offsets
            self.range_units = (offsets[:-1, None] < uo[None, 1:]) & (uo[None, :-1] < offsets[1:, None])
            self.range_of_token = inverse // self.block
        self.num_ranges = int(offsets.numel()) - 1
        self.offsets_cpu = offsets.to(torch.int32)
        self.perm = perm.to(self.device)
        self.inverse = inverse.to(self.device)
        self.offsets = self.offsets_cpu.to(self.device)

    def _token_coords(self) -> tuple[Tensor, Tensor, Tensor]:
        L = self.layout
        f = torch.arange(L.frames).repeat_interleave(L.rows * L.cols)
        r = torch.arange(L.rows).repeat_interleave(L.cols).repeat(L.frames)
        c = torch.arange(L.cols).repeat(L.frames * L.rows)
        return f, r, c

    @property
    def key(self) -> tuple:
        """Hashable identity of this tiling (layout, tile, text ranges, block, device)."""
        return (self.layout, self.tile, self.text_block, self.block, str(self.device))

    @property
    def seq_len(self) -> int:
        return self.layout.seq_len

    # ------------------------------------------------------------------ geometry
    def tile_coords(self) -> Tensor:
        """int64 [num_tiles, 3]: (t, h, w) tile coordinates of each video range, in range order."""
        nT, nH, nW = self.grid
        idx = torch.arange(self.num_tiles)
        return torch.stack([idx // (nH * nW), (idx // nW) % nH, idx % nW], dim=1)

    # ------------------------------------------------------------------ physical reordering
    def permute(self, x: Tensor, dim: int = 1) -> Tensor:
        """`x` reordered along `dim` (the sequence axis) into tile-major plan order."""
        return x.index_select(dim, self.perm)

    def unpermute(self, x: Tensor, dim: int = 1) -> Tensor:
        """Inverse of `permute`: plan order back to the original token order."""
        return x.index_select(dim, self.inverse)

    def __repr__(self) -> str:
        L = self.layout
        return (f"VideoTiling({L.frames}x{L.rows}x{L.cols} + {L.text_tokens} text, tile={self.tile}, "
                f"grid={self.grid}, units={self.num_units}, block={self.block}, device={self.device})")
