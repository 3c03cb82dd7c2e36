"""Rendering procedural clips: every clip of a `SpecBatch` in one batched pass on the spec's device.

Rendering contains no randomness, so a spec fixes its clip bit-for-bit on a given device. Backgrounds are
grey (an analytic texture shifted by the camera pan) so an object's hue alone identifies it; objects are
antialiased signed-distance shapes whose texture moves with them.
"""

from __future__ import annotations

import math

import torch

from .clip_motion import pan_velocity, trajectories
from .clip_spec import COLOURS, SpecBatch


def _shape_sdf(shape: torch.Tensor, dx: torch.Tensor, dy: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """Approximate signed distance (negative inside) of each shape; all five are evaluated, one is picked."""
    ax, ay = dx.abs(), dy.abs()
    dist = torch.sqrt(dx * dx + dy * dy)
    square = torch.maximum(ax, ay) - 0.85 * r
    disc = dist - r
    ring = (dist - 0.72 * r).abs() - 0.28 * r
    # Upward triangle with apex (0, -r) and base corners (+-r, 0.8 r).
    inv = 1.0 / math.sqrt(1.8**2 + 1.0)
    right = (1.8 * dx - (dy + r)) * inv
    left = (-1.8 * dx - (dy + r)) * inv
    triangle = torch.maximum(torch.maximum(right, left), dy - 0.8 * r)
    diamond = (ax + ay - 1.15 * r) / math.sqrt(2.0)
    all_sdf = torch.stack([square, disc, triangle, ring, diamond], dim=0)
    return torch.gather(all_sdf, 0, shape.unsqueeze(0).expand_as(all_sdf[:1]).clone())[0]


CLIP_SIZE = 64  # canvas side in pixels; paths and radii are drawn for it (clip_motion.py)
CLIP_FRAMES = 16  # frames per clip, unless a model is trained on another length (train-reference --frames)


def render(spec: SpecBatch, num_frames: int = CLIP_FRAMES, size: int = CLIP_SIZE) -> torch.Tensor:
    """Render clips on the spec's device: returns [B, 3, F, H, W] in [-1, 1] (Diffusers video layout)."""
    dev = spec.start.device
    b = len(spec)
    coords = torch.arange(size, device=dev, dtype=torch.float32) + 0.5
    ys, xs = coords.view(1, 1, size, 1), coords.view(1, 1, 1, size)  # broadcast over [B, F, H, W]
    frames = torch.arange(num_frames, device=dev, dtype=torch.float32).view(1, num_frames, 1, 1)

    # Background: grey analytic texture, shifted over time by the camera pan.
    pan_vec = pan_velocity(spec)  # [B, 2]
    bx = xs - pan_vec[:, 0].view(b, 1, 1, 1) * frames
    by = ys - pan_vec[:, 1].view(b, 1, 1, 1) * frames
    period, angle, phx, phy, contrast = (spec.bg_param[:, i].view(b, 1, 1, 1) for i in range(5))
    w = 2 * math.pi / period
    stripes = torch.tanh(3.0 * torch.sin(w * (bx * torch.cos(angle) + by * torch.sin(angle)) + phx))
    checker = torch.tanh(3.0 * torch.sin(w * bx + phx)) * torch.tanh(3.0 * torch.sin(w * by + phy))
    cloudy = (
        torch.sin(0.5 * w * bx + phx) * torch.cos(0.4 * w * by + phy)
        + 0.6 * torch.sin(0.35 * w * (bx + by) + phy)
    ) / 1.6
    pattern = torch.stack([stripes, checker, cloudy], dim=0)
    idx = spec.background.view(1, b, 1, 1, 1).expand(1, b, num_frames, size, size)
    pattern = torch.gather(pattern, 0, idx)[0]
    base = torch.tensor([0.22, 0.62], device=dev)[spec.tone].view(b, 1, 1, 1)
    grey = base + contrast * pattern  # [B, F, H, W]
    video = grey.unsqueeze(1).expand(b, 3, num_frames, size, size).clone()

    centres, scales = trajectories(spec, num_frames)
    palette = torch.tensor(list(COLOURS.values()), device=dev)
    for k in range(spec.colour.shape[1]):
        cx = centres[:, k, :, 0].view(b, num_frames, 1, 1)
        cy = centres[:, k, :, 1].view(b, num_frames, 1, 1)
        r = (spec.radius[:, k].view(b, 1) * scales[:, k]).view(b, num_frames, 1, 1)
        dx, dy = xs - cx, ys - cy
        sdf = _shape_sdf(spec.shape[:, k].view(b, 1, 1, 1).expand(b, num_frames, size, size), dx, dy, r)
        alpha = (0.5 - sdf).clamp(0.0, 1.0) * spec.present[:, k].view(b, 1, 1, 1)
        # Textures move with the object; the darker half keeps the hue (only the value drops).
        stripe = torch.remainder(torch.floor((dx + dy) / 4.0), 2.0)
        check = torch.remainder(torch.floor(dx / 4.0) + torch.floor(dy / 4.0), 2.0)
        tex = torch.stack([torch.zeros_like(stripe), stripe, check], dim=0)
        tidx = spec.texture[:, k].view(1, b, 1, 1, 1).expand(1, b, num_frames, size, size)
        shade = 1.0 - 0.45 * torch.gather(tex, 0, tidx)[0]
        rgb = palette[spec.colour[:, k]].view(b, 3, 1, 1, 1) * shade.unsqueeze(1)
        a = alpha.unsqueeze(1)
        video = video * (1.0 - a) + rgb * a
    return video * 2.0 - 1.0
