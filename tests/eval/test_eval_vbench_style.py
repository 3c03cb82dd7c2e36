"""VBench-style metrics: exact formulas on constructed videos, Farneback substitutes on moving squares."""

from __future__ import annotations

import importlib.util
import sys

import numpy as np
import pytest
import torch
from dit_sparse.eval.metrics import Unavailable
from dit_sparse.eval.vbench_style import (
    DYNAMIC_DEGREE_NAME,
    MOTION_SMOOTHNESS_NAME,
    DynamicDegree,
    background_consistency,
    consistency_from_features,
    dynamic_degree,
    interpolate_midpoint,
    motion_smoothness,
    subject_consistency,
    temporal_flickering,
    to_uint8,
    video_metrics,
)

needs_cv2 = pytest.mark.skipif(importlib.util.find_spec("cv2") is None, reason="opencv not installed")


def _smooth_texture(rng: np.random.Generator, h: int, w: int, lo: float, hi: float) -> np.ndarray:
    """Random low-frequency RGB texture in [lo, hi] (natural-image-like, so optical flow is well posed)."""
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    out = np.zeros((h, w, 3))
    for _ in range(4):
        fx, fy = rng.uniform(0.5, 2.0, 2) * 2 * np.pi / np.array([w, h]) * 2
        out += np.sin(fx * x[..., None] + fy * y[..., None] + rng.uniform(0, 2 * np.pi, 3))
    out = (out - out.min()) / (out.max() - out.min())
    return (lo + (hi - lo) * out).astype(np.float32)


def square_video(positions, h=64, w=80, size=16, seed=0) -> np.ndarray:
    """A textured square on a textured background, at x = positions[f] in frame f."""
    rng = np.random.default_rng(seed)
    bg = _smooth_texture(rng, h, w, 0.1, 0.4)
    tex = _smooth_texture(rng, size, size, 0.5, 1.0)
    v = np.repeat(bg[None], len(positions), 0)
    for f, x in enumerate(positions):
        v[f, 20 : 20 + size, x : x + size] = tex
    return v


# ----------------------------------------------------------------------------------- flickering


def test_flickering_static_is_one():
    v = np.repeat(np.random.default_rng(1).uniform(0, 1, (1, 13, 17, 3)), 6, 0)
    assert temporal_flickering(v) == 1.0


def test_flickering_alternating_known_value():
    rng = np.random.default_rng(2)
    base = rng.integers(0, 200, (13, 17, 3))
    k = 37
    frames = np.stack([base + (k if f % 2 else 0) for f in range(7)]) / 255.0
    assert temporal_flickering(frames) == pytest.approx((255 - k) / 255, abs=1e-12)


def test_flickering_matches_formula_on_random_video():
    v = np.random.default_rng(3).uniform(0, 1, (5, 9, 11, 3)).astype(np.float32)
    u = np.rint(v.astype(np.float64) * 255)
    ref = (255 - np.mean([np.abs(u[i] - u[i + 1]).mean() for i in range(4)])) / 255
    assert temporal_flickering(torch.from_numpy(v)) == pytest.approx(ref, abs=1e-12)
    np.testing.assert_array_equal(to_uint8(v), u.astype(np.uint8))
    with pytest.raises(ValueError, match="at least 2 frames"):
        temporal_flickering(v[:1])


# ------------------------------------------------------------------------------ flow-based metrics


@needs_cv2
def test_midpoint_interpolation_of_linear_motion():
    v = square_video([10, 14, 18])
    mid = interpolate_midpoint(to_uint8(v)[0], to_uint8(v)[2])
    err = np.abs(mid.astype(float) - to_uint8(v)[1]).mean()
    naive = np.abs(0.5 * (to_uint8(v)[0].astype(float) + to_uint8(v)[2]) - to_uint8(v)[1]).mean()
    assert err < 0.25 * naive  # far better than a cross-fade


@needs_cv2
def test_motion_smoothness_linear_high_random_and_jerky_lower():
    linear = motion_smoothness(square_video([8 + 2 * f for f in range(9)]))
    jerky = motion_smoothness(square_video([8, 30, 10, 32, 12, 34, 14, 36, 16]))
    rand = motion_smoothness(np.random.default_rng(4).uniform(0, 1, (9, 64, 80, 3)))
    assert linear > 0.95
    assert rand < 0.9
    assert jerky < linear - 0.01


