"""Timed generations with a method applied: shared by `dit-sparse generate` and `dit-sparse eval`."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

import dit_sparse
from dit_sparse.method import split_method_options

from .loading import LoadedModel


@dataclass
class RunResult:
    """Frames of one generation, its timings and what sparse attention skipped."""

    frames: np.ndarray
    total_s: float
    attention_s: float | None
    stats: dict


@dataclass(frozen=True)
class RunSettings:
    steps: int = 30
    warmup_steps: float = 0.2
    warmup_layers: int = 1
    backend: str = "auto"
    options: tuple[tuple[str, Any], ...] = ()  # method options, e.g. (("tol", 0.05),)


def parse_options(items: list[str]) -> tuple[tuple[str, Any], ...]:
    """['tol=0.05', 'block=128', 'pattern=window'] -> (("tol", 0.05), ("block", 128), ("pattern", "window"))."""
    out = []
    for item in items:
        if "=" not in item:
            raise ValueError(f"--opt expects KEY=VALUE, got {item!r}")
        key, raw = item.split("=", 1)
        try:
            value: Any = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        out.append((key.strip(), value))
    return tuple(out)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_generation(loaded: LoadedModel, prompt: str, seed: int, device: torch.device, method: str,
                     sparsity: float, settings: RunSettings, warm_run: bool = True) -> RunResult:
    """Generate once with `method` applied; `warm_run` first runs a short generation so compilation,
    autotuning and first-call costs stay out of the timings."""
    from dit_sparse.eval.timing import AttentionTimer

    name, opts = split_method_options(method)
    if name != "dense":
        opts = {**dict(settings.options), **opts}
    handle = dit_sparse.apply(loaded.pipe, name, sparsity, warmup_steps=settings.warmup_steps,
                              warmup_layers=settings.warmup_layers, num_steps=settings.steps,
                              backend=settings.backend, **opts)
    timer = AttentionTimer(device)
    handle.core.timer = timer.section
    try:
        if warm_run:
            loaded.call(prompt, 2 if device.type == "cuda" else 1, seed)
            handle.reset()
        timer.reset()
        _sync(device)
        t0 = time.perf_counter()
        frames = loaded.call(prompt, settings.steps, seed)
        _sync(device)
        total = time.perf_counter() - t0
        return RunResult(frames, total, timer.total_s("attention"), handle.stats())
    finally:
        handle.remove()
