"""The "window3d" method: per-head 3D tile windows (sliding, radial, spatial / temporal heads) on any
video grid, chosen offline (a head_config file), fixed, or online from sampled rows (see patterns.py)."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import torch

from dit_sparse.config import ConfigError
from dit_sparse.context import AttentionContext
from dit_sparse.layout import VideoLayout
from dit_sparse.method import SparseMethod, register_method
from dit_sparse.plan import BlockPlan
from dit_sparse.state import LayerState
from dit_sparse.warn import WarnOnce

from .head_search import HeadAssignment, classify_heads, pattern_errors, sample_rows
from .patterns import KINDS, TilePattern, choose_pattern, clamped, search_candidates, window_densities
from .plans import build_choice_plan, build_plan
from .tiling import Tile, VideoTiling, choose_tile

Tensor = torch.Tensor
AUTO_BLOCK, AUTO_BLOCK_FROM = 128, 8192  # block="auto": 128-token blocks from 8,192 tokens, exact tiles below


def _classify(q: Tensor, k: Tensor, v: Tensor, rows: Tensor, *, tiling: VideoTiling,
              patterns: list[TilePattern], ordered: bool) -> Tensor:
    # The graphed form of `classify_heads`: tensors positional, everything static by keyword (graphs.run).
    return classify_heads(q, k, v, tiling, patterns, rows, ordered=ordered)


def _tuple3(value: Any, name: str) -> Tile:
    try:
        out = tuple(int(x) for x in value)
    except TypeError as exc:
        raise ConfigError(f"{name} must be three integers (frames, rows, cols), got {value!r}") from exc
    if len(out) != 3 or min(out) < 1:
        raise ConfigError(f"{name} must be three integers >= 1 (frames, rows, cols), got {value!r}")
    return out  # type: ignore[return-value]


@dataclass(frozen=True)
class Window3DConfig:
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


@dataclass
class Window3DState(LayerState):
    """One layer and branch: the plan of the last call shape and the per-head choice it came from."""

    shape: tuple | None = None  # (layout, device, B, H, ordered) of the last call
    plan_key: tuple | None = None  # (tiling, per-head patterns or candidates + choice, B, ordered) of `plan`
    plan: BlockPlan | None = None
    classified: tuple | None = None  # ((tiling key, candidates, H), step, heads) of the last online choice
    assigned_for: tuple | None = None  # (tiling key, H) of `assigned`
    assigned: tuple[TilePattern, ...] | None = None  # per-head patterns from the head_config file


@register_method
class Window3D(SparseMethod):
    """3D tile windows (sliding, radial, spatial/temporal heads) for any video grid: method "window3d".

    Heads get their pattern from, in order of precedence: a head_config JSON (offline search), a fixed
    `window`, a fixed `pattern` kind, or online sampling ("auto"). Plans are cached per grid and
    per-head assignment, so steady-state planning is a dictionary lookup.
    """

    name = "window3d"
    Config = Window3DConfig
    State = Window3DState

    def __init__(self, sparsity: float, options: Window3DConfig, base: SparseMethod | None = None) -> None:
        super().__init__(sparsity, options, base)
        self.assignment = None
        if options.head_config is not None:
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

    def has_model_order(self) -> bool:
        return not self.options.calibrate  # the offline search reads the model's own order

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
        state: Window3DState = self.state_of(ctx)
        shape = (layout, q.device, q.shape[0], q.shape[1], ctx.token_order is not None)
        # Steady state: same call shape and no re-classification due -> the cached plan, nothing else.
        if state.shape == shape and not self.options.calibrate and not self._classify_due(state, ctx.step):
            return state.plan
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
            if state.plan_key != key:
                state.plan_key, state.plan = key, build_plan(tiling, patterns, q.shape[0], ordered)
        else:  # online choice: a device tensor of candidate indices per head
            cands, choice = patterns
            key = (tiling.key, cands, q.shape[0], id(choice), ordered)
            if state.plan_key != key:
                state.plan_key, state.plan = key, build_choice_plan(tiling, cands, choice, q.shape[0],
                                                                          ordered)
        state.shape = shape
        return state.plan

    def _classify_due(self, state: Window3DState, step: int) -> bool:
        opts = self.options
        if self.assignment is not None or opts.window is not None or opts.pattern != "auto":
            return False
        last = state.classified
        return last is None or step - last[1] >= opts.classify_every

    # ------------------------------------------------------------------ per-head choice
    def _head_patterns(self, q: Tensor, k: Tensor, v: Tensor, ctx: AttentionContext, tiling: VideoTiling
                       ) -> tuple[TilePattern, ...] | tuple[tuple[TilePattern, ...], Tensor]:
        """Per-head patterns, or (candidates, int64 [H] device tensor of each head's choice) when chosen
        online: the choice stays on the device."""
        H = q.shape[1]
        opts, state = self.options, self.state_of(ctx)
        if self.assignment is not None:
            if state.assigned_for != (tiling.key, H):
                family = opts.model_family or getattr(ctx, "model_family", None)
                self.assignment.check(tiling.layout, family)
                state.assigned = self.assignment.patterns_for(ctx.layer_name, H)
                state.assigned_for = (tiling.key, H)
            return state.assigned
        sink = opts.first_frame_sink
        if opts.window is not None:
            return (clamped(tiling, TilePattern("window", opts.window, sink, "window")),) * H
        if opts.pattern != "auto":
            return (choose_pattern(tiling, opts.pattern, self.budget, sink),) * H
        cands = tuple(dict.fromkeys(choose_pattern(tiling, c, self.budget, sink) for c in opts.candidates))
        last = state.classified
        if last is not None and last[0] == (tiling.key, cands, H) and ctx.step - last[1] < opts.classify_every:
            return last[2]
        if len(cands) == 1:
            heads = cands * H
        else:
            rows = sample_rows(tiling, opts.sample_rows, seed=opts.seed + 7919 * ctx.step + ctx.layer,
                               device=q.device)
            # Scoring the candidates is some 50 small operations: one CUDA graph replay on GPUs.
            ordered = ctx.token_order is not None
            classify = functools.partial(_classify, tiling=tiling, patterns=list(cands), ordered=ordered)
            heads = (cands, self.graphs.run(("classify", tiling.key, cands, ordered), classify, (q, k, v, rows)))
        state.classified = ((tiling.key, cands, H), ctx.step, heads)
        return heads

    # ------------------------------------------------------------------ offline search
    def _calibrate(self, q: Tensor, k: Tensor, v: Tensor, ctx: AttentionContext, tiling: VideoTiling) -> None:
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
