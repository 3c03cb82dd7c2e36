import itertools
import math

import pytest
import torch
from dit_sparse.kernels import block_sparse_attention
from dit_sparse.pipelines.tiny_models import tiny_wan_transformer

import dit_sparse
from dit_sparse.config import ConfigError
from dit_sparse.context import AttentionContext
from dit_sparse.layout import VideoLayout
from dit_sparse.methods import build_method
from dit_sparse.methods.window3d.method import Window3D
from dit_sparse.methods.window3d.patterns import (
    KINDS,
    TilePattern,
    choose_pattern,
    pattern_density,
    plan_density,
    radial_densities,
    search_candidates,
    window_densities,
)
from dit_sparse.methods.window3d.plans import build_plan
from dit_sparse.methods.window3d.tiling import VideoTiling, choose_tile
from dit_sparse.state import LayerStates


def brute_force_mask(layout: VideoLayout, tile, pattern: TilePattern) -> torch.Tensor:
    """Token-level [S, S] mask in original order, built directly from each token's tile coordinates."""
    S, vs = layout.seq_len, layout.video_start
    grid = [math.ceil(n / t) for n, t in zip((layout.frames, layout.rows, layout.cols), tile)]
    coords = {}
    for f, r, c in itertools.product(range(layout.frames), range(layout.rows), range(layout.cols)):
        coords[vs + (f * layout.rows + r) * layout.cols + c] = (f // tile[0], r // tile[1], c // tile[2])

    def covered(i, j, size, n):  # is key tile j in the edge-shifted window of query tile i?
        size = min(size, n)
        lo = min(max(i - (size - 1) // 2, 0), n - size)
        return lo <= j < lo + size

    def spatial(dist):
        h, w = pattern.size[1], pattern.size[2]
        if pattern.shape == "radial":
            level = 0
            while 2 ** (level + 1) <= dist:
                level += 1
            h, w = max(1, h // 2**level), max(1, w // 2**level)
        return h, w

    # Decide once per (query tile, key tile) pair, then spread to the tokens through their coordinates.
    tiles = sorted(set(coords.values()))
    ok = {}
    for a, b, c in tiles:
        for a2, b2, c2 in tiles:
            h, w = spatial(abs(a - a2))
            inside = covered(a, a2, pattern.size[0], grid[0]) and covered(b, b2, h, grid[1]) and covered(c, c2, w, grid[2])
            ok[(a, b, c), (a2, b2, c2)] = inside or (pattern.sink and a2 == 0)
    m = torch.ones(S, S, dtype=torch.bool)  # text rows/columns stay dense
    tok = list(coords.items())
    for qi, qt in tok:
        for ki, kt in tok:
            m[qi, ki] = ok[qt, kt]
    return m


CASES = [
    (VideoLayout(5, 7, 9), (2, 3, 4), TilePattern("window", (2, 1, 2))),
    (VideoLayout(5, 7, 9, 6, True), (2, 3, 4), TilePattern("window", (1, 2, 3), sink=True)),
    (VideoLayout(4, 6, 5, 7, False), (1, 4, 2), TilePattern("window", (3, 9, 1))),
    (VideoLayout(9, 5, 6), (1, 2, 2), TilePattern("radial", (9, 3, 2))),
    (VideoLayout(9, 5, 6, 3, True), (1, 2, 2), TilePattern("radial", (5, 3, 3), sink=True)),
]


@pytest.mark.parametrize("layout,tile,pattern", CASES)
def test_plan_token_mask_equals_brute_force_neighbourhood(layout, tile, pattern):
    T = VideoTiling(layout, tile, text_block=4)
    plan = build_plan(T, (pattern,), batch=1)
    plan.validate()
    want = brute_force_mask(layout, tile, pattern)
    got = plan.token_mask()[0, 0]
    assert torch.equal(got, want)
    # Exact density accounting (ragged tiles and text included) agrees with the mask.
    assert pattern_density(T, pattern) == pytest.approx(want.double().mean().item(), abs=1e-12)
    assert plan.density() == pytest.approx(want.double().mean().item(), abs=1e-12)


@pytest.mark.parametrize("text,first,sink", [(0, False, False), (5, True, True), (9, False, True)])
def test_vectorised_densities_match_pattern_density(text, first, sink):
    T = VideoTiling(VideoLayout(9, 7, 10, text, first), (2, 3, 2))
    for shape, dens in (("window", window_densities(T, sink)), ("radial", radial_densities(T, sink))):
        for t, h, w in itertools.product(*(range(1, n + 1) for n in T.grid)):
            p = TilePattern(shape, (t, h, w), sink)
            assert dens[t - 1, h - 1, w - 1].item() == pytest.approx(pattern_density(T, p), abs=1e-12)


@pytest.mark.parametrize("layout,tile", [
    (VideoLayout(21, 30, 52), (1, 8, 8)),
    (VideoLayout(21, 30, 52), (2, 8, 8)),
    (VideoLayout(13, 30, 45, 226, True), (1, 8, 16)),
    (VideoLayout(7, 11, 13), (4, 4, 8)),
])
@pytest.mark.parametrize("sparsity", [0.5, 0.75, 0.9])
def test_chosen_patterns_stay_within_budget(layout, tile, sparsity):
    T = VideoTiling(layout, tile)
    budget = 1 - sparsity
    for sink in (False, True):
        dens = window_densities(T, sink)
        if not bool((dens <= budget).any()):  # e.g. a first-frame sink alone is over budget
            with pytest.warns(UserWarning, match="fits density"):
                assert choose_pattern(T, "window", budget, sink).size == (1, 1, 1)
            continue
        best_window = float(dens[dens <= budget].max())
        for kind in KINDS:
            p = choose_pattern(T, kind, budget, sink)
            assert pattern_density(T, p) <= budget + 1e-12, (kind, p)
        # The "window" kind is close to the densest window that fits (within its 5% evenness slack).
        assert pattern_density(T, choose_pattern(T, "window", budget, sink)) >= 0.95 * best_window - 1e-12
        for p in search_candidates(T, budget, sink):
            assert pattern_density(T, p) <= budget + 1e-12


def test_spatial_and_temporal_kinds_have_the_expected_shape():
    T = VideoTiling(VideoLayout(21, 30, 52), (1, 8, 8))
    sp = choose_pattern(T, "spatial", 0.1)
    tp = choose_pattern(T, "temporal", 0.1)
    assert sp.size[1:] == (4, 7) and sp.size[0] == 2  # two whole frames fit in 10%
    assert tp.size[0] == 21  # every frame


def test_plan_cache_returns_same_object_and_per_head_patterns():
    T = VideoTiling(VideoLayout(4, 9, 10, 3, True), (2, 4, 4))
    pats = (TilePattern("window", (1, 1, 1)), TilePattern("radial", (2, 2, 3)), TilePattern("window", (1, 1, 1)))
    plan = build_plan(T, pats, batch=2)
    assert build_plan(T, pats, batch=2) is plan
    plan.validate()
    tm = plan.token_mask()
    for h, p in enumerate(pats):
        single = build_plan(T, (p,), batch=1).token_mask()[0, 0]
        assert torch.equal(tm[0, h], single) and torch.equal(tm[1, h], single)


def test_plan_executes_like_masked_attention_in_float64():
    layout = VideoLayout(3, 5, 7, 4, False)
    T = VideoTiling(layout, (2, 2, 4))
    pats = (TilePattern("window", (1, 2, 1)), TilePattern("radial", (2, 3, 1), sink=True))
    plan = build_plan(T, pats, batch=2)
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 2, layout.seq_len, 64, generator=g) for _ in range(3))
    out = block_sparse_attention(q, k, v, plan, backend="reference").out
    mask = plan.token_mask()
    s = (q.double() @ k.double().transpose(-1, -2)) / 8.0
    ref = torch.softmax(s.masked_fill(~mask, -math.inf), -1) @ v.double()
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)


def _ctx(layout, step=0, states=None):
    return AttentionContext(layer=1, layer_name="blocks.1.attn1", num_layers=2, step=step, num_steps=10,
                            branch="cond", layout=layout, sparsity=0.75, states=LayerStates() if states is None else states)


def test_method_fixed_pattern_plans_are_cached_per_step():
    method, _ = build_method("window3d", 0.75, {"pattern": "window", "tile": (1, 4, 4)})
    assert isinstance(method, Window3D)
    layout = VideoLayout(5, 8, 9)
    q = k = v = torch.randn(2, 3, layout.seq_len, 16)
    states = LayerStates()
    p1 = method.plan(q, k, v, _ctx(layout, 0, states))
    p2 = method.plan(q, k, v, _ctx(layout, 1, states))
    assert p1 is p2 and p1.density() <= 0.25 + 1e-12
    # No grid known -> dense (None) with a warning.
    with pytest.warns(UserWarning, match="grid"):
        assert method.plan(q, k, v, _ctx(None, 0, {})) is None


def test_impossible_budget_warns_and_uses_smallest_window():
    T = VideoTiling(VideoLayout(2, 4, 4), (1, 4, 4))
    with pytest.warns(UserWarning, match="fits density"):
        p = choose_pattern(T, "window", 0.01)
    assert p.size == (1, 1, 1)


def test_bad_options_raise_config_errors():
    for bad in ({"tile": (1, 0, 8)}, {"pattern": "diagonal"}, {"candidates": ("x",)}, {"sample_rows": 0}):
        with pytest.raises(ConfigError):
            build_method("window3d", 0.9, bad)
    with pytest.raises(ConfigError, match="does not exist"):
        build_method("window3d", 0.9, {"head_config": "/nonexistent/heads.json"})


@torch.no_grad()
@pytest.mark.parametrize("options", [{}, {"block": 16, "pattern": "radial"}])
def test_end_to_end_tiny_wan_reports_sparsity(options):
    model = tiny_wan_transformer(num_layers=2, heads=2, head_dim=64)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 16, 4, 16, 20, generator=g)  # grid 4 x 8 x 10 (ragged against 8x8 tiles)
    t, e = torch.tensor([700, 700]), torch.randn(2, 7, 32, generator=g)
    ref = model(x, t, e, return_dict=False)[0]
    handle = dit_sparse.apply(model, "window3d", 0.75, warmup_steps=0, warmup_layers=0, **options)
    try:
        out = model(x, t, e, return_dict=False)[0]
        stats = handle.stats()
    finally:
        handle.remove()
    assert stats["sparse_calls"] == 2 and stats["fallback_calls"] == 0
    assert 0.75 - 1e-9 <= stats["sparsity_in_sparse_calls"] < 0.95
    assert torch.isfinite(out).all() and out.shape == ref.shape
    assert not torch.equal(out, ref)  # attention really changed


