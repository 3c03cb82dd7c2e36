"""window3d's 3D spatio-temporal block patterns over video tiles: shapes, exact densities, choice.

Tokens are laid out tile-major by `VideoTiling`; a pattern says which key tiles each query tile attends:

* ``window``: a sliding 3D window of (t, h, w) tiles. Near the grid's edges the window shifts inwards
  instead of shrinking (as in neighbourhood attention), so every query tile sees the same number of tiles.
* ``radial``: the temporal window spans t tiles and the spatial window (h, w) halves each time the frame
  distance doubles (distance 1 keeps (h, w), 2-3 halves it, 4-7 quarters it, never below one tile).
* spatial / temporal / window *kinds* are budget-sized windows of different aspect: a spatial head covers
  as much of the frame as it can (then as many frames), a temporal head as many frames as it can (then as
  much of the frame), a ``window`` head the densest, most even-sided window.

Every pattern also attends all text tokens both ways (text sinks) and, optionally, the first temporal tile
(first-frame sink). Densities are computed exactly (ragged tiles included), so a target sparsity maps to
the largest window whose density is <= 1 - sparsity on *this* grid. Masks and plans are cached per
(tiling, patterns, batch): planning a step is a dictionary hit that returns the same `BlockPlan` object.
With `block=...` the tiling's ranges are fixed blocks instead of exact tiles and every density here is
the block-level one (see `VideoTiling`).
"""

from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch

from dit_sparse.config import ConfigError

from .tiling import Tile, VideoTiling

Tensor = torch.Tensor
KINDS = ("window", "spatial", "temporal", "radial")
SHAPES = ("window", "radial")


@dataclass(frozen=True)
class TilePattern:
    """One head's pattern in tile units. `label` (the kind it was chosen as) is informational only."""

    shape: str  # "window" | "radial"
    size: Tile  # (t, h, w) tiles; for "radial", (h, w) is the spatial window at frame distance <= 1
    sink: bool = False  # every query also attends the first temporal tile (first-frame sink)
    label: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        if self.shape not in SHAPES:
            raise ValueError(f"pattern shape must be one of {SHAPES}, got {self.shape!r}")
        size = tuple(int(x) for x in self.size)
        if len(size) != 3 or min(size) < 1:
            raise ValueError(f"pattern size must be three tile counts >= 1, got {self.size}")
        object.__setattr__(self, "size", size)

    def spatial_size(self, distance: int) -> tuple[int, int]:
        """Spatial window (h, w) in tiles between temporal tiles `distance` apart."""
        h, w = self.size[1], self.size[2]
        if self.shape == "window":
            return h, w
        level = max(int(distance).bit_length() - 1, 0)
        return max(h >> level, 1), max(w >> level, 1)

    def to_json(self) -> dict[str, Any]:
        return {"shape": self.shape, "size": list(self.size), "sink": self.sink, "label": self.label}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> TilePattern:
        return cls(d["shape"], tuple(d["size"]), bool(d.get("sink", False)), d.get("label", ""))

    def __str__(self) -> str:
        t, h, w = self.size
        return f"{self.label or self.shape}({t},{h},{w}{',sink' if self.sink else ''})"


