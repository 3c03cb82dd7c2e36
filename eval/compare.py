"""`compare_videos`: every metric of a sparse video against its dense reference, plus the no-reference
VBench-style metrics of the sparse video, in one dict keyed by metric id."""

from __future__ import annotations

import os
from typing import Any

import torch

from .metrics import VideoLike, lpips_distance, metric_entry, psnr, ssim, video_pair
from .vbench_style import video_metrics


def compare_videos(
    dense: VideoLike,
    sparse: VideoLike,
    lpips_weights: str | os.PathLike | None = None,
    *,
    fps: float | None = None,
    lpips_net: str = "alex",
    no_reference: bool = True,
    device: str | torch.device | None = None,
) -> dict[str, dict[str, Any]]:
    """All metrics of ``sparse`` against ``dense`` (same prompt and seed), keyed by metric id.

    Each value is a `metric_entry` dict (name, value, unit, higher_is_better, and unavailable/how_to_fix
    when it could not be computed). With ``no_reference`` the VBench-style no-reference metrics of the
    sparse video are included too (see `video_metrics`; ``fps`` is the videos' frame rate, e.g. 16 for
    Wan). ``device`` (e.g. "cuda") moves the videos there for PSNR/SSIM/LPIPS; the flow metrics run on
    the CPU with OpenCV.
    """
    a, b = video_pair(dense, sparse)
    if device is not None:
        a, b = a.to(device), b.to(device)
    out = {
        "psnr": metric_entry("PSNR (per frame, peak 1.0, mean over frames)", psnr(a, b), "dB", True),
        "ssim": metric_entry("SSIM (Gaussian 11x11, sigma 1.5, RGB mean)", ssim(a, b), "", True),
        "lpips": metric_entry(
            f"LPIPS ({lpips_net}, inputs in [-1, 1])",
            lpips_distance(a, b, net=lpips_net, lpips_weights=lpips_weights),
            "",
            False,
        ),
    }
    if no_reference:
        out.update(video_metrics(b, fps=fps))
    return out
