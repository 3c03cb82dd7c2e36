"""Prompt adherence of generated reference-model videos, measured against the generator's ground truth.

For each object the prompt describes: its colour must be visible (pixels whose hue matches the palette
colour, with enough saturation and brightness, in most frames), and the centroid track of that colour's
mask must follow the described path:
- straight moves: displacement (mean of the last 3 frames minus mean of the first 3) has cosine > 0.7 with
  the described direction and covers at least 30% of the described travel;
- "bounces": the same test for the outward leg (start -> mid-clip) and the return leg (mid-clip -> end);
- "grows": mask area grows by > 1.5x while the centroid moves < 30% of a straight move's travel.
A video passes when every described object passes both tests. Backgrounds are grey, so they never match.
"""

from __future__ import annotations

import colorsys
import math
from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np
import torch

from .clip_motion import AXIS_TRAVEL, path_vector
from .clip_spec import COLOUR_NAMES, COLOURS, ClipTruth, ObjectTruth

PALETTE_HUES = torch.tensor([colorsys.rgb_to_hsv(*COLOURS[c])[0] * 360.0 for c in COLOUR_NAMES])
HUE_TOLERANCE = 25.0  # degrees; palette hues are >= 50 degrees apart
MIN_SATURATION = 0.45
MIN_VALUE = 0.3
MIN_AREA = 8  # pixels for a colour to count as present in a frame
PRESENT_FRACTION = 0.75  # fraction of frames in which the colour must be present
COS_THRESHOLD = 0.7
MIN_TRAVEL_FRACTION = 0.3
GROW_RATIO = 1.5


def _as_frames(frames: np.ndarray | torch.Tensor) -> torch.Tensor:
    x = torch.as_tensor(np.asarray(frames) if not isinstance(frames, torch.Tensor) else frames).float().cpu()
    if x.ndim != 4 or x.shape[-1] != 3:
        raise ValueError(f"frames must be [F, H, W, 3] in [0, 1], got shape {tuple(x.shape)}")
    return x


def colour_labels(frames: np.ndarray | torch.Tensor) -> torch.Tensor:
    """Palette index of every pixel [F, H, W] (long), or -1 where no palette colour matches."""
    x = _as_frames(frames)
    mx, mn = x.max(dim=-1).values, x.min(dim=-1).values
    delta = mx - mn
    r, g, b = x.unbind(-1)
    safe = delta.clamp(min=1e-6)
    # Standard RGB -> hue (degrees), vectorised.
    hue = torch.where(
        mx == r,
        torch.remainder((g - b) / safe, 6.0),
        torch.where(mx == g, (b - r) / safe + 2.0, (r - g) / safe + 4.0),
    ) * 60.0
    sat = delta / mx.clamp(min=1e-6)
    diff = (hue.unsqueeze(-1) - PALETTE_HUES).abs()
    diff = torch.minimum(diff, 360.0 - diff)
    dist, label = diff.min(dim=-1)
    valid = (sat > MIN_SATURATION) & (mx > MIN_VALUE) & (dist < HUE_TOLERANCE)
    return torch.where(valid, label, torch.full_like(label, -1))