@functools.lru_cache(maxsize=1024)
def window_1d(n: int, size: int) -> Tensor:
    """bool [n, n]: query tile i attends tiles [s, s + size) with s = i - (size-1)//2 clamped to the axis."""
    size = min(size, n)
    i = torch.arange(n)
    start = (i - (size - 1) // 2).clamp(0, n - size)
    return (i[None, :] >= start[:, None]) & (i[None, :] < start[:, None] + size)


def _axis_pairs(tiling: VideoTiling, axis: int) -> Tensor:
    """float64 [n + 1]: token pairs along one axis for each window size 1..n (index 0 unused)."""
    key = ("axis_pairs", axis)
    if key not in tiling._cache:
        s = tiling.extents[axis].double()
        n = s.numel()
        out = torch.zeros(n + 1, dtype=torch.float64)
        for size in range(1, n + 1):
            out[size] = s @ window_1d(n, size).double() @ s
        tiling._cache[key] = out
    return tiling._cache[key]


def clamped(tiling: VideoTiling, p: TilePattern) -> TilePattern:
    size = tuple(min(x, n) for x, n in zip(p.size, tiling.grid))
    return TilePattern(p.shape, size, p.sink, p.label)


def video_tile_mask(tiling: VideoTiling, pattern: TilePattern) -> Tensor:
    """bool [num_tiles, num_tiles] over video tiles (row-major (t, h, w) tile order)."""
    nT, nH, nW = tiling.grid
    t = min(pattern.size[0], nT)
    mt = window_1d(nT, t)
    dist = (torch.arange(nT)[:, None] - torch.arange(nT)[None, :]).abs()
    sizes = sorted({pattern.spatial_size(int(d)) for d in range(nT)}, reverse=True)
    level_of = {hw: i for i, hw in enumerate(sizes)}
    spatial = torch.stack([
        torch.kron(window_1d(nH, min(h, nH)).int(), window_1d(nW, min(w, nW)).int()).bool() for h, w in sizes
    ])  # [L, nS, nS]
    level = torch.tensor([[level_of[pattern.spatial_size(int(d))] for d in row] for row in dist])
    mask = mt[:, :, None, None] & spatial[level]  # [nT, nT', nS, nS']
    if pattern.sink:
        mask[:, 0] = True
    return mask.permute(0, 2, 1, 3).reshape(tiling.num_tiles, tiling.num_tiles)


def range_mask(tiling: VideoTiling, pattern: TilePattern) -> Tensor:
    """bool [NR, NR] over the plan ranges of `tiling` (CPU, cached): the pattern plus dense text.

    With fixed blocks, a block pair is selected when any (unit, unit) pair it overlaps is selected.
    """
    key = ("range_mask", pattern)
    if key not in tiling._cache:
        m = torch.ones(tiling.num_units, tiling.num_units, dtype=torch.bool)
        v0, n = tiling.video_unit_start, tiling.num_tiles
        m[v0:v0 + n, v0:v0 + n] = video_tile_mask(tiling, pattern)
        if tiling.range_units is not None:
            a = tiling.range_units.float()
            m = (a @ m.float() @ a.T) > 0
        tiling._cache[key] = m
    return tiling._cache[key]


def plan_density(tiling: VideoTiling, pattern: TilePattern) -> float:
    """Density of the plan `pattern` gives on `tiling`: exact for unit ranges, block-level with blocks."""
    if tiling.block is None:
        return pattern_density(tiling, pattern)
    key = ("plan_density", pattern)
    if key not in tiling._cache:
        sizes = (tiling.offsets_cpu[1:] - tiling.offsets_cpu[:-1]).double()
        pairs = float(sizes @ range_mask(tiling, pattern).double() @ sizes)
        tiling._cache[key] = pairs / float(tiling.seq_len) ** 2
    return tiling._cache[key]


def pattern_pairs(tiling: VideoTiling, pattern: TilePattern) -> float:
    """Exact number of query-key token pairs `pattern` computes on the whole sequence (text included)."""
    nT = tiling.grid[0]
    st = tiling.extents[0].double()
    ph, pw = _axis_pairs(tiling, 1), _axis_pairs(tiling, 2)
    nH, nW = tiling.grid[1], tiling.grid[2]
    mt = window_1d(nT, min(pattern.size[0], nT)).double()
    sp = torch.tensor([
        float(ph[min(h, nH)] * pw[min(w, nW)]) for h, w in (pattern.spatial_size(d) for d in range(nT))
    ], dtype=torch.float64)
    dist = (torch.arange(nT)[:, None] - torch.arange(nT)[None, :]).abs()
    weight = mt * st[:, None] * st[None, :]
    video = float((weight * sp[dist]).sum())
    if pattern.sink:
        L = tiling.layout
        full = float(L.rows * L.cols) ** 2
        # Column 0 becomes fully spatial: swap its pattern pairs for full-frame pairs.
        video += float((st * st[0] * (full - mt[:, 0] * sp[:nT])).sum())
    L = tiling.layout
    text = L.text_tokens * (L.seq_len + L.video_tokens)
    return video + text


def pattern_density(tiling: VideoTiling, pattern: TilePattern) -> float:
    """Fraction of all query-key pairs the pattern computes (1 - its sparsity)."""
    return pattern_pairs(tiling, pattern) / float(tiling.seq_len) ** 2


def window_densities(tiling: VideoTiling, sink: bool = False) -> Tensor:
    """float64 [nT, nH, nW]: density of the window (t+1, h+1, w+1) at index (t, h, w), all at once."""
    key = ("window_densities", sink)
    if key not in tiling._cache:
        L = tiling.layout
        pt = _axis_pairs(tiling, 0)[1:].clone()
        ph, pw = _axis_pairs(tiling, 1)[1:], _axis_pairs(tiling, 2)[1:]
        st = tiling.extents[0].double()
        nT = tiling.grid[0]
        extra = torch.zeros(())
        if sink:
            # Pairs in key column 0 that the window already had are replaced by full-frame pairs.
            col0 = torch.stack([window_1d(nT, t)[:, 0].double() @ st * st[0] for t in range(1, nT + 1)])
            pt = pt - col0
            extra = st.sum() * st[0] * float(L.rows * L.cols) ** 2
        pairs = pt[:, None, None] * ph[None, :, None] * pw[None, None, :] + extra
        pairs = pairs + L.text_tokens * (L.seq_len + L.video_tokens)
        tiling._cache[key] = pairs / float(L.seq_len) ** 2
    return tiling._cache[key]


_EPS = 1e-12  # densities equal to the budget count as within it


def _no_pattern_fits(tiling: VideoTiling, budget: float, smallest: float) -> None:
    warnings.warn(
        f"dit-sparse window3d: no pattern on grid {tiling.grid} tiles (tile {tiling.tile}) fits density "
        f"{budget:.4f}; using the smallest window (density {smallest:.4f}). Use a smaller tile or a lower "
        f"sparsity.", stacklevel=3,
    )


def choose_pattern(tiling: VideoTiling, kind: str, budget: float, sink: bool = False) -> TilePattern:
    """The pattern of `kind` (see `KINDS`) whose plan density is the largest that is <= `budget` (cached).

    With fixed blocks the block-level superset is denser than the tile pattern, so the tile-level budget is
    lowered until the block-level density fits.
    """
    if kind not in KINDS:
        raise ConfigError(f"pattern kind must be one of {KINDS}, got {kind!r}")
    key = ("choose", kind, round(budget, 12), sink)
    if key in tiling._cache:
        return tiling._cache[key]
    pattern = _choose_exact(tiling, kind, budget, sink, warn=tiling.block is None)
    if tiling.block is not None:
        target = budget
        for _ in range(40):
            d = plan_density(tiling, pattern)
            if d <= budget + _EPS or pattern.size == (1, 1, 1):
                break
            target *= min(budget / d, 0.98)
            pattern = _choose_exact(tiling, kind, target, sink, warn=False)
        if plan_density(tiling, pattern) > budget + _EPS:
            _no_pattern_fits(tiling, budget, plan_density(tiling, pattern))
    tiling._cache[key] = pattern
    return pattern


def _choose_exact(tiling: VideoTiling, kind: str, budget: float, sink: bool, warn: bool) -> TilePattern:
    if kind == "radial":
        return _choose_radial(tiling, budget, sink, warn)
    dens = window_densities(tiling, sink)
    ok = dens <= budget + _EPS
    if not ok.any():
        if warn:
            _no_pattern_fits(tiling, budget, float(dens[0, 0, 0]))
        ok = torch.zeros_like(ok)
        ok[0, 0, 0] = True
    return TilePattern("window", _best_window(tiling, dens, ok, kind), sink, kind)


def _best_window(tiling: VideoTiling, dens: Tensor, ok: Tensor, kind: str) -> Tile:
    L = tiling.layout
    idx = ok.nonzero()  # [M, 3] of (t-1, h-1, w-1)
    d = dens[ok]
    if kind == "window":
        # Among windows within 5% of the densest, take the most even-sided in tokens (capped by the grid).
        near = d >= d.max() * 0.95
        idx, d = idx[near], d[near]
        ext = (idx + 1) * torch.tensor(tiling.tile)
        ext = torch.minimum(ext, torch.tensor([L.frames, L.rows, L.cols])).double()
        uneven = ext.max(1).values / ext.min(1).values
        order = sorted(range(len(d)), key=lambda i: (float(uneven[i]), -float(d[i])))
        return tuple(int(x) + 1 for x in idx[order[0]])  # type: ignore[return-value]
    ph, pw, pt = (_axis_pairs(tiling, a)[1:] for a in (1, 2, 0))
    spatial = ph[idx[:, 1]] * pw[idx[:, 2]]
    temporal = pt[idx[:, 0]]
    primary = spatial if kind == "spatial" else temporal
    order = sorted(range(len(d)), key=lambda i: (-float(primary[i]), -float(d[i])))
    return tuple(int(x) + 1 for x in idx[order[0]])  # type: ignore[return-value]


def radial_densities(tiling: VideoTiling, sink: bool = False) -> Tensor:
    """float64 [nT, nH, nW]: density of the radial pattern (t+1, h+1, w+1) at index (t, h, w)."""
    key = ("radial_densities", sink)
    if key not in tiling._cache:
        L = tiling.layout
        nT, nH, nW = tiling.grid
        st = tiling.extents[0].double()
        ph, pw = _axis_pairs(tiling, 1), _axis_pairs(tiling, 2)
        dist = (torch.arange(nT)[:, None] - torch.arange(nT)[None, :]).abs()
        mts = torch.stack([window_1d(nT, t) for t in range(1, nT + 1)]).double()  # [nT(t), nT, nT]
        full = float(L.rows * L.cols) ** 2
        out = torch.empty(nT, nH, nW, dtype=torch.float64)
        for h in range(1, nH + 1):
            for w in range(1, nW + 1):
                p = TilePattern("radial", (nT, h, w))
                sp = torch.tensor([float(ph[min(a, nH)] * pw[min(b, nW)])
                                   for a, b in (p.spatial_size(d) for d in range(nT))], dtype=torch.float64)
                weight = st[:, None] * st[None, :] * sp[dist]
                pairs = (mts * weight).sum((1, 2))
                if sink:
                    pairs = pairs + (st * st[0] * (full - mts[:, :, 0] * sp[:nT])).sum(-1)
                out[:, h - 1, w - 1] = pairs
        out = out + L.text_tokens * (L.seq_len + L.video_tokens)
        tiling._cache[key] = out / float(L.seq_len) ** 2
    return tiling._cache[key]


def _choose_radial(tiling: VideoTiling, budget: float, sink: bool, warn: bool = True) -> TilePattern:
    # Longest temporal reach first (the point of a radial pattern), then the densest spatial window.
    nT, nH, nW = tiling.grid
    dens = radial_densities(tiling, sink)
    ok = dens <= budget + _EPS
    if not ok.any():
        if warn:
            _no_pattern_fits(tiling, budget, float(dens[0, 0, 0]))
        return TilePattern("radial", (1, 1, 1), sink, "radial")
    idx = ok.nonzero()
    d = dens[ok]
    order = sorted(range(len(d)), key=lambda i: (-int(idx[i, 0]), -float(d[i]),
                                                 abs((idx[i, 1] + 1) / nH - (idx[i, 2] + 1) / nW)))
    t, h, w = (int(x) + 1 for x in idx[order[0]])
    return TilePattern("radial", (t, h, w), sink, "radial")


def _maximal(ok: Tensor) -> list[tuple[int, int, int]]:
    """Sizes (1-based) inside `ok` that cannot grow along any axis and stay inside it."""
    out = []
    for t, h, w in ok.nonzero().tolist():
        grows = [(t + 1, h, w), (t, h + 1, w), (t, h, w + 1)]
        if all(g[a] >= ok.shape[a] or not ok[g] for a, g in enumerate(grows)):
            out.append((t + 1, h + 1, w + 1))
    return out


def search_candidates(tiling: VideoTiling, budget: float, sink: bool = False) -> list[TilePattern]:
    """Every window and radial pattern within `budget` that cannot grow along any axis and stay within it
    (the candidates an offline per-head search compares), plus the named kinds."""
    key = ("candidates", round(budget, 12), sink)
    if key in tiling._cache:
        return tiling._cache[key]
    out: list[TilePattern] = [choose_pattern(tiling, k, budget, sink) for k in KINDS]
    for shape, dens in (("window", window_densities(tiling, sink)), ("radial", radial_densities(tiling, sink))):
        found = [TilePattern(shape, size, sink, shape) for size in _maximal(dens <= budget + _EPS)]
        # With fixed blocks, keep only those whose block-level superset still fits.
        out += [p for p in found if tiling.block is None or plan_density(tiling, p) <= budget + _EPS]
    unique = list(dict.fromkeys(out))  # dedupe (label is not part of equality), keep first label
    tiling._cache[key] = unique
    return unique
