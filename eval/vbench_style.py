"""VBench-style no-reference video metrics.

"VBench-style" means: VBench's exact formulas where no network is needed (temporal flickering),
classical substitutes where VBench uses a network, named as such in every result (motion smoothness with
an OpenCV Farneback-flow frame interpolator instead of AMT; dynamic degree with Farneback flow instead of
RAFT), and the feature-network dimensions (subject consistency with DINO, background consistency with
CLIP) only when their weights are on this machine; otherwise the result is an `Unavailable`.

All metrics first quantise frames to uint8 (round(x * 255)), as VBench reads decoded 8-bit videos.
OpenCV (``opencv-python-headless``) is optional and imported only when needed.
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .metrics import Unavailable, VideoLike, as_video, metric_entry

MOTION_SMOOTHNESS_NAME = "motion smoothness (Farneback interpolator, not AMT)"
DYNAMIC_DEGREE_NAME = "dynamic degree (Farneback flow, not RAFT)"
TEMPORAL_FLICKERING_NAME = "temporal flickering (VBench formula)"

_NO_CV2 = Unavailable(
    "OpenCV is not installed (needed for Farneback optical flow)",
    "pip install opencv-python-headless (or 'dit-sparse[flow]')",
)


def to_uint8(video: VideoLike) -> np.ndarray:
    """[F, H, W, 3] floats in [0, 1] -> uint8 numpy array, round(x * 255) as 8-bit video encoding does."""
    v = as_video(video).detach().to("cpu", torch.float32)
    return (v * 255).round_().clamp_(0, 255).to(torch.uint8).numpy()


def _need_frames(u8: np.ndarray, n: int, metric: str) -> None:
    if u8.shape[0] < n:
        raise ValueError(f"{metric} needs at least {n} frames, got {u8.shape[0]}")


def _cv2():
    try:
        import cv2
    except ImportError:
        return None
    return cv2


def temporal_flickering(video: VideoLike) -> float:
    """VBench temporal flickering: (255 - mean_i mean|f_i - f_{i+1}|) / 255 on uint8 frames; 1.0 for a
    static video, higher is better."""
    u8 = to_uint8(video)
    _need_frames(u8, 2, "temporal flickering")
    maes = [np.abs(u8[i + 1].astype(np.int16) - u8[i].astype(np.int16)).mean() for i in range(len(u8) - 1)]
    return float((255.0 - np.mean(maes)) / 255.0)


# ------------------------------------------------------------------------------------- optical flow


def _farneback(cv2, a_gray: np.ndarray, b_gray: np.ndarray) -> np.ndarray:
    """Dense flow a -> b, [H, W, 2] float32 (x, y): a(p) ~ b(p + flow(p))."""
    h, w = a_gray.shape
    side = min(h, w)
    # Pyramid deep enough for large motions, but the coarsest level keeps >= ~16 pixels.
    levels = int(max(1, min(5, math.floor(math.log2(max(side, 2) / 16)) + 1)))
    win = int(max(5, min(15, side // 8)) | 1)
    return cv2.calcOpticalFlowFarneback(
        a_gray,
        b_gray,
        None,
        pyr_scale=0.5,
        levels=levels,
        winsize=win,
        iterations=3,
        poly_n=5,
        poly_sigma=1.2,
        flags=0,
    )


def _gray(cv2, frame: np.ndarray) -> np.ndarray:
    return cv2.cvtColor(frame, cv2.COLOR_RGB2GRAY)


def _backward_warp(cv2, img: np.ndarray, flow: np.ndarray) -> np.ndarray:
    """out(p) = img(p + flow(p)), bilinear, edges replicated; float32 output."""
    h, w = flow.shape[:2]
    gx, gy = np.meshgrid(np.arange(w, dtype=np.float32), np.arange(h, dtype=np.float32))
    return cv2.remap(
        img.astype(np.float32),
        gx + flow[..., 0],
        gy + flow[..., 1],
        cv2.INTER_LINEAR,
        borderMode=cv2.BORDER_REPLICATE,
    )


def interpolate_midpoint(a: np.ndarray, b: np.ndarray) -> np.ndarray | Unavailable:
    """Classical midpoint frame between uint8 RGB frames a and b.

    Farneback flow both ways (F_ab, F_ba); the flows from the middle frame are approximated linearly
    (t = 0.5: F_ma = (F_ba - F_ab) / 4, F_mb = -F_ma), each neighbour is warped halfway onto the middle
    and the two warps are averaged. Returns uint8 [H, W, 3].
    """
    cv2 = _cv2()
    if cv2 is None:
        return _NO_CV2
    ga, gb = _gray(cv2, a), _gray(cv2, b)
    f_ab, f_ba = _farneback(cv2, ga, gb), _farneback(cv2, gb, ga)
    f_ma = 0.25 * (f_ba - f_ab)
    mid = 0.5 * (_backward_warp(cv2, a, f_ma) + _backward_warp(cv2, b, -f_ma))
    return np.clip(np.rint(mid), 0, 255).astype(np.uint8)


def motion_smoothness(video: VideoLike) -> float | Unavailable:
    """VBench motion smoothness with a Farneback interpolator instead of AMT: every odd frame that has
    two neighbours is rebuilt from them, score = (255 - mean|orig_odd - interp_odd|) / 255 (higher is
    smoother)."""
    cv2 = _cv2()
    if cv2 is None:
        return _NO_CV2
    u8 = to_uint8(video)
    _need_frames(u8, 3, "motion smoothness")
    errs = []
    for i in range(1, len(u8) - 1, 2):
        mid = interpolate_midpoint(u8[i - 1], u8[i + 1])
        errs.append(np.abs(u8[i].astype(np.int16) - mid.astype(np.int16)).mean())
    return float((255.0 - np.mean(errs)) / 255.0)


@dataclass
class DynamicDegree:
    """Dynamic-degree verdict of one video (VBench: the share of dynamic videos in a set)."""

    is_dynamic: bool
    pair_scores: list[float] = field(default_factory=list)  # mean of the top 5% flow magnitudes (px)
    threshold_px: float = 0.0
    required_pairs: int = 1
    frame_step: int = 1

    @property
    def value(self) -> float:
        """1.0 for a dynamic video, 0.0 for a static one (averaging gives VBench's set score)."""
        return 1.0 if self.is_dynamic else 0.0


def dynamic_degree(video: VideoLike, fps: float | None = None) -> DynamicDegree | Unavailable:
    """VBench dynamic degree with Farneback flow in place of RAFT.

    Frames are sampled every round(fps / 8) frames (~8 fps; every frame when ``fps`` is None). Each
    consecutive pair scores the mean of its top 5% flow magnitudes; the video is dynamic when at least
    max(1, round(4 * n / 16)) pairs (n = sampled frames) exceed 6 * min(H, W) / 256 pixels.
    """
    cv2 = _cv2()
    if cv2 is None:
        return _NO_CV2
    u8 = to_uint8(video)
    step = max(1, round(fps / 8)) if fps else 1
    frames = u8[::step]
    _need_frames(frames, 2, f"dynamic degree (after sampling every {step} frames)")
    h, w = frames.shape[1:3]
    thres = 6.0 * min(h, w) / 256.0
    need = max(1, round(4 * len(frames) / 16))
    k = max(1, int(h * w * 0.05))
    grays = [_gray(cv2, f) for f in frames]
    scores = []
    for a, b in zip(grays[:-1], grays[1:]):
        mag = np.hypot(*np.moveaxis(_farneback(cv2, a, b), -1, 0)).ravel()
        scores.append(float(np.partition(mag, mag.size - k)[-k:].mean()))
    moving = sum(s > thres for s in scores)
    return DynamicDegree(moving >= need, scores, thres, need, step)


# ------------------------------------------------------------------------------ feature consistency


def consistency_from_features(features: torch.Tensor | np.ndarray) -> float:
    """VBench subject/background consistency from per-frame features [F, D]: for i >= 1,
    c_i = (max(0, cos(f_{i-1}, f_i)) + max(0, cos(f_0, f_i))) / 2, averaged over i."""
    f = torch.as_tensor(features).double()
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"expected per-frame features [frames >= 2, dim], got {tuple(f.shape)}")
    f = F.normalize(f, dim=1)
    prev = (f[1:] * f[:-1]).sum(1).clamp_min(0)
    first = (f[1:] * f[:1]).sum(1).clamp_min(0)
    return float(((prev + first) / 2).mean())


