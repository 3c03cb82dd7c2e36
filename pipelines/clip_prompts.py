"""The text side of procedural clips: each clip's prompt, and every word a prompt can contain."""

from __future__ import annotations

from .clip_spec import BACKGROUNDS, COLOUR_NAMES, PANS, PATH_NAMES, PATHS, SHAPES, TEXTURES, TONES, SpecBatch


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
