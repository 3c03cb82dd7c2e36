"""What a procedural clip is made of: the attribute vocabularies, the batch of clip specs, the ground truth.

A clip is one or two coloured, textured shapes moving along named paths over a grey textured background,
optionally under a camera pan. `SpecBatch` holds those attributes for B clips as indices into the
vocabularies below; `ClipTruth` / `ObjectTruth` are the same clip spelled out for checking a video against.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

# Saturated colours with hues at least 50 degrees apart, so hue classification is unambiguous.
COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (0.95, 0.10, 0.10),
    "yellow": (0.95, 0.85, 0.10),
    "green": (0.10, 0.80, 0.15),
    "cyan": (0.10, 0.85, 0.90),
    "blue": (0.15, 0.25, 0.95),
    "magenta": (0.90, 0.15, 0.85),
}
COLOUR_NAMES: tuple[str, ...] = tuple(COLOURS)
SHAPES: tuple[str, ...] = ("square", "disc", "triangle", "ring", "diamond")
TEXTURES: tuple[str, ...] = ("solid", "striped", "checkered")
# Path name -> words in the prompt. Diagonals are "moves <vertical> <horizontal>".
PATHS: dict[str, str] = {
    "left": "moves left",
    "right": "moves right",
    "up": "moves up",
    "down": "moves down",
    "up_left": "moves up left",
    "up_right": "moves up right",
    "down_left": "moves down left",
    "down_right": "moves down right",
    "bounce": "bounces",
    "grow": "grows",
}
PATH_NAMES: tuple[str, ...] = tuple(PATHS)
BACKGROUNDS: tuple[str, ...] = ("striped", "checkered", "cloudy")
TONES: tuple[str, ...] = ("dark", "light")
# Camera pans move only the background; object paths are given in screen coordinates.
PANS: tuple[str, ...] = ("none", "left", "right", "up", "down")

RADIUS_RANGE = (8.0, 11.0)
MAX_OBJECTS = 2


@dataclass
class SpecBatch:
    """Attributes of B clips (all tensors, first dim B; object dims have size MAX_OBJECTS).

    Indices refer to COLOUR_NAMES, SHAPES, TEXTURES, PATH_NAMES, BACKGROUNDS, TONES, PANS.
    `present[:, 1]` says whether the clip has a second object. `start` is the object centre at frame 0 in
    pixels (x, y); `bg_param` holds (period, angle, phase_x, phase_y, contrast) of the background.
    """

    colour: torch.Tensor  # [B, K] long
    shape: torch.Tensor  # [B, K] long
    texture: torch.Tensor  # [B, K] long
    path: torch.Tensor  # [B, K] long
    present: torch.Tensor  # [B, K] bool
    radius: torch.Tensor  # [B, K] float
    start: torch.Tensor  # [B, K, 2] float
    background: torch.Tensor  # [B] long
    tone: torch.Tensor  # [B] long
    pan: torch.Tensor  # [B] long
    bg_param: torch.Tensor  # [B, 5] float

    def __len__(self) -> int:
        return self.colour.shape[0]

    def to(self, device: torch.device | str) -> SpecBatch:
        """Copy of the batch on `device`."""
        return SpecBatch(**{f.name: getattr(self, f.name).to(device) for f in fields(self)})

    def index(self, idx: torch.Tensor | slice | list[int]) -> SpecBatch:
        """Sub-batch of the clips selected by `idx`."""
        return SpecBatch(**{f.name: getattr(self, f.name)[idx] for f in fields(self)})

    @staticmethod
    def cat(batches: list[SpecBatch]) -> SpecBatch:
        """Concatenate batches along the clip dimension."""
        return SpecBatch(**{f.name: torch.cat([getattr(b, f.name) for b in batches]) for f in fields(batches[0])})


@dataclass
class ObjectTruth:
    """Ground truth of one object: names plus per-frame centre (x, y) in pixels and scale factor."""

    colour: str
    shape: str
    texture: str
    path: str
    centres: torch.Tensor  # [F, 2]
    scales: torch.Tensor  # [F]
    radius: float


@dataclass
class ClipTruth:
    """Ground truth of one clip: its prompt, objects, background and camera pan."""

    prompt: str
    objects: list[ObjectTruth]
    background: str
    tone: str
    pan: str