FeatureFn = Callable[[torch.Tensor], torch.Tensor]  # [F, 3, H, W] in [0, 1] -> [F, D]


def _opt_str(p: str | os.PathLike | None) -> str | None:
    return None if p is None else os.fspath(p)


def _frames_chw(video: VideoLike) -> torch.Tensor:
    # Through uint8 first so network metrics see the same 8-bit frames as the others.
    return torch.from_numpy(to_uint8(video)).permute(0, 3, 1, 2).float() / 255.0


def _resize_short(x: torch.Tensor, size: int, mode: str) -> torch.Tensor:
    h, w = x.shape[-2:]
    s = size / min(h, w)
    return F.interpolate(
        x,
        size=(max(size, round(h * s)), max(size, round(w * s))),
        mode=mode,
        antialias=True,
        align_corners=False,
    ).clamp(0, 1)


def _features(fn: FeatureFn, frames: torch.Tensor, batch: int = 16) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat(
            [
                fn(frames[s : s + batch]).reshape(len(frames[s : s + batch]), -1).float().cpu()
                for s in range(0, len(frames), batch)
            ]
        )


@functools.lru_cache(maxsize=2)
def _dino_extractor(
    dino_repo: str | os.PathLike | None, dino_weights: str | os.PathLike | None, device: str
) -> FeatureFn | Unavailable:
    hub = Path(torch.hub.get_dir())
    repo = Path(dino_repo) if dino_repo else hub / "facebookresearch_dino_main"
    weights = Path(dino_weights) if dino_weights else hub / "checkpoints" / "dino_vitbase16_pretrain.pth"
    fix = (
        "put the facebookresearch/dino code at <torch hub dir>/facebookresearch_dino_main and "
        "dino_vitbase16_pretrain.pth in <torch hub dir>/checkpoints (or pass dino_repo=, dino_weights=)"
    )
    if not (repo / "hubconf.py").is_file():
        return Unavailable(f"DINO hub code not found at {repo}", fix)
    if not weights.is_file():
        return Unavailable(f"DINO ViT-B/16 weights not found at {weights}", fix)
    # pretrained=False builds the architecture only; the real weights are loaded strictly right after.
    model = torch.hub.load(str(repo), "dino_vitb16", source="local", pretrained=False)
    model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True), strict=True)
    model = model.eval().to(device)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)

    def fn(x: torch.Tensor) -> torch.Tensor:
        x = (_resize_short(x, 224, "bicubic") - mean) / std
        return model(x.to(device))

    return fn


