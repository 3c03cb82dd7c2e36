"""Offline per-head search for "window3d": one dense generation scores every window and radial pattern
that fits the budget, per (layer, head); the best are saved as a head_config file (`HeadAssignment`)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from dit_sparse.api import apply
from dit_sparse.config import ConfigError

from .head_search import HeadAssignment
from .patterns import TilePattern
from .tiling import Tile, VideoTiling


def assignment_from_calibration(calibration: dict[str, dict[str, Any]], sparsity: float,
                                model_family: str | None) -> HeadAssignment:
    """Best pattern per (layer, head) from the error sums a calibrating "window3d" method collected."""
    if not calibration:
        raise ConfigError(
            "the head search saw no sparse-eligible self-attention call: check that `run` calls the model "
            "and that its video grid is known"
        )
    heads: dict[str, list[TilePattern]] = {}
    errors: dict[str, list[float]] = {}
    tiling: VideoTiling | None = None
    for name, entry in calibration.items():
        tiling = entry["tiling"]
        mean = entry["err"] / entry["calls"]  # [H, P]
        best = mean.argmin(-1)
        heads[name] = [entry["candidates"][int(i)] for i in best]
        errors[name] = [float(mean[h, int(i)]) for h, i in enumerate(best)]
    assert tiling is not None
    L = tiling.layout
    return HeadAssignment(model_family, (L.frames, L.rows, L.cols), tiling.tile, float(sparsity), heads,
                          L.text_tokens, errors, tiling.block)


def search_heads(target: Any, run: Callable[[], Any], sparsity: float, *, tile: Tile | str = "auto",
                 block: int | None = None, sample_rows: int = 256, first_frame_sink: bool = False,
                 path: str | Path | None = None, seed: int = 0) -> HeadAssignment:
    """Offline per-head search on one dense generation.

    Applies "window3d" in calibrate mode to `target` (a pipeline or transformer), calls `run()` (which must
    run the model, e.g. ``lambda: pipe(prompt, num_inference_steps=10)``), and for every layer and head keeps
    the window or radial pattern of density <= 1 - sparsity with the lowest mean error against dense
    attention. Attention stays dense during the search. Saves to `path` when given.
    """
    handle = apply(
        target, "window3d", sparsity, warmup_steps=0, warmup_layers=0, calibrate=True, tile=tile, block=block,
        sample_rows=sample_rows, first_frame_sink=first_frame_sink, seed=seed,
    )
    try:
        with torch.no_grad():
            run()
        calibration = handle.method.calibration
    finally:
        handle.remove()
    result = assignment_from_calibration(calibration, sparsity, getattr(handle.adapter, "family", None))
    if path is not None:
        result.save(path)
    return result
