"""How the objects of a procedural clip move, and the camera pan of its background.

Objects travel far (34 px per axis move on a 64 px canvas) at constant speed, so a small DiT learns the
paths in minutes; "bounce" goes out and comes back, "grow" scales the object in place.
"""

from __future__ import annotations

import torch

from .clip_spec import PANS, PATH_NAMES, SpecBatch

AXIS_TRAVEL = 34.0  # pixels travelled by a horizontal or vertical move over the whole clip
DIAG_TRAVEL = 26.0  # pixels per axis for a diagonal move
BOUNCE_TRAVEL = 34.0  # how far a bouncing object goes out before it comes back
GROW_SCALE = (0.45, 1.25)  # start and end scale of a growing object
PAN_SPEED = 1.5  # background pixels per frame

# Unit-free displacement (dx, dy) of each path over the clip, +y pointing down the image.
_PATH_VECTORS: dict[str, tuple[float, float]] = {
    "left": (-AXIS_TRAVEL, 0.0),
    "right": (AXIS_TRAVEL, 0.0),
    "up": (0.0, -AXIS_TRAVEL),
    "down": (0.0, AXIS_TRAVEL),
    "up_left": (-DIAG_TRAVEL, -DIAG_TRAVEL),
    "up_right": (DIAG_TRAVEL, -DIAG_TRAVEL),
    "down_left": (-DIAG_TRAVEL, DIAG_TRAVEL),
    "down_right": (DIAG_TRAVEL, DIAG_TRAVEL),
    "bounce": (BOUNCE_TRAVEL, 0.0),
    "grow": (0.0, 0.0),
}
_PAN_VECTORS = {"none": (0.0, 0.0), "left": (1.0, 0.0), "right": (-1.0, 0.0), "up": (0.0, 1.0), "down": (0.0, -1.0)}


def path_vector(path: str) -> tuple[float, float]:
    """Screen displacement (dx, dy) in pixels that `path` prescribes over a clip (+y is down).

    For "bounce" this is the outward leg (the object returns to its start); for "grow" it is zero.
    """
    return _PATH_VECTORS[path]


def _path_vectors(spec: SpecBatch) -> torch.Tensor:
    """`path_vector` of every object of the batch, [B, K, 2] on the spec's device."""
    return torch.tensor([_PATH_VECTORS[p] for p in PATH_NAMES], device=spec.start.device)[spec.path]


def pan_velocity(spec: SpecBatch) -> torch.Tensor:
    """Background pixels per frame (x, y) of each clip's camera pan, [B, 2] on the spec's device."""
    return torch.tensor([_PAN_VECTORS[p] for p in PANS], device=spec.start.device)[spec.pan] * PAN_SPEED


def place_starts(spec: SpecBatch, u: torch.Tensor, size: int) -> torch.Tensor:
    """Start centres [B, K, 2] from uniform draws `u` in [0, 1), such that every object stays fully inside
    the `size` x `size` canvas for its whole path."""
    vec = _path_vectors(spec)
    grow = spec.path == PATH_NAMES.index("grow")
    margin = spec.radius * torch.where(grow, torch.full_like(spec.radius, GROW_SCALE[1]), torch.ones_like(spec.radius))
    margin = margin.unsqueeze(-1) + 1.0
    lo = margin - vec.clamp(max=0.0)
    hi = size - margin - vec.clamp(min=0.0)
    return lo + u * (hi - lo).clamp(min=0.0)


def trajectories(spec: SpecBatch, num_frames: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-frame object centres [B, K, F, 2] (x, y pixels) and scales [B, K, F] of a spec batch."""
    s = torch.linspace(0.0, 1.0, num_frames, device=spec.start.device)  # clip progress per frame
    vec = _path_vectors(spec)
    bounce = (spec.path == PATH_NAMES.index("bounce")).unsqueeze(-1)
    # Bounce: out to the far point at mid-clip, then back (triangle wave of the progress).
    progress = torch.where(bounce, 1.0 - (2.0 * s - 1.0).abs(), s)  # [B, K, F]
    centres = spec.start.unsqueeze(2) + progress.unsqueeze(-1) * vec.unsqueeze(2)
    grow = (spec.path == PATH_NAMES.index("grow")).unsqueeze(-1)
    grow_scale = GROW_SCALE[0] + (GROW_SCALE[1] - GROW_SCALE[0]) * s
    scales = torch.where(grow, grow_scale.expand_as(progress), torch.ones_like(progress))
    return centres, scales