@functools.lru_cache(maxsize=2)
def _clip_extractor(clip_weights: str | os.PathLike | None, device: str) -> FeatureFn | Unavailable:
    try:
        import clip  # OpenAI's CLIP package, as VBench uses
    except ImportError:
        return Unavailable(
            "the 'clip' package is not installed (CLIP ViT-B/32 features)",
            "pip install git+https://github.com/openai/CLIP and provide ViT-B-32.pt locally",
        )
    path = Path(clip_weights) if clip_weights else Path.home() / ".cache" / "clip" / "ViT-B-32.pt"
    if not path.is_file():
        return Unavailable(
            f"CLIP ViT-B/32 weights not found at {path}",
            "copy ViT-B-32.pt there or pass clip_weights=<path to ViT-B-32.pt>",
        )
    model, _ = clip.load(str(path), device=device)  # a file path: loaded as is, nothing downloaded
    model = model.eval()
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)

    def fn(x: torch.Tensor) -> torch.Tensor:
        x = _resize_short(x, 224, "bicubic")
        h, w = x.shape[-2:]
        top, left = (h - 224) // 2, (w - 224) // 2
        x = (x[..., top : top + 224, left : left + 224] - mean) / std
        return model.encode_image(x.to(device, next(model.parameters()).dtype))

    return fn


