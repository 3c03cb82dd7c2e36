"""PSNR / SSIM / LPIPS against float64 references and known cases."""

from __future__ import annotations

import math
import sys
import types

import numpy as np
import pytest
import torch
from dit_sparse.eval import metrics
from dit_sparse.eval.compare import compare_videos
from dit_sparse.eval.metrics import (
    LPIPS_BACKBONE_FILES,
    Unavailable,
    find_lpips_backbone,
    lpips_distance,
    psnr,
    psnr_per_frame,
    ssim,
    ssim_per_frame,
)
from numpy.lib.stride_tricks import sliding_window_view


def _pair(seed: int, shape=(3, 19, 23, 3), noise=0.1) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    a = rng.uniform(0.05, 0.95, shape)
    b = np.clip(a + rng.normal(0, noise, shape), 0, 1)
    return a.astype(np.float32), b.astype(np.float32)


# ------------------------------------------------------------------------------- float64 references


def _psnr_ref(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a.astype(np.float64), b.astype(np.float64)
    return np.array([10 * math.log10(1.0 / np.mean((x - y) ** 2)) for x, y in zip(a, b)])


def _ssim_ref(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Direct float64 SSIM: 2-D Gaussian window (not separable), every valid position, per channel."""
    r = np.arange(11) - 5.0
    g = np.exp(-(r**2) / (2 * 1.5**2))
    w = np.outer(g, g)
    w /= w.sum()
    c1, c2 = 0.01**2, 0.03**2
    out = []
    for x3, y3 in zip(a.astype(np.float64), b.astype(np.float64)):
        vals = []
        for c in range(3):
            px = sliding_window_view(x3[..., c], (11, 11))
            py = sliding_window_view(y3[..., c], (11, 11))
            mx = (px * w).sum((-1, -2))
            my = (py * w).sum((-1, -2))
            vx = (((px - mx[..., None, None]) ** 2) * w).sum((-1, -2))
            vy = (((py - my[..., None, None]) ** 2) * w).sum((-1, -2))
            cxy = ((px - mx[..., None, None]) * (py - my[..., None, None]) * w).sum((-1, -2))
            s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2))
            vals.append(s.mean())
        out.append(np.mean(vals))
    return np.array(out)


# ------------------------------------------------------------------------------------------- PSNR


@pytest.mark.parametrize("seed,shape", [(0, (3, 19, 23, 3)), (1, (5, 8, 31, 3)), (2, (1, 7, 9, 3))])
def test_psnr_matches_float64_reference(seed, shape):
    a, b = _pair(seed, shape)
    ref = _psnr_ref(a, b)
    np.testing.assert_allclose(psnr_per_frame(a, b).numpy(), ref, rtol=1e-6)
    assert psnr(torch.from_numpy(a), torch.from_numpy(b)) == pytest.approx(ref.mean(), rel=1e-6)
    # float64 input runs in float64
    assert psnr(a.astype(np.float64), b.astype(np.float64)) == pytest.approx(ref.mean(), rel=1e-12)


def test_psnr_identical_is_inf_and_cap():
    a, _ = _pair(3)
    assert psnr(a, a.copy()) == math.inf
    assert psnr(a, a, max_db=100.0) == 100.0
    b = a.copy()
    b[1] = np.clip(b[1] + 0.01, 0, 1)  # one differing frame: the others are identical -> mean is inf
    per = psnr_per_frame(a, b)
    assert math.isinf(per[0]) and math.isfinite(per[1])
    assert psnr(a, b) == math.inf
    assert psnr(a, b, max_db=80.0) == pytest.approx((80 + float(per[1]) + 80) / 3)


@pytest.mark.parametrize("sigma", [0.01, 0.03])
def test_psnr_of_known_noise_variance(sigma):
    rng = np.random.default_rng(4)
    a = rng.uniform(0.3, 0.7, (4, 64, 64, 3))
    b = a + rng.normal(0, sigma, a.shape)  # stays inside [0, 1]: no clipping bias
    assert psnr(a, b) == pytest.approx(-10 * math.log10(sigma**2), abs=0.1)


# ------------------------------------------------------------------------------------------- SSIM


@pytest.mark.parametrize("seed,shape,noise", [(5, (3, 19, 23, 3), 0.1), (6, (2, 11, 14, 3), 0.3)])
def test_ssim_matches_direct_float64_reference(seed, shape, noise):
    a, b = _pair(seed, shape, noise)
    ref = _ssim_ref(a, b)
    np.testing.assert_allclose(ssim_per_frame(a, b).numpy(), ref, atol=2e-5)
    np.testing.assert_allclose(
        ssim_per_frame(a.astype(np.float64), b.astype(np.float64)).numpy(), ref, atol=1e-12
    )


def test_ssim_identical_symmetric_range_and_monotone():
    a, b = _pair(7, (4, 21, 17, 3), 0.2)
    assert ssim(a, a) == pytest.approx(1.0, abs=1e-6)
    assert ssim(a, b) == pytest.approx(ssim(b, a), abs=1e-7)
    rng = np.random.default_rng(8)
    c = rng.uniform(0, 1, a.shape).astype(np.float32)
    for x, y in [(a, b), (a, c), (a, 1 - a)]:
        per = ssim_per_frame(x, y)
        assert torch.all(per <= 1 + 1e-6) and torch.all(per >= -1 - 1e-6)
    assert ssim(a, 1 - a) < 0  # anti-correlated
    assert ssim(a, _pair(7, (4, 21, 17, 3), 0.05)[1]) > ssim(a, b) > ssim(a, c)


def test_ssim_matches_skimage_if_installed():
    sk = pytest.importorskip("skimage.metrics")
    a, b = _pair(9, (2, 24, 30, 3), 0.15)
    ref = [
        sk.structural_similarity(
            x.astype(np.float64),
            y.astype(np.float64),
            gaussian_weights=True,
            sigma=1.5,
            use_sample_covariance=False,
            data_range=1,
            channel_axis=-1,
        )
        for x, y in zip(a, b)
    ]
    np.testing.assert_allclose(ssim_per_frame(a, b).numpy(), ref, atol=2e-5)


# ------------------------------------------------------------------------------------ input checks


def test_bad_inputs_raise_clear_errors():
    a, b = _pair(10)
    with pytest.raises(ValueError, match="channels last"):
        psnr(a.transpose(0, 3, 1, 2), b.transpose(0, 3, 1, 2))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        psnr(a * 2 - 1, b)
    with pytest.raises(TypeError, match="255"):
        psnr((a * 255).astype(np.uint8), b)
    with pytest.raises(ValueError, match="differ in shape"):
        psnr(a, b[:2])
    with pytest.raises(ValueError, match="at least 11x11"):
        ssim(a[:, :8], b[:, :8])
    with pytest.raises(TypeError, match="numpy array or torch tensor"):
        psnr(a.tolist(), b)


# ------------------------------------------------------------------------------------------ LPIPS


@pytest.fixture
def fresh_lpips_cache():
    metrics._lpips_model.cache_clear()
    yield
    metrics._lpips_model.cache_clear()


def test_lpips_unavailable_without_package(monkeypatch, fresh_lpips_cache):
    monkeypatch.setitem(sys.modules, "lpips", None)  # makes `import lpips` raise ImportError
    a, b = _pair(11)
    r = lpips_distance(a, b)
    assert isinstance(r, Unavailable)
    assert "not installed" in r.reason and r.how_to_fix
    assert str(r).startswith("unavailable: ")
    entry = compare_videos(a, b, no_reference=False)["lpips"]
    assert entry["value"] is None and "not installed" in entry["unavailable"]


class _FakeLPIPS(torch.nn.Module):
    """Stands in for lpips.LPIPS: records how it was built, what it was fed and whether the backbone
    checkpoint was reachable through torch hub at construction time."""

    built: list[dict] = []
    seen: list[tuple[float, float]] = []

    def __init__(self, **kw):
        super().__init__()
        fname = LPIPS_BACKBONE_FILES[kw.get("net", "alex")]
        kw["hub_has_ckpt"] = (metrics._hub_checkpoint_dir() / fname).is_file()
        _FakeLPIPS.built.append(kw)

    def forward(self, x, y):
        _FakeLPIPS.seen.append((float(torch.minimum(x, y).min()), float(torch.maximum(x, y).max())))
        return (x - y).abs().mean((1, 2, 3), keepdim=True)


@pytest.fixture
def fake_lpips(monkeypatch, fresh_lpips_cache):
    mod = types.ModuleType("lpips")
    mod.LPIPS = _FakeLPIPS
    monkeypatch.setitem(sys.modules, "lpips", mod)
    _FakeLPIPS.built.clear()
    _FakeLPIPS.seen.clear()
    return mod


def test_lpips_unavailable_without_weights(fake_lpips, tmp_path):
    a, b = _pair(12)
    r = lpips_distance(a, b, lpips_weights=tmp_path / "missing.pth")
    assert isinstance(r, Unavailable) and "not found" in r.reason
    r = lpips_distance(a, b, lpips_weights=tmp_path)  # a folder without the checkpoint
    assert isinstance(r, Unavailable) and LPIPS_BACKBONE_FILES["alex"] in r.reason
    assert _FakeLPIPS.built == []  # nothing constructed, in particular no random backbone


def test_lpips_uses_pretrained_backbone_and_minus_one_one_inputs(fake_lpips, tmp_path):
    ckpt = tmp_path / "my_alexnet.pth"
    ckpt.write_bytes(b"not really weights")
    hub_before = torch.hub.get_dir()
    a, b = _pair(13, (5, 16, 20, 3), 0.2)
    a[0, 0, 0] = 0.0
    b[0, 0, 1] = 1.0
    r = lpips_distance(a, b, lpips_weights=ckpt, batch_size=2)
    assert torch.hub.get_dir() == hub_before
    (kw,) = _FakeLPIPS.built
    assert kw["pretrained"] is True and kw["pnet_rand"] is False and kw["hub_has_ckpt"]
    lo = min(s[0] for s in _FakeLPIPS.seen)
    hi = max(s[1] for s in _FakeLPIPS.seen)
    assert lo == pytest.approx(-1.0) and hi == pytest.approx(1.0)
    assert r == pytest.approx(2 * np.abs(a.astype(np.float64) - b).mean(), rel=1e-5)
    assert find_lpips_backbone("alex", tmp_path / "nope") != ckpt
    with pytest.raises(ValueError, match="net must be one of"):
        find_lpips_backbone("resnet")


def _real_lpips_ready() -> bool:
    try:
        import lpips  # noqa: F401
    except ImportError:
        return False
    return not isinstance(find_lpips_backbone("alex"), Unavailable)


@pytest.mark.skipif(
    not _real_lpips_ready(), reason="lpips package or its AlexNet weights not present locally"
)
def test_lpips_real_model(fresh_lpips_cache):
    a, b = _pair(14, (2, 64, 64, 3), 0.1)
    same = lpips_distance(a, a)
    diff = lpips_distance(a, b)
    assert same == pytest.approx(0.0, abs=1e-6)
    assert diff > 0.01


def test_compare_videos_entries():
    a, b = _pair(15, (4, 24, 32, 3), 0.05)
    r = compare_videos(a, b, lpips_weights="/nonexistent/weights.pth")
    for key in ("psnr", "ssim", "lpips", "temporal_flickering", "motion_smoothness", "dynamic_degree"):
        assert {"name", "unit", "higher_is_better", "value"} <= set(r[key])
    assert r["psnr"]["unit"] == "dB" and r["psnr"]["value"] == pytest.approx(psnr(a, b))
    assert r["ssim"]["value"] == pytest.approx(ssim(a, b))
    assert r["lpips"]["value"] is None and r["lpips"]["how_to_fix"]
    assert r["lpips"]["higher_is_better"] is False


def test_hub_redirection_serves_given_checkpoint_without_download(tmp_path, monkeypatch):
    """torchvision loads backbone weights with torch.hub.load_state_dict_from_url(<url ending in the file
    name>): inside the redirection that must return the user's file and never download."""

    def no_download(*a, **k):
        raise AssertionError("tried to download")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_download)
    fname = LPIPS_BACKBONE_FILES["alex"]
    ckpt = tmp_path / "elsewhere" / "weights.pth"
    ckpt.parent.mkdir()
    state = {"w": torch.randn(3, 5)}
    torch.save(state, ckpt)
    before = torch.hub.get_dir()
    with metrics._hub_dir_serving(ckpt, fname):
        got = torch.hub.load_state_dict_from_url(
            f"https://example.invalid/models/{fname}", map_location="cpu"
        )
    assert torch.equal(got["w"], state["w"])
    assert torch.hub.get_dir() == before
