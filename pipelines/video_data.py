"""Procedural text-to-video data: coloured shapes moving along described paths over textured backgrounds.

Every clip is a pure function of a small attribute record (`SpecBatch`), which is sampled on the CPU from a
seeded `torch.Generator` and rendered in one batched pass on any device. Rendering contains no randomness,
so a seed fixes the clip bit-for-bit on a given device, and the record is the exact ground truth: colour,
shape, texture and path of each object plus its per-frame centre and scale.

Design choices that make the task learnable by a small DiT in minutes (see docs/reference-model-notes.md):
objects are large (16-22 px on a 64 px canvas), saturated, and travel far (34 px per axis move) at constant
speed; backgrounds are grey so an object's hue alone identifies it; a clip holds at most two objects of
different colours.
"""

from __future__ import annotations

import math
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

AXIS_TRAVEL = 34.0  # pixels travelled by a horizontal or vertical move over the whole clip
DIAG_TRAVEL = 26.0  # pixels per axis for a diagonal move
BOUNCE_TRAVEL = 34.0  # how far a bouncing object goes out before it comes back
GROW_SCALE = (0.45, 1.25)  # start and end scale of a growing object
PAN_SPEED = 1.5  # background pixels per frame
RADIUS_RANGE = (8.0, 11.0)
MAX_OBJECTS = 2

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


def _uniform(n: int, lo: float, hi: float, gen: torch.Generator, shape: tuple[int, ...] = ()) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand((n, *shape), generator=gen)