def _consistency(video: VideoLike, fn: FeatureFn | Unavailable) -> float | Unavailable:
    """VBench consistency of `video`'s frames under the feature extractor `fn` (`fn` itself when it is the
    reason none could be built)."""
    if isinstance(fn, Unavailable):
        return fn
    return consistency_from_features(_features(fn, _frames_chw(video)))


def subject_consistency(
    video: VideoLike,
    feature_extractor: FeatureFn | None = None,
    *,
    dino_repo: str | os.PathLike | None = None,
    dino_weights: str | os.PathLike | None = None,
    device: str = "cpu",
) -> float | Unavailable:
    """VBench subject consistency (DINO ViT-B/16 features) when DINO is available locally, or with any
    ``feature_extractor`` ([F, 3, H, W] in [0, 1] -> [F, D]); `Unavailable` otherwise."""
    return _consistency(
        video, feature_extractor or _dino_extractor(_opt_str(dino_repo), _opt_str(dino_weights), device)
    )


def background_consistency(
    video: VideoLike,
    feature_extractor: FeatureFn | None = None,
    *,
    clip_weights: str | os.PathLike | None = None,
    device: str = "cpu",
) -> float | Unavailable:
    """VBench background consistency (CLIP ViT-B/32 image features) when CLIP is available locally, or
    with any ``feature_extractor``; `Unavailable` otherwise."""
    return _consistency(video, feature_extractor or _clip_extractor(_opt_str(clip_weights), device))


# ----------------------------------------------------------------------------------------- summary


def video_metrics(
    video: VideoLike,
    fps: float | None = None,
    *,
    dino_repo: str | os.PathLike | None = None,
    dino_weights: str | os.PathLike | None = None,
    clip_weights: str | os.PathLike | None = None,
    device: str = "cpu",
) -> dict[str, dict[str, Any]]:
    """All no-reference VBench-style metrics of one video, keyed by metric id, as `metric_entry` dicts.
    Metrics that cannot run here (too few frames, OpenCV or weights missing) are entries with
    value None and the reason."""
    v = as_video(video)
    n = v.shape[0]

    def short(need: int) -> Unavailable:
        return Unavailable(f"needs at least {need} frames, the video has {n}", "use a longer video")

    step = max(1, round(fps / 8)) if fps else 1
    dd = dynamic_degree(v, fps) if n > step else short(step + 1)
    out = {
        "temporal_flickering": metric_entry(
            TEMPORAL_FLICKERING_NAME, temporal_flickering(v) if n >= 2 else short(2), "", True
        ),
        "motion_smoothness": metric_entry(
            MOTION_SMOOTHNESS_NAME, motion_smoothness(v) if n >= 3 else short(3), "", True
        ),
        "dynamic_degree": metric_entry(
            DYNAMIC_DEGREE_NAME,
            dd.value if isinstance(dd, DynamicDegree) else dd,
            "",
            True,
            note="1 = dynamic, 0 = static; VBench reports the share of dynamic videos",
        ),
        "subject_consistency": metric_entry(
            "subject consistency (DINO ViT-B/16)",
            subject_consistency(v, dino_repo=dino_repo, dino_weights=dino_weights, device=device)
            if n >= 2
            else short(2),
            "",
            True,
        ),
        "background_consistency": metric_entry(
            "background consistency (CLIP ViT-B/32)",
            background_consistency(v, clip_weights=clip_weights, device=device) if n >= 2 else short(2),
            "",
            True,
        ),
    }
    return out


__all__ = [
    "DynamicDegree",
    "MOTION_SMOOTHNESS_NAME",
    "DYNAMIC_DEGREE_NAME",
    "TEMPORAL_FLICKERING_NAME",
    "to_uint8",
    "temporal_flickering",
    "interpolate_midpoint",
    "motion_smoothness",
    "dynamic_degree",
    "consistency_from_features",
    "subject_consistency",
    "background_consistency",
    "video_metrics",
]