@pytest.mark.parametrize("layout,tile,pattern", CASES[1:4])
def test_fixed_block_plan_is_the_block_closure_of_the_exact_pattern(layout, tile, pattern):
    exact = VideoTiling(layout, tile, text_block=4)
    blocked = VideoTiling(layout, tile, text_block=4, block=16)
    plan = build_plan(blocked, (pattern,), batch=2)
    plan.validate()
    assert plan.block_size == (16, 16)
    want = brute_force_mask(layout, tile, pattern)
    # Brute-force closure: in plan order, a block pair is kept when any of its token pairs is.
    S, nb = layout.seq_len, math.ceil(layout.seq_len / 16)
    p = exact.perm
    in_order = want[p][:, p]
    pad = torch.zeros(nb * 16, nb * 16, dtype=torch.bool)
    pad[:S, :S] = in_order
    blocks = pad.view(nb, 16, nb, 16).any(3).any(1)
    closure = blocks.repeat_interleave(16, 0).repeat_interleave(16, 1)[:S, :S]
    inv = exact.inverse
    got = plan.token_mask()
    assert torch.equal(got[1, 0], closure[inv][:, inv])
    assert bool((got[0, 0] | ~want).all())  # superset of the exact pattern
    assert plan_density(blocked, pattern) == pytest.approx(plan.density(), abs=1e-12)


