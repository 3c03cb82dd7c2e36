"""Full-reference video metrics: sparse video vs the dense video made from the same prompt and seed.

Conventions (stated in every report):
- Videos are float arrays/tensors [F, H, W, 3] in [0, 1] (numpy or torch).
- PSNR: per frame with peak 1.0, ``10 * log10(1 / MSE)`` over all pixels and channels, then the mean
  over frames. A frame identical to its reference has PSNR = +inf; the mean is then +inf as well unless
  ``max_db`` caps each frame. Reports print it as "inf (identical)".
- SSIM: Wang et al. 2004 with an 11x11 Gaussian window (sigma 1.5), K1 = 0.01, K2 = 0.03, data range
  1.0, population (not sample) covariances, computed on each RGB channel separately and averaged over
  channels, then over the "valid" window positions (no padding), then over frames. This is what
  ``skimage.metrics.structural_similarity(gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
  data_range=1, channel_axis=-1)`` computes.
- LPIPS: the ``lpips`` package with a pretrained backbone found locally, inputs scaled from [0, 1] to
  [-1, 1] as the package expects, per frame then mean over frames. Without the package or the weights
  the result is an `Unavailable`, never a number from a random backbone.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

Tensor = torch.Tensor
VideoLike = Any  # numpy.ndarray or torch.Tensor, [F, H, W, 3] in [0, 1]

SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
SSIM_K1 = 0.01
SSIM_K2 = 0.03

# torchvision checkpoint file names of the backbones LPIPS builds (torchvision's own URLs end in these).
LPIPS_BACKBONE_FILES = {
    "alex": "alexnet-owt-7be5be79.pth",
    "vgg": "vgg16-397923af.pth",
    "squeeze": "squeezenet1_1-b8a52dc0.pth",
}

# Frames processed per chunk, so a 81-frame 720p video never needs a second full-size float copy.
_CHUNK = 8


@dataclass(frozen=True)
class Unavailable:
    """A metric that could not be computed here, with why and how to make it computable."""

    reason: str
    how_to_fix: str = ""

    def __str__(self) -> str:
        return f"unavailable: {self.reason}"

    def to_dict(self) -> dict[str, str]:
        return {"unavailable": self.reason, "how_to_fix": self.how_to_fix}


def as_video(video: VideoLike, name: str = "video") -> Tensor:
    """Validate a [F, H, W, 3] float video in [0, 1] and return it as a floating torch tensor (no copy
    when it already is one)."""
    if isinstance(video, np.ndarray):
        video = torch.from_numpy(np.ascontiguousarray(video))
    if not isinstance(video, torch.Tensor):
        raise TypeError(
            f"{name}: expected a numpy array or torch tensor [F, H, W, 3], got {type(video).__name__}"
        )
    if video.ndim != 4 or video.shape[-1] != 3:
        raise ValueError(
            f"{name}: expected shape [frames, height, width, 3] (channels last), got {tuple(video.shape)}; "
            "for a single image add a frame axis, for [F, 3, H, W] use .permute(0, 2, 3, 1)"
        )
    if not video.is_floating_point():
        raise TypeError(
            f"{name}: expected floats in [0, 1], got dtype {video.dtype}; for uint8 frames pass video / 255.0"
        )
    if video.shape[0] < 1 or video.shape[1] < 1 or video.shape[2] < 1:
        raise ValueError(f"{name}: empty video of shape {tuple(video.shape)}")
    lo, hi = float(video.min()), float(video.max())
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise ValueError(f"{name}: contains NaN or infinite values")
    if lo < -1e-3 or hi > 1 + 1e-3:
        raise ValueError(
            f"{name}: values span [{lo:.4g}, {hi:.4g}] but must lie in [0, 1]; "
            "for [-1, 1] decoder output use (x + 1) / 2, then clamp(0, 1)"
        )
    return video


def video_pair(a: VideoLike, b: VideoLike) -> tuple[Tensor, Tensor]:
    """(reference, test) as float videos of one shape; a clear error when the shapes differ."""
    a, b = as_video(a, "reference video"), as_video(b, "test video")
    if a.shape != b.shape:
        raise ValueError(
            f"videos differ in shape: reference {tuple(a.shape)} vs test {tuple(b.shape)}; "
            "compare videos generated with the same size and frame count"
        )
    if a.device != b.device:
        b = b.to(a.device)
    return a, b


def _work_dtype(a: Tensor, b: Tensor) -> torch.dtype:
    # float64 inputs stay float64 (reference checks); everything else runs in float32.
    return torch.float64 if torch.float64 in (a.dtype, b.dtype) else torch.float32


def psnr_per_frame(reference: VideoLike, test: VideoLike, max_db: float | None = None) -> Tensor:
    """PSNR of each frame in dB (peak 1.0) as a float64 tensor [F]; +inf for identical frames unless
    ``max_db`` caps it."""
    a, b = video_pair(reference, test)
    dt = _work_dtype(a, b)
    mse = []
    for s in range(0, a.shape[0], _CHUNK):
        d = a[s : s + _CHUNK].to(dt) - b[s : s + _CHUNK].to(dt)
        mse.append(d.square().flatten(1).sum(1, dtype=torch.float64) / d[0].numel())
    m = torch.cat(mse).cpu()
    with torch.no_grad():
        out = torch.where(m > 0, -10.0 * torch.log10(m.clamp_min(1e-300)), torch.full_like(m, math.inf))
    if max_db is not None:
        out = out.clamp_max(max_db)
    return out


def psnr(reference: VideoLike, test: VideoLike, max_db: float | None = None) -> float:
    """Mean over frames of the per-frame PSNR in dB (peak 1.0). +inf if any frame is identical and
    ``max_db`` is None (see module docstring)."""
    return float(psnr_per_frame(reference, test, max_db).mean())


@functools.lru_cache(maxsize=8)
def _gaussian_window(size: int, sigma: float, dtype: torch.dtype, device: torch.device) -> Tensor:
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(x**2) / (2 * sigma**2))
    g = g / g.sum()
    return g.to(dtype=dtype, device=device)


def _blur(x: Tensor, g: Tensor) -> Tensor:
    """Separable 'valid' Gaussian filter of [N, C, H, W] (depthwise: each channel on its own)."""
    c = x.shape[1]
    k = g.numel()
    x = F.conv2d(x, g.view(1, 1, k, 1).expand(c, 1, k, 1), groups=c)
    return F.conv2d(x, g.view(1, 1, 1, k).expand(c, 1, 1, k), groups=c)


def ssim_per_frame(reference: VideoLike, test: VideoLike) -> Tensor:
    """SSIM of each frame (Gaussian window, RGB channels averaged; see module docstring) as float64 [F]."""
    a, b = video_pair(reference, test)
    H, W = a.shape[1], a.shape[2]
    if H < SSIM_WINDOW or W < SSIM_WINDOW:
        raise ValueError(f"SSIM needs frames of at least {SSIM_WINDOW}x{SSIM_WINDOW} pixels, got {H}x{W}")
    dt = _work_dtype(a, b)
    g = _gaussian_window(SSIM_WINDOW, SSIM_SIGMA, dt, a.device)
    c1, c2 = (SSIM_K1 * 1.0) ** 2, (SSIM_K2 * 1.0) ** 2
    out = []
    with torch.no_grad():
        for s in range(0, a.shape[0], _CHUNK):
            x = a[s : s + _CHUNK].to(dt).permute(0, 3, 1, 2)
            y = b[s : s + _CHUNK].to(dt).permute(0, 3, 1, 2)
            n = x.shape[0]
            # One grouped filter over the five moments: x, y, x^2, y^2, xy.
            m = _blur(torch.cat([x, y, x * x, y * y, x * y], dim=1), g)
            mx, my, mxx, myy, mxy = m.split(3, dim=1)
            vx, vy, cxy = mxx - mx * mx, myy - my * my, mxy - mx * my
            smap = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
            out.append(smap.reshape(n, -1).mean(1, dtype=torch.float64))
    return torch.cat(out).cpu()


def ssim(reference: VideoLike, test: VideoLike) -> float:
    """Mean over frames of the per-frame SSIM (see module docstring for the exact convention)."""
    return float(ssim_per_frame(reference, test).mean())


# ---------------------------------------------------------------------------------------------- LPIPS


def _hub_checkpoint_dir() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints"


def find_lpips_backbone(
    net: str = "alex", lpips_weights: str | os.PathLike | None = None
) -> Path | Unavailable:
    """Locate the torchvision backbone checkpoint LPIPS needs, without downloading anything.

    ``lpips_weights`` may be the checkpoint file itself or a folder holding it under torchvision's file
    name; when None, torch hub's cache (``<torch.hub.get_dir()>/checkpoints``) is searched.
    """
    if net not in LPIPS_BACKBONE_FILES:
        raise ValueError(f"LPIPS net must be one of {sorted(LPIPS_BACKBONE_FILES)}, got {net!r}")
    fname = LPIPS_BACKBONE_FILES[net]
    fix = (
        f"copy torchvision's {net} ImageNet checkpoint '{fname}' into {_hub_checkpoint_dir()} "
        f"(or pass lpips_weights=<path to {fname} or its folder>)"
    )
    if lpips_weights is not None:
        p = Path(lpips_weights).expanduser()
        cand = p / fname if p.is_dir() else p
        if not cand.is_file():
            return Unavailable(f"LPIPS backbone weights not found at {cand}", fix)
        return cand
    cand = _hub_checkpoint_dir() / fname
    if not cand.is_file():
        return Unavailable(f"LPIPS {net} backbone weights are not in the local torch hub cache ({cand})", fix)
    return cand


@contextlib.contextmanager
def _hub_dir_serving(checkpoint: Path, fname: str):
    """Point torch hub at a folder where ``checkpoints/<fname>`` is ``checkpoint``, so torchvision loads
    it instead of downloading; restores the previous hub folder afterwards."""
    if checkpoint.parent == _hub_checkpoint_dir() and checkpoint.name == fname:
        yield
        return
    old = torch.hub.get_dir()
    with tempfile.TemporaryDirectory(prefix="dit_sparse_lpips_") as tmp:
        (Path(tmp) / "checkpoints").mkdir()
        (Path(tmp) / "checkpoints" / fname).symlink_to(checkpoint.resolve())
        torch.hub.set_dir(tmp)
        try:
            yield
        finally:
            torch.hub.set_dir(old)


@functools.lru_cache(maxsize=4)
def _lpips_model(net: str, checkpoint: str, device: str):
    import lpips  # optional dependency, already checked by the caller

    with _hub_dir_serving(Path(checkpoint), LPIPS_BACKBONE_FILES[net]):
        # pretrained=True: the package's own linear heads; pnet_rand=False: the real ImageNet backbone.
        model = lpips.LPIPS(net=net, pretrained=True, pnet_rand=False, verbose=False)
    return model.eval().requires_grad_(False).to(device)


def lpips_distance(
    reference: VideoLike,
    test: VideoLike,
    net: str = "alex",
    lpips_weights: str | os.PathLike | None = None,
    device: str | torch.device | None = None,
    batch_size: int = 8,
) -> float | Unavailable:
    """Mean over frames of LPIPS (lower is better), inputs scaled to [-1, 1]; `Unavailable` when the
    ``lpips`` package or the backbone weights are not present locally (nothing is downloaded)."""
    a, b = video_pair(reference, test)
    try:
        import lpips  # noqa: F401
    except ImportError:
        return Unavailable(
            "the 'lpips' package is not installed",
            "pip install 'dit-sparse[lpips]' (pulls torchvision) and provide the backbone weights locally",
        )
    ckpt = find_lpips_backbone(net, lpips_weights)
    if isinstance(ckpt, Unavailable):
        return ckpt
    dev = torch.device(device) if device is not None else a.device
    model = _lpips_model(net, str(ckpt), str(dev))
    vals = []
    with torch.no_grad():
        for s in range(0, a.shape[0], batch_size):
            # lpips expects [N, 3, H, W] in [-1, 1] (its normalize=False default).
            x = a[s : s + batch_size].to(dev, torch.float32).permute(0, 3, 1, 2) * 2 - 1
            y = b[s : s + batch_size].to(dev, torch.float32).permute(0, 3, 1, 2) * 2 - 1
            vals.append(model(x, y).reshape(-1).double().cpu())
    return float(torch.cat(vals).mean())


# ------------------------------------------------------------------------------------------- summary


def metric_entry(
    name: str,
    value: float | Unavailable,
    unit: str,
    higher_is_better: bool,
    note: str = "",
) -> dict[str, Any]:
    """One metric as a JSON-friendly dict: value (None when unavailable), unit, direction and, when
    unavailable, why and how to fix it."""
    entry: dict[str, Any] = {"name": name, "unit": unit, "higher_is_better": higher_is_better}
    if isinstance(value, Unavailable):
        entry.update(value=None, **value.to_dict())
    else:
        entry["value"] = float(value)
    if note:
        entry["note"] = note
    return entry


__all__ = [
    "Unavailable",
    "as_video",
    "psnr",
    "psnr_per_frame",
    "ssim",
    "ssim_per_frame",
    "find_lpips_backbone",
    "lpips_distance",
    "metric_entry",
]
