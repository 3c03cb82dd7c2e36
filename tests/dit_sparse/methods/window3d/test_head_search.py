import json
import math

import pytest
import torch
from dit_sparse.pipelines.tiny_models import tiny_wan_transformer

import dit_sparse
import dit_sparse.methods.window3d.method as window3d_method
from dit_sparse.config import ConfigError
from dit_sparse.context import AttentionContext
from dit_sparse.layout import VideoLayout
from dit_sparse.methods import build_method
from dit_sparse.methods.window3d.head_search import (
    HeadAssignment,
    HeadConfigMismatch,
    classify_heads,
    pattern_errors,
    sample_rows,
)
from dit_sparse.methods.window3d.patterns import TilePattern, choose_pattern, pattern_density
from dit_sparse.methods.window3d.plans import build_plan
from dit_sparse.methods.window3d.search import search_heads
from dit_sparse.methods.window3d.tiling import VideoTiling
from dit_sparse.state import LayerStates


def test_pattern_errors_match_float64_masked_attention():
    layout = VideoLayout(4, 5, 6, 3, True)
    T = VideoTiling(layout, (2, 2, 4))
    pats = [TilePattern("window", (1, 2, 1)), TilePattern("radial", (2, 3, 2), sink=True)]
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 3, layout.seq_len, 64, generator=g) for _ in range(3))
    rows = sample_rows(T, 17, seed=5)
    assert rows.unique().numel() == 17 and int(rows.min()) >= layout.video_start
    got = pattern_errors(q, k, v, T, pats, rows, max_elems=2 * 17 * layout.seq_len)  # forces head chunks
    _assert_float64_errors(got, q, k, v, T, pats, rows)