def colour_track(labels: torch.Tensor, colour: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-frame mask area [F] and centroid [F, 2] (x, y pixel centres; NaN where absent) of one colour."""
    mask = (labels == COLOUR_NAMES.index(colour)).float()
    f, h, w = mask.shape
    area = mask.sum(dim=(1, 2))
    ys = torch.arange(h, dtype=torch.float32).view(1, h, 1) + 0.5
    xs = torch.arange(w, dtype=torch.float32).view(1, 1, w) + 0.5
    cx = (mask * xs).sum(dim=(1, 2)) / area.clamp(min=1)
    cy = (mask * ys).sum(dim=(1, 2)) / area.clamp(min=1)
    centroid = torch.stack([cx, cy], dim=-1)
    centroid[area < MIN_AREA] = float("nan")
    return area, centroid


@dataclass
class ObjectCheck:
    """Result for one described object."""

    colour: str
    path: str
    colour_ok: bool
    motion_ok: bool
    present_fraction: float
    displacement: tuple[float, float] | None = None
    cosine: float | None = None
    area_ratio: float | None = None
    reason: str = ""


@dataclass
class AdherenceResult:
    """Result for one video: passes when every object's colour and motion pass."""

    colour_ok: bool
    motion_ok: bool
    objects: list[ObjectCheck] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.colour_ok and self.motion_ok


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    na, nb = float(a.norm()), float(b.norm())
    if na < 1e-6 or nb < 1e-6:
        return 0.0
    return float((a @ b) / (na * nb))


def _leg_ok(disp: torch.Tensor, expected: torch.Tensor) -> tuple[bool, float]:
    cos = _cos(disp, expected)
    far = float(disp.norm()) >= MIN_TRAVEL_FRACTION * float(expected.norm())
    return cos > COS_THRESHOLD and far, cos


def check_object(labels: torch.Tensor, obj: ObjectTruth) -> ObjectCheck:
    """Colour and motion test of one object on pre-computed colour labels."""
    area, centroid = colour_track(labels, obj.colour)
    present = ~torch.isnan(centroid[:, 0])
    frac = float(present.float().mean())
    colour_ok = frac >= PRESENT_FRACTION
    idx = torch.nonzero(present).flatten()
    if len(idx) < 4:
        return ObjectCheck(obj.colour, obj.path, colour_ok, False, frac, reason="colour absent in most frames")
    start = centroid[idx[:3]].mean(0)
    end = centroid[idx[-3:]].mean(0)
    disp = end - start
    vec = torch.tensor(path_vector(obj.path), dtype=torch.float32)
    area_ratio = float(area[idx[-3:]].mean() / area[idx[:3]].mean().clamp(min=1))
    check = ObjectCheck(obj.colour, obj.path, colour_ok, False, frac, (float(disp[0]), float(disp[1])), None, area_ratio)
    if obj.path == "grow":
        still = float(disp.norm()) < MIN_TRAVEL_FRACTION * AXIS_TRAVEL
        check.motion_ok = area_ratio > GROW_RATIO and still
        check.reason = "" if check.motion_ok else f"area ratio {area_ratio:.2f}, moved {float(disp.norm()):.1f}px"
    elif obj.path == "bounce":
        f = labels.shape[0]
        mid_idx = idx[(idx >= f // 2 - 1) & (idx <= f // 2)]
        if len(mid_idx) == 0:
            check.reason = "colour absent at mid-clip"
            return check
        mid = centroid[mid_idx].mean(0)
        out_ok, cos_out = _leg_ok(mid - start, vec)
        back_ok, cos_back = _leg_ok(end - mid, -vec)
        check.cosine = min(cos_out, cos_back)
        check.motion_ok = out_ok and back_ok
        check.reason = "" if check.motion_ok else f"bounce legs cos {cos_out:.2f}/{cos_back:.2f}"
    else:
        check.motion_ok, check.cosine = _leg_ok(disp, vec)
        check.reason = "" if check.motion_ok else f"cos {check.cosine:.2f}, moved {float(disp.norm()):.1f}px"
    return check


def check_video(frames: np.ndarray | torch.Tensor, truth: ClipTruth) -> AdherenceResult:
    """Adherence of one video [F, H, W, 3] in [0, 1] to the prompt described by `truth`."""
    labels = colour_labels(frames)
    checks = [check_object(labels, obj) for obj in truth.objects]
    return AdherenceResult(all(c.colour_ok for c in checks), all(c.motion_ok for c in checks), checks)


def summarize(results: list[AdherenceResult], truths: list[ClipTruth]) -> dict[str, float | int | dict]:
    """Pass rates: colour, motion, both; plus "both" by path (first object) and by object count."""
    if not results or len(results) != len(truths):
        raise ValueError("need one result per truth, and at least one")
    n = len(results)
    by_path: dict[str, list[bool]] = defaultdict(list)
    by_count: dict[str, list[bool]] = defaultdict(list)
    for res, truth in zip(results, truths):
        by_path[truth.objects[0].path].append(res.ok)
        by_count[f"{len(truth.objects)}_object"].append(res.ok)
    rate = lambda xs: sum(xs) / len(xs) if xs else math.nan
    return {
        "videos": n,
        "colour": rate([r.colour_ok for r in results]),
        "motion": rate([r.motion_ok for r in results]),
        "both": rate([r.ok for r in results]),
        "by_path": {k: rate(v) for k, v in sorted(by_path.items())},
        "by_objects": {k: rate(v) for k, v in sorted(by_count.items())},
    }


def score_videos(videos: np.ndarray | torch.Tensor, truths: list[ClipTruth]) -> dict[str, float | int | dict]:
    """Check a batch of videos [B, F, H, W, 3] against their truths and summarize."""
    if len(videos) != len(truths):
        raise ValueError(f"got {len(videos)} videos for {len(truths)} ground-truth records")
    return summarize([check_video(v, t) for v, t in zip(videos, truths)], truths)