def test_fixed_block_budget_search_fits_at_block_level():
    T = VideoTiling(VideoLayout(21, 30, 52), (3, 10, 4), block=128)
    for kind in KINDS:
        p = choose_pattern(T, kind, 0.1)
        assert plan_density(T, p) <= 0.1 + 1e-12
        assert plan_density(T, p) >= 0.07  # not shrunk far below the budget
    plan = build_plan(T, (choose_pattern(T, "window", 0.1),), 1)
    assert plan.block_size == (128, 128) and plan.num_q_blocks == 256


def test_auto_tile_fills_kernel_tiles():
    assert choose_tile(VideoLayout(21, 30, 52)) == (3, 10, 4)  # 120 tokens, divides the grid exactly
    for grid in [(21, 45, 80), (13, 30, 45), (33, 45, 80), (5, 9, 13)]:
        t = choose_tile(VideoLayout(*grid), 128)
        assert 64 < math.prod(t) <= 128 and all(a <= b for a, b in zip(t, grid))
    # The method shrinks auto tiles on grids too small for the budget instead of exceeding it.
    method, _ = build_method("window3d", 0.75, {"pattern": "window"})
    T = method.tiling_for(VideoLayout(4, 8, 10), torch.device("cpu"))
    assert pattern_density(T, choose_pattern(T, "window", 0.25)) <= 0.25 + 1e-12


@pytest.mark.parametrize("layout,blocked", [
    (VideoLayout(16, 16, 16), True),  # 128-token (2, 8, 8) tiles tile the grid exactly
    (VideoLayout(5, 13, 11), False),  # ragged edge tiles: exact tiles stay
    (VideoLayout(4, 16, 16, text_tokens=100, text_first=True), False),  # a short text unit
])
def test_auto_block_marks_exact_128_token_tiles_as_fixed_blocks(layout, blocked):
    """Below 8,192 tokens block="auto" keeps exact tiles, unless every tile already is a 128-token block:
    then the plan is the same, only marked as fixed blocks (flash-attn-4 runs it)."""
    auto, _ = build_method("window3d", 0.8, {"pattern": "spatial"})
    exact, _ = build_method("window3d", 0.8, {"pattern": "spatial", "block": None})
    ta, te = auto.tiling_for(layout, "cpu"), exact.tiling_for(layout, "cpu")
    assert (ta.block == 128) is blocked and te.block is None and ta.tile == te.tile
    pa = build_plan(ta, (choose_pattern(ta, "spatial", 0.2),) * 2, batch=1)
    pe = build_plan(te, (choose_pattern(te, "spatial", 0.2),) * 2, batch=1)
    assert torch.equal(pa.token_mask(), pe.token_mask())
    assert (pa.block_size == (128, 128)) is blocked