def _assert_float64_errors(got, q, k, v, T, pats, rows):
    """`got` [B, H, P] against each pattern's float64 masked softmax on the rows (model's own order, d64)."""
    s = (q.double()[:, :, rows] @ k.double().transpose(-1, -2)) / 8.0
    exact = torch.softmax(s, -1) @ v.double()
    for j, p in enumerate(pats):
        mask = build_plan(T, (p,) * 3, batch=2).token_mask()[:, :, rows]
        approx = torch.softmax(s.masked_fill(~mask, -math.inf), -1) @ v.double()
        want = (approx - exact).square().sum((-1, -2)) / exact.square().sum((-1, -2))
        torch.testing.assert_close(got[..., j].double(), want, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("block,ordered", [(None, True), (16, False), (16, True), (32, True)])
def test_pattern_errors_on_blocks_and_tile_order_match_float64(block, ordered):
    """Fixed blocks (scored from per-block sums, the last block short) and tokens already in the tiling's
    order (the model running in it) against the float64 masked softmax in the model's own order."""
    layout = VideoLayout(3, 7, 5, 5, False)  # 105 video + 5 text tokens: no block size divides it
    T = VideoTiling(layout, (1, 4, 4), text_block=4, block=block)
    pats = [TilePattern("window", (1, 1, 2)), TilePattern("radial", (2, 2, 1), sink=True)]
    g = torch.Generator().manual_seed(11)
    q, k, v = (torch.randn(2, 3, layout.seq_len, 64, generator=g) for _ in range(3))
    rows = sample_rows(T, 13, seed=2)
    given = [t.index_select(2, T.perm) for t in (q, k, v)] if ordered else [q, k, v]
    got = pattern_errors(*given, T, pats, rows, max_elems=2 * 13 * layout.seq_len, ordered=ordered)
    _assert_float64_errors(got, q, k, v, T, pats, rows)
    assert float(got.std()) > 0  # the patterns and heads really differ


def _synthetic_heads(layout: VideoLayout, batch: int = 2, dim: int = 64):
    """Head 0 attends the same spatial position in every frame, head 1 everything in its own frame."""
    g = torch.Generator().manual_seed(0)
    F, R, C = layout.frames, layout.rows, layout.cols
    pos = torch.arange(R * C).repeat(F)  # spatial position of each token
    frame = torch.arange(F).repeat_interleave(R * C)
    temporal = torch.nn.functional.one_hot(pos, dim).float() * 6.0
    spatial = torch.nn.functional.one_hot(frame, dim).float() * 6.0
    q = torch.stack([temporal, spatial])[None].repeat(batch, 1, 1, 1)
    q = q + 0.05 * torch.randn(q.shape, generator=g)
    k = q + 0.05 * torch.randn(q.shape, generator=g)
    v = torch.randn(q.shape, generator=g)
    return q, k, v


def test_online_classification_picks_temporal_and_spatial_heads():
    layout = VideoLayout(6, 8, 8)
    T = VideoTiling(layout, (1, 4, 4))
    spatial = choose_pattern(T, "spatial", 0.25)
    temporal = choose_pattern(T, "temporal", 0.25)
    assert spatial.size == (1, 2, 2) and temporal.size == (6, 1, 1)
    q, k, v = _synthetic_heads(layout)
    rows = sample_rows(T, 48, seed=1)
    assert classify_heads(q, k, v, T, [spatial, temporal], rows).tolist() == [1, 0]
    assert classify_heads(q, k, v, T, [temporal, spatial], rows).tolist() == [0, 1]  # not an order artefact


def _ctx(layout, step, states):
    return AttentionContext(layer=3, layer_name="blocks.3.attn1", num_layers=4, step=step, num_steps=10,
                            branch="cond", layout=layout, sparsity=0.75, states=states)


def test_auto_mode_assigns_heads_and_reclassifies_every_n_steps(monkeypatch):
    layout = VideoLayout(6, 8, 8)
    method, _ = build_method("window3d", 0.75, {"tile": (1, 4, 4), "candidates": ("spatial", "temporal"),
                                                "classify_every": 2, "sample_rows": 32})
    q, k, v = _synthetic_heads(layout)
    calls = []
    real = window3d_method.classify_heads
    monkeypatch.setattr(window3d_method, "classify_heads", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    states = LayerStates()
    p0 = method.plan(q, k, v, _ctx(layout, 0, states))
    T = VideoTiling(layout, (1, 4, 4))
    want = build_plan(T, (choose_pattern(T, "temporal", 0.25), choose_pattern(T, "spatial", 0.25)), 2)
    # The choice stays on the device: the plan is indexed from it, equal to the plan of that assignment.
    assert torch.equal(p0.kv_indices, want.kv_indices) and torch.equal(p0.kv_counts, want.kv_counts)
    assert torch.equal(p0.q_perm, want.q_perm) and p0.seq_lens == want.seq_lens
    assert method.plan(q, k, v, _ctx(layout, 1, states)) is p0 and len(calls) == 1  # reused, not re-planned
    p2 = method.plan(q, k, v, _ctx(layout, 2, states))
    assert len(calls) == 2 and torch.equal(p2.block_mask(), p0.block_mask())  # re-classified, same heads
    assert p0.density() <= 0.25 + 1e-12


def _assignment():
    pats = [TilePattern("window", (2, 1, 3), label="window"), TilePattern("radial", (4, 2, 2), True, "radial")]
    return HeadAssignment("wan", (4, 8, 10), (1, 4, 4), 0.75, {"blocks.0.attn1": pats, "blocks.1.attn1": pats[::-1]},
                          errors={"blocks.0.attn1": [0.1, 0.2]}, block=16)


def test_json_round_trip_and_clear_mismatch_errors(tmp_path):
    a = _assignment()
    path = tmp_path / "heads.json"
    a.save(path)
    b = HeadAssignment.load(path, layout=VideoLayout(4, 8, 10), model_family="wan")
    assert b.heads == a.heads and b.grid == a.grid and b.tile == a.tile and b.model_family == "wan"
    assert b.block == 16 and b.errors == a.errors
    assert [p.label for p in b.heads["blocks.0.attn1"]] == ["window", "radial"]
    with pytest.raises(HeadConfigMismatch, match=r"4x8x10 .* but this call has 4x8x12"):
        HeadAssignment.load(path, layout=VideoLayout(4, 8, 12))
    with pytest.raises(HeadConfigMismatch, match="model family 'wan'.*'hunyuan_video'"):
        HeadAssignment.load(path, model_family="hunyuan_video")
    with pytest.raises(HeadConfigMismatch, match="no entry for layer 'blocks.7.attn1'"):
        b.patterns_for("blocks.7.attn1", 2)
    with pytest.raises(HeadConfigMismatch, match="lists 2 heads"):
        b.patterns_for("blocks.0.attn1", 12)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({**a.to_json(), "format": "other"}))
    with pytest.raises(ConfigError, match="not a window3d head_config"):
        HeadAssignment.load(bad)


@torch.no_grad()
def test_offline_search_on_tiny_wan_then_apply_head_config(tmp_path):
    model = tiny_wan_transformer(num_layers=2, heads=2, head_dim=64)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 16, 4, 16, 20, generator=g)  # grid 4 x 8 x 10
    t, e = torch.tensor([600]), torch.randn(1, 5, 32, generator=g)
    ref = model(x, t, e, return_dict=False)[0]
    path = tmp_path / "wan_heads.json"
    found = search_heads(model, lambda: model(x, t, e, return_dict=False), 0.75, tile=(1, 4, 4),
                         sample_rows=32, path=path)
    assert found.model_family == "wan" and found.grid == (4, 8, 10)
    assert sorted(found.heads) == ["blocks.0.attn1", "blocks.1.attn1"]
    T = VideoTiling(VideoLayout(4, 8, 10), (1, 4, 4))
    for name, pats in found.heads.items():
        assert len(pats) == 2 and all(pattern_density(T, p) <= 0.25 + 1e-12 for p in pats)
        assert all(0.0 <= err < 1.0 for err in found.errors[name])
    assert getattr(model, "_dit_sparse_handle", None) is None  # the search removed itself
    # The search ran dense: the model still produces the dense output afterwards.
    assert torch.equal(model(x, t, e, return_dict=False)[0], ref)

    handle = dit_sparse.apply(model, "window3d", 0.75, warmup_steps=0, warmup_layers=0,
                              head_config=str(path), model_family="wan")
    try:
        out = model(x, t, e, return_dict=False)[0]
        assert torch.isfinite(out).all()
        assert handle.stats()["sparsity_in_sparse_calls"] >= 0.75 - 1e-9
        with pytest.raises(HeadConfigMismatch, match="video grid 4x8x10"):
            model(torch.randn(1, 16, 4, 16, 24, generator=g), t, e, return_dict=False)
    finally:
        handle.remove()
