"""Procedural text-to-video data: coloured shapes moving along described paths over textured backgrounds.

Every clip is a pure function of a small attribute record (`SpecBatch`), which is sampled on the CPU from a
seeded `torch.Generator` and rendered in one batched pass on any device. Rendering contains no randomness,
so a seed fixes the clip bit-for-bit on a given device, and the record is the exact ground truth: colour,
shape, texture and path of each object plus its per-frame centre and scale.

Design choices that make the task learnable by a small DiT in minutes (see docs/reference-model-notes.md):
objects are large (16-22 px on a 64 px canvas), saturated, and travel far (34 px per axis move) at constant
speed; backgrounds are grey so an object's hue alone identifies it; a clip holds at most two objects of
different colours.

This module samples clip specs, spells out their ground truth and fixes the held-out evaluation set; the
pieces live beside it: `clip_spec` (vocabularies, `SpecBatch`, truth records), `clip_motion` (paths and
pans), `clip_render` (`render`) and `clip_prompts` (`spec_prompts`, `vocabulary`).
"""

from __future__ import annotations

import math

import torch

from .clip_motion import place_starts, trajectories
from .clip_prompts import spec_prompts
from .clip_render import CLIP_FRAMES, CLIP_SIZE, render
from .clip_spec import (
    BACKGROUNDS,
    COLOUR_NAMES,
    COLOURS,
    MAX_OBJECTS,
    PANS,
    PATH_NAMES,
    PATHS,
    RADIUS_RANGE,
    SHAPES,
    TEXTURES,
    TONES,
    ClipTruth,
    ObjectTruth,
    SpecBatch,
)


def _uniform(n: int, lo: float, hi: float, gen: torch.Generator, shape: tuple[int, ...] = ()) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand((n, *shape), generator=gen)


def sample_specs(
    n: int,
    generator: torch.Generator,
    *,
    two_object_prob: float = 0.3,
    pan_prob: float = 0.25,
    size: int = CLIP_SIZE,
    exclude_prompts: set[str] | frozenset[str] | None = None,
    paths: tuple[str, ...] | None = None,
    textures: tuple[str, ...] | None = None,
) -> SpecBatch:
    """Draw `n` clip specs on the CPU from `generator` (deterministic for a given generator state).

    Clips whose prompt is in `exclude_prompts` (the held-out evaluation prompts) get a different path, so
    those exact prompts never occur in training. `paths` / `textures` restrict the draw to those names (a
    training curriculum's easy clips); None draws from all of them.
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
    texture = _draw(TEXTURES, textures, (n, k), g)
    path = _draw(PATH_NAMES, paths, (n, k), g)
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
        spec.start = place_starts(spec, u, size)
        centres, _ = trajectories(spec, 16)
        gap = (centres[:, 0] - centres[:, 1]).norm(dim=-1).amin(dim=-1)
        better = gap > best_gap
        best[better], best_gap[better] = cand[better], gap[better]
    u[:, 1] = best
    spec.start = place_starts(spec, u, size)
    if exclude_prompts:
        prompts = spec_prompts(spec)
        for i, p in enumerate(prompts):
            # Rotating the first object's path changes the prompt; a few rotations always leave the set.
            while p in exclude_prompts:
                spec.path[i, 0] = (spec.path[i, 0] + 1) % len(PATHS)
                spec.start[i] = place_starts(spec.index([i]), u[i : i + 1], size)[0]
                p = spec_prompts(spec.index([i]))[0]
    return spec


def _draw(names: tuple[str, ...], allowed: tuple[str, ...] | None, shape: tuple[int, ...],
          g: torch.Generator) -> torch.Tensor:
    """Indices into `names`, uniform over `allowed` (all names when None)."""
    if allowed is None:
        return torch.randint(len(names), shape, generator=g)
    unknown = [a for a in allowed if a not in names]
    if not allowed or unknown:
        raise ValueError(f"allowed names must be a non-empty subset of {names}, got {allowed}")
    idx = torch.tensor([names.index(a) for a in allowed])
    return idx[torch.randint(len(idx), shape, generator=g)]


def clip_truths(spec: SpecBatch, num_frames: int = CLIP_FRAMES) -> list[ClipTruth]:
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


def make_clip(seed: int, num_frames: int = CLIP_FRAMES, size: int = CLIP_SIZE, device: str = "cpu") -> tuple[torch.Tensor, ClipTruth]:
    """One clip from an integer seed: video [3, F, H, W] in [-1, 1] and its ground truth."""
    spec = sample_specs(1, torch.Generator().manual_seed(seed), size=size)
    return render(spec.to(device), num_frames, size)[0], clip_truths(spec, num_frames)[0]