def sample_specs(
    n: int,
    generator: torch.Generator,
    *,
    two_object_prob: float = 0.3,
    pan_prob: float = 0.25,
    size: int = 64,
    exclude_prompts: set[str] | frozenset[str] | None = None,
) -> SpecBatch:
    """Draw `n` clip specs on the CPU from `generator` (deterministic for a given generator state).

    Clips whose prompt is in `exclude_prompts` (the held-out evaluation prompts) get a different path, so
    those exact prompts never occur in training.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    g = generator
    k = MAX_OBJECTS
    colour = torch.empty(n, k, dtype=torch.long)
    colour[:, 0] = torch.randint(len(COLOURS), (n,), generator=g)
    # The second colour differs from the first: offset by 1..5 modulo 6.
    colour[:, 1] = (colour[:, 0] + torch.randint(1, len(COLOURS), (n,), generator=g)) % len(COLOURS)
    shape = torch.randint(len(SHAPES), (n, k), generator=g)
    texture = torch.randint(len(TEXTURES), (n, k), generator=g)
    path = torch.randint(len(PATHS), (n, k), generator=g)
    present = torch.ones(n, k, dtype=torch.bool)
    present[:, 1] = torch.rand(n, generator=g) < two_object_prob
    radius = _uniform(n, *RADIUS_RANGE, g, (k,))
    u = torch.rand(n, k, 2, generator=g)
    background = torch.randint(len(BACKGROUNDS), (n,), generator=g)
    tone = torch.randint(len(TONES), (n,), generator=g)
    pan = torch.where(
        torch.rand(n, generator=g) < pan_prob, torch.randint(1, len(PANS), (n,), generator=g), torch.zeros(n, dtype=torch.long)
    )
    bg_param = torch.stack(
        [
            _uniform(n, 14.0, 28.0, g),  # period in px
            _uniform(n, 0.0, math.pi, g),  # stripe angle
            _uniform(n, 0.0, 2 * math.pi, g),  # phase x
            _uniform(n, 0.0, 2 * math.pi, g),  # phase y
            _uniform(n, 0.06, 0.12, g),  # contrast
        ],
        dim=1,
    )
    spec = SpecBatch(colour, shape, texture, path, present, radius, torch.zeros(n, k, 2), background, tone, pan, bg_param)
    # Second object: of a few candidate placements keep the one farthest from the first object's track,
    # so the two rarely overlap (overlap would corrupt colour-mask centroids in the adherence check).
    candidates = torch.rand(24, n, 2, generator=g)
    best, best_gap = u[:, 1].clone(), torch.full((n,), -1.0)
    for cand in candidates:
        u[:, 1] = cand
        spec.start = _place(spec, u, size)
        centres, _ = trajectories(spec, 16)
        gap = (centres[:, 0] - centres[:, 1]).norm(dim=-1).amin(dim=-1)
        better = gap > best_gap
        best[better], best_gap[better] = cand[better], gap[better]
    u[:, 1] = best
    spec.start = _place(spec, u, size)
    if exclude_prompts:
        prompts = spec_prompts(spec)
        for i, p in enumerate(prompts):
            # Rotating the first object's path changes the prompt; a few rotations always leave the set.
            while p in exclude_prompts:
                spec.path[i, 0] = (spec.path[i, 0] + 1) % len(PATHS)
                spec.start[i] = _place(spec.index([i]), u[i : i + 1], size)[0]
                p = spec_prompts(spec.index([i]))[0]
    return spec


def _place(spec: SpecBatch, u: torch.Tensor, size: int) -> torch.Tensor:
    """Start centres such that every object stays fully inside the canvas for its whole path."""
    vec = torch.tensor([_PATH_VECTORS[p] for p in PATH_NAMES])[spec.path]  # [B, K, 2]
    grow = spec.path == PATH_NAMES.index("grow")
    margin = spec.radius * torch.where(grow, torch.full_like(spec.radius, GROW_SCALE[1]), torch.ones_like(spec.radius))
    margin = margin.unsqueeze(-1) + 1.0
    lo = margin - vec.clamp(max=0.0)
    hi = size - margin - vec.clamp(min=0.0)
    return lo + u * (hi - lo).clamp(min=0.0)


def trajectories(spec: SpecBatch, num_frames: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-frame object centres [B, K, F, 2] (x, y pixels) and scales [B, K, F] of a spec batch."""
    dev = spec.start.device
    s = torch.linspace(0.0, 1.0, num_frames, device=dev)  # clip progress per frame
    vec = torch.tensor([_PATH_VECTORS[p] for p in PATH_NAMES], device=dev)[spec.path]  # [B, K, 2]
    bounce = (spec.path == PATH_NAMES.index("bounce")).unsqueeze(-1)
    # Bounce: out to the far point at mid-clip, then back (triangle wave of the progress).
    progress = torch.where(bounce, 1.0 - (2.0 * s - 1.0).abs(), s)  # [B, K, F]
    centres = spec.start.unsqueeze(2) + progress.unsqueeze(-1) * vec.unsqueeze(2)
    grow = (spec.path == PATH_NAMES.index("grow")).unsqueeze(-1)
    grow_scale = GROW_SCALE[0] + (GROW_SCALE[1] - GROW_SCALE[0]) * s
    scales = torch.where(grow, grow_scale.expand_as(progress), torch.ones_like(progress))
    return centres, scales


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


def render(spec: SpecBatch, num_frames: int = 16, size: int = 64) -> torch.Tensor:
    """Render clips on the spec's device: returns [B, 3, F, H, W] in [-1, 1] (Diffusers video layout)."""
    dev = spec.start.device
    b = len(spec)
    coords = torch.arange(size, device=dev, dtype=torch.float32) + 0.5
    ys, xs = coords.view(1, 1, size, 1), coords.view(1, 1, 1, size)  # broadcast over [B, F, H, W]
    frames = torch.arange(num_frames, device=dev, dtype=torch.float32).view(1, num_frames, 1, 1)

    # Background: grey analytic texture, shifted over time by the camera pan.
    pan_vec = torch.tensor([_PAN_VECTORS[p] for p in PANS], device=dev)[spec.pan] * PAN_SPEED  # [B, 2]
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


def spec_prompts(spec: SpecBatch) -> list[str]:
    """The text prompt of each clip, e.g. "a red striped square moves left on a dark checkered background"."""
    out = []
    colour, shape, texture, path = (t.tolist() for t in (spec.colour, spec.shape, spec.texture, spec.path))
    present, background, tone, pan = spec.present.tolist(), spec.background.tolist(), spec.tone.tolist(), spec.pan.tolist()
    for i in range(len(colour)):
        parts = []
        for k in range(len(colour[i])):
            if not present[i][k]:
                continue
            tex = TEXTURES[texture[i][k]]
            noun = f"{COLOUR_NAMES[colour[i][k]]} {'' if tex == 'solid' else tex + ' '}{SHAPES[shape[i][k]]}"
            parts.append(f"a {noun} {PATHS[PATH_NAMES[path[i][k]]]}")
        text = " and ".join(parts) + f" on a {TONES[tone[i]]} {BACKGROUNDS[background[i]]} background"
        if pan[i] != 0:
            text += f" while the camera pans {PANS[pan[i]]}"
        out.append(text)
    return out


