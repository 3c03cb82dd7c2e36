"""Static 3D spatio-temporal block patterns over video tiles, and the "window3d" method.

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

from .config import ConfigError
from .context import AttentionContext
from .layout import VideoLayout
from .method import SparseMethod, register_method
from .plan import BlockPlan, compact_indices
from .tiling import Tile, VideoTiling, choose_tile
from .warn import WarnOnce

Tensor = torch.Tensor
KINDS = ("window", "spatial", "temporal", "radial")
AUTO_BLOCK, AUTO_BLOCK_FROM = 128, 8192  # block="auto": 128-token blocks from 8,192 tokens, exact tiles below
SHAPES = ("window", "radial")


# ---------------------------------------------------------------------- patterns
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


def _clamped(tiling: VideoTiling, p: TilePattern) -> TilePattern:
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


# ---------------------------------------------------------------------- plans
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


def _classify(q: Tensor, k: Tensor, v: Tensor, rows: Tensor, *, tiling: VideoTiling,
              patterns: list[TilePattern], ordered: bool) -> Tensor:
    from .head_search import classify_heads

    return classify_heads(q, k, v, tiling, patterns, rows, ordered=ordered)


# ---------------------------------------------------------------------- method
def _tuple3(value: Any, name: str) -> Tile:
    try:
        out = tuple(int(x) for x in value)
    except TypeError as exc:
        raise ConfigError(f"{name} must be three integers (frames, rows, cols), got {value!r}") from exc
    if len(out) != 3 or min(out) < 1:
        raise ConfigError(f"{name} must be three integers >= 1 (frames, rows, cols), got {value!r}")
    return out  # type: ignore[return-value]


@dataclass(frozen=True)
class WindowConfig:
    """Options of the "window3d" method.

    tile: tile shape (frames, rows, cols) in tokens, or "auto": the shape that fills 128-token kernel tiles
        best on each grid (`choose_tile`); ragged edge tiles are exact.
    block: None (ranges are the exact tiles) or a block size (e.g. 128): ranges become fixed blocks of the
        tile-major order and each block pair is selected when any tile pair it overlaps is (a superset at
        tile edges, counted in the budget; kernels never pad a short range). "auto" (default): 128 from
        8,192 tokens on (full kernel tiles, and flash-attn-4 runs fixed blocks), exact tiles below.
    pattern: "auto" (per-head choice among `candidates`, re-sampled every `classify_every` steps),
        or one kind for every head: "window", "spatial", "temporal", "radial".
    window: a fixed (t, h, w) window in tiles for every head (ignores the sparsity budget).
    candidates: kinds the "auto" mode chooses between.
    sample_rows: query rows sampled per (layer, branch) to score candidates against exact attention.
    classify_every: steps between re-classifications in "auto" mode.
    first_frame_sink: every query also attends the first temporal tile (counted in the budget).
    text_block: longest range of text tokens (text is always attended both ways).
    head_config: JSON file from `dit_sparse.head_search.search_heads` (per-layer, per-head patterns).
    model_family: checked against the head_config file's family when given (e.g. "wan").
    calibrate: offline search mode: score every candidate on dense runs (used by `search_heads`).
    seed: seed of the row sampling.
    """

    tile: Tile | str = "auto"
    block: int | str | None = "auto"
    pattern: str = "auto"
    window: Tile | None = None
    candidates: tuple[str, ...] = ("spatial", "temporal", "window")
    sample_rows: int = 64
    classify_every: int = 5
    first_frame_sink: bool = False
    text_block: int = 128
    head_config: str | None = None
    model_family: str | None = None
    calibrate: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        if self.tile != "auto":
            object.__setattr__(self, "tile", _tuple3(self.tile, "tile"))
        if self.block not in (None, "auto") and (not isinstance(self.block, int) or self.block < 16):
            raise ConfigError(f"block must be 'auto', None or an integer >= 16 (e.g. 128), got {self.block!r}")
        if self.window is not None:
            object.__setattr__(self, "window", _tuple3(self.window, "window"))
        if self.pattern != "auto" and self.pattern not in KINDS:
            raise ConfigError(f"pattern must be 'auto' or one of {KINDS}, got {self.pattern!r}")
        cands = (self.candidates,) if isinstance(self.candidates, str) else tuple(self.candidates)
        bad = [c for c in cands if c not in KINDS]
        if not cands or bad:
            raise ConfigError(f"candidates must be a non-empty subset of {KINDS}, got {self.candidates!r}")
        object.__setattr__(self, "candidates", cands)
        for name in ("sample_rows", "classify_every", "text_block"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)!r}")


@register_method
class SpatioTemporalWindows(SparseMethod):
    """3D tile windows (sliding, radial, spatial/temporal heads) for any video grid: method "window3d".

    Heads get their pattern from, in order of precedence: a head_config JSON (offline search), a fixed
    `window`, a fixed `pattern` kind, or online sampling ("auto"). Plans are cached per grid and
    per-head assignment, so steady-state planning is a dictionary lookup.
    """

    name = "window3d"
    Config = WindowConfig

    def __init__(self, sparsity: float, options: WindowConfig, base: SparseMethod | None = None) -> None:
        super().__init__(sparsity, options, base)
        self.assignment = None
        if options.head_config is not None:
            from .head_search import HeadAssignment

            self.assignment = HeadAssignment.load(options.head_config)
        self._warn_once = WarnOnce("dit-sparse window3d: ", stacklevel=4)
        self._auto_tilings: dict[tuple, VideoTiling] = {}
        self._tilings: dict[tuple, VideoTiling] = {}
        self.calibration: dict[str, dict[str, Any]] = {}  # filled in calibrate mode

    @property
    def budget(self) -> float:
        """Largest density a head's pattern may have."""
        return 1.0 - self.sparsity

    def tiling_for(self, layout: VideoLayout, device: torch.device) -> VideoTiling:
        """The (cached) tiling this method uses for `layout`."""
        if self.assignment is not None:
            tile, block = self.assignment.tile, self.assignment.block
        else:
            tile, block = self.options.tile, self.options.block
            if block == "auto":  # kernel-sized blocks where sequences are long enough for tiles to matter
                block = AUTO_BLOCK if layout.seq_len >= AUTO_BLOCK_FROM else None
        if tile != "auto":
            return self._as_blocks(self._tiling(layout, tile, device, block))
        key = (layout, str(device))
        if key not in self._auto_tilings:  # the choice reads host-side densities: once per grid
            # Kernel-sized tiles first; smaller ones only when the grid is too small for the budget.
            for target in (128, 64, 32, 16, 8):
                tiling = self._tiling(layout, choose_tile(layout, target), device, block)
                if float(window_densities(tiling, self.options.first_frame_sink)[0, 0, 0]) <= self.budget:
                    break
            self._auto_tilings[key] = self._as_blocks(tiling)
        return self._auto_tilings[key]

    def _as_blocks(self, tiling: VideoTiling) -> VideoTiling:
        """With block="auto", exact tiles that are all AUTO_BLOCK tokens (a grid the tile divides, text in
        whole blocks) are fixed blocks already: the same ranges, marked as fixed blocks so the fixed-block
        kernels (flash-attn-4) and their cheaper per-plan preparation run them."""
        if self.assignment is not None or self.options.block != "auto" or tiling.block is not None:
            return tiling
        sizes = tiling.unit_offsets[1:] - tiling.unit_offsets[:-1]
        if not bool((sizes == AUTO_BLOCK).all()):
            return tiling
        return self._tiling(tiling.layout, tiling.tile, tiling.device, AUTO_BLOCK)

    def _tiling(self, layout: VideoLayout, tile: Tile, device: torch.device, block: int | None) -> VideoTiling:
        """A tiling owned by this method (its token order, plans and cached indices are device tensors that
        must go with the method when dit-sparse is removed, not stay in a module-level cache)."""
        key = (layout, tuple(int(x) for x in tile), str(torch.device(device)), block)
        if key not in self._tilings:
            self._tilings[key] = VideoTiling(layout, key[1], self.options.text_block, device, block)
        return self._tilings[key]

    def model_order(self, layout: VideoLayout, device: torch.device) -> tuple[Tensor, Tensor] | None:
        """The tiling's tile-major order: the same for every layer and head, so the model can run in it."""
        if self.options.calibrate:  # the offline search reads the model's own order
            return None
        tiling = self.tiling_for(layout, device)
        return tiling.perm, tiling.inverse

    def plan(self, q: Tensor, k: Tensor, v: Tensor, ctx: AttentionContext) -> BlockPlan | None:
        layout = ctx.layout
        if layout is None or layout.seq_len != q.shape[2]:
            self._warn_once("the model did not report a video grid matching the sequence; running dense")
            return None
        state = ctx.state
        shape = (layout, q.device, q.shape[0], q.shape[1], ctx.token_order is not None)
        # Steady state: same call shape and no re-classification due -> the cached plan, nothing else.
        if state.get("shape") == shape and not self.options.calibrate and not self._classify_due(ctx):
            return state["plan"]
        tiling = self.tiling_for(layout, q.device)
        if self.options.calibrate:
            self._calibrate(q, k, v, ctx, tiling)
            return None
        ordered = ctx.token_order is not None
        if ordered and ctx.token_order is not tiling.perm:
            self._warn_once("the model runs in a token order this method did not ask for; running dense")
            return None
        patterns = self._head_patterns(q, k, v, ctx, tiling)
        if not isinstance(patterns[-1], Tensor):
            key = (tiling.key, patterns, q.shape[0], ordered)
            if state.get("plan_key") != key:
                state["plan_key"], state["plan"] = key, build_plan(tiling, patterns, q.shape[0], ordered)
        else:  # online choice: a device tensor of candidate indices per head
            cands, choice = patterns
            key = (tiling.key, cands, q.shape[0], id(choice), ordered)
            if state.get("plan_key") != key:
                state["plan_key"], state["plan"] = key, build_choice_plan(tiling, cands, choice, q.shape[0],
                                                                          ordered)
        state["shape"] = shape
        return state["plan"]

    def _classify_due(self, ctx: AttentionContext) -> bool:
        opts = self.options
        if self.assignment is not None or opts.window is not None or opts.pattern != "auto":
            return False
        last = ctx.state.get("classified")
        return last is None or ctx.step - last[1] >= opts.classify_every

    # ------------------------------------------------------------------ per-head choice
    def _head_patterns(self, q: Tensor, k: Tensor, v: Tensor, ctx: AttentionContext, tiling: VideoTiling
                       ) -> tuple[TilePattern, ...] | tuple[tuple[TilePattern, ...], Tensor]:
        """Per-head patterns, or (candidates, int64 [H] device tensor of each head's choice) when chosen
        online: the choice stays on the device."""
        H = q.shape[1]
        opts, state = self.options, ctx.state
        if self.assignment is not None:
            if state.get("assigned_for") != (tiling.key, H):
                family = opts.model_family or getattr(ctx, "model_family", None)
                self.assignment.check(tiling.layout, family)
                state["assigned"] = self.assignment.patterns_for(ctx.layer_name, H)
                state["assigned_for"] = (tiling.key, H)
            return state["assigned"]
        sink = opts.first_frame_sink
        if opts.window is not None:
            return (_clamped(tiling, TilePattern("window", opts.window, sink, "window")),) * H
        if opts.pattern != "auto":
            return (choose_pattern(tiling, opts.pattern, self.budget, sink),) * H
        cands = tuple(dict.fromkeys(choose_pattern(tiling, c, self.budget, sink) for c in opts.candidates))
        last = state.get("classified")
        if last is not None and last[0] == (tiling.key, cands, H) and ctx.step - last[1] < opts.classify_every:
            return last[2]
        if len(cands) == 1:
            heads = cands * H
        else:
            from .head_search import sample_rows

            rows = sample_rows(tiling, opts.sample_rows, seed=opts.seed + 7919 * ctx.step + ctx.layer,
                               device=q.device)
            # Scoring the candidates is some 50 small operations: one CUDA graph replay on GPUs.
            ordered = ctx.token_order is not None
            classify = functools.partial(_classify, tiling=tiling, patterns=list(cands), ordered=ordered)
            heads = (cands, self.graphs.run(("classify", tiling.key, cands, ordered), classify, (q, k, v, rows)))
        state["classified"] = ((tiling.key, cands, H), ctx.step, heads)
        return heads

    # ------------------------------------------------------------------ offline search
    def _calibrate(self, q: Tensor, k: Tensor, v: Tensor, ctx: AttentionContext, tiling: VideoTiling) -> None:
        from .head_search import pattern_errors, sample_rows

        cands = search_candidates(tiling, self.budget, self.options.first_frame_sink)
        rows = sample_rows(tiling, self.options.sample_rows, seed=self.options.seed + ctx.layer)
        err = pattern_errors(q, k, v, tiling, cands, rows).mean(0).double().cpu()  # [H, P]
        entry = self.calibration.get(ctx.layer_name)
        if entry is None:
            self.calibration[ctx.layer_name] = {"tiling": tiling, "candidates": cands, "err": err, "calls": 1}
            return
        if entry["tiling"].layout != tiling.layout or entry["candidates"] != cands:
            raise ConfigError(
                f"head search saw two different grids for layer {ctx.layer_name!r} "
                f"({entry['tiling'].layout} and {tiling.layout}); search one video shape at a time"
            )
        entry["err"] += err
        entry["calls"] += 1