@needs_cv2
def test_dynamic_degree_moving_vs_static():
    moving = dynamic_degree(square_video([4 + 4 * f for f in range(9)]))
    static = dynamic_degree(square_video([20] * 9))
    assert isinstance(moving, DynamicDegree) and moving.is_dynamic and moving.value == 1.0
    assert not static.is_dynamic and static.value == 0.0
    assert moving.threshold_px == pytest.approx(6 * 64 / 256)
    assert moving.required_pairs == round(4 * 9 / 16)
    # flow of the top 5% of pixels ~ the square's 4 px/frame motion
    assert np.median(moving.pair_scores) == pytest.approx(4.0, abs=1.0)


@needs_cv2
def test_dynamic_degree_fps_sampling_and_size_scaling():
    v = square_video([4 + f for f in range(17)], h=96, w=120)  # 1 px/frame
    every = dynamic_degree(v)
    sampled = dynamic_degree(v, fps=24)  # every 3rd frame -> 3 px per sampled pair
    assert every.frame_step == 1 and sampled.frame_step == 3
    assert len(sampled.pair_scores) == len(v[::3]) - 1
    assert sampled.threshold_px == pytest.approx(6 * 96 / 256)
    assert not every.is_dynamic and sampled.is_dynamic


def test_flow_metrics_unavailable_without_opencv(monkeypatch):
    monkeypatch.setitem(sys.modules, "cv2", None)
    v = square_video([0, 2, 4])
    for r in (motion_smoothness(v), dynamic_degree(v), interpolate_midpoint(to_uint8(v)[0], to_uint8(v)[1])):
        assert isinstance(r, Unavailable) and "OpenCV" in r.reason and "opencv" in r.how_to_fix
    entries = video_metrics(v)
    assert entries["motion_smoothness"]["value"] is None
    assert entries["temporal_flickering"]["value"] is not None


# ------------------------------------------------------------------------------------ consistency


def test_consistency_formula():
    f = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 1.0], [-1.0, 0.0]]) * torch.tensor(
        [[3.0], [2.0], [1.0], [5.0]]
    )
    c = 2**-0.5
    # frame1: prev c, first c; frame2: prev c, first 0; frame3: prev 0 (cos -> 0), first max(0, -1) = 0
    expected = ((c + c) / 2 + (c + 0) / 2 + (0 + 0) / 2) / 3
    assert consistency_from_features(f) == pytest.approx(expected, abs=1e-12)
    assert consistency_from_features(torch.randn(1, 8).repeat(5, 1)) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="frames >= 2"):
        consistency_from_features(torch.ones(1, 4))


def test_consistency_with_custom_extractor_and_unavailable(tmp_path):
    rng = np.random.default_rng(5)
    v = rng.uniform(0, 1, (4, 16, 16, 3)).astype(np.float32)

    def mean_rgb(x: torch.Tensor) -> torch.Tensor:
        return x.mean((2, 3)) - 0.5

    feats = torch.from_numpy(to_uint8(v)).float().div(255).mean((1, 2)) - 0.5
    assert subject_consistency(v, mean_rgb) == pytest.approx(consistency_from_features(feats), abs=1e-6)
    assert background_consistency(v, mean_rgb) == pytest.approx(consistency_from_features(feats), abs=1e-6)
    r = subject_consistency(v, dino_repo=tmp_path, dino_weights=tmp_path / "w.pth")
    assert isinstance(r, Unavailable) and "DINO" in r.reason
    r = background_consistency(v, clip_weights=tmp_path / "ViT-B-32.pt")
    assert isinstance(r, Unavailable)


def test_video_metrics_entries_and_short_videos():
    v = square_video([8 + 2 * f for f in range(5)])
    m = video_metrics(v, dino_repo="/nonexistent")
    assert set(m) == {
        "temporal_flickering",
        "motion_smoothness",
        "dynamic_degree",
        "subject_consistency",
        "background_consistency",
    }
    assert m["motion_smoothness"]["name"] == MOTION_SMOOTHNESS_NAME
    assert m["dynamic_degree"]["name"] == DYNAMIC_DEGREE_NAME
    assert m["subject_consistency"]["value"] is None and m["subject_consistency"]["unavailable"]
    one = video_metrics(v[:1])
    assert all(e["value"] is None and "frames" in e["unavailable"] for e in one.values())