def vocabulary() -> list[str]:
    """Every word the generator's prompts can contain, in a fixed order."""
    words: list[str] = ["a", "and", "on", "background", "while", "the", "camera", "pans"]
    words += list(COLOUR_NAMES) + list(SHAPES) + [t for t in TEXTURES if t != "solid"]
    for phrase in PATHS.values():
        words += phrase.split()
    words += list(BACKGROUNDS) + list(TONES) + [p for p in PANS if p != "none"]
    seen: list[str] = []
    for w in words:
        if w not in seen:
            seen.append(w)
    return seen


def clip_truths(spec: SpecBatch, num_frames: int = 16) -> list[ClipTruth]:
    """Ground truth records (names, per-frame centres and scales) of every clip in the batch."""
    centres, scales = trajectories(spec.to("cpu"), num_frames)
    prompts = spec_prompts(spec)
    cpu = spec.to("cpu")
    out = []
    for i, prompt in enumerate(prompts):
        objs = [
            ObjectTruth(
                colour=COLOUR_NAMES[int(cpu.colour[i, k])],
                shape=SHAPES[int(cpu.shape[i, k])],
                texture=TEXTURES[int(cpu.texture[i, k])],
                path=PATH_NAMES[int(cpu.path[i, k])],
                centres=centres[i, k].clone(),
                scales=scales[i, k].clone(),
                radius=float(cpu.radius[i, k]),
            )
            for k in range(cpu.colour.shape[1])
            if bool(cpu.present[i, k])
        ]
        out.append(
            ClipTruth(prompt, objs, BACKGROUNDS[int(cpu.background[i])], TONES[int(cpu.tone[i])], PANS[int(cpu.pan[i])])
        )
    return out


HELDOUT_SEED = 20261122
HELDOUT_SINGLE = 48
HELDOUT_DOUBLE = 16


def heldout_specs() -> SpecBatch:
    """The fixed held-out evaluation set: 48 one-object and 16 two-object clips (64 distinct prompts).

    Drawn from a seed that training never uses; training excludes these exact prompts (`heldout_prompts`).
    """
    g = torch.Generator().manual_seed(HELDOUT_SEED)
    singles = sample_specs(4 * HELDOUT_SINGLE, g, two_object_prob=0.0)
    doubles = sample_specs(4 * HELDOUT_DOUBLE, g, two_object_prob=1.0)
    picked = []
    for batch, want in ((singles, HELDOUT_SINGLE), (doubles, HELDOUT_DOUBLE)):
        seen: set[str] = set()
        keep = []
        # Balance paths across the set: cycle through path indices of the first object.
        prompts = spec_prompts(batch)
        paths = batch.path[:, 0].tolist()
        for target in range(4 * want):
            if len(keep) == want:
                break
            want_path = target % len(PATHS)
            for i, p in enumerate(prompts):
                if p not in seen and paths[i] == want_path and i not in keep:
                    seen.add(p)
                    keep.append(i)
                    break
        picked.append(batch.index(keep))
    return SpecBatch.cat(picked)


def heldout_prompts() -> frozenset[str]:
    """Prompts of the held-out evaluation set (excluded from training)."""
    return frozenset(spec_prompts(heldout_specs()))


def make_clip(seed: int, num_frames: int = 16, size: int = 64, device: str = "cpu") -> tuple[torch.Tensor, ClipTruth]:
    """One clip from an integer seed: video [3, F, H, W] in [-1, 1] and its ground truth."""
    spec = sample_specs(1, torch.Generator().manual_seed(seed), size=size)
    return render(spec.to(device), num_frames, size)[0], clip_truths(spec, num_frames)[0]
