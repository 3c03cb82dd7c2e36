"""Timed generations with a method applied: shared by `dit-sparse generate` and `dit-sparse eval`."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from dit_sparse.kernels import check_backend

import dit_sparse
from dit_sparse.config import ConfigError, WarmupConfig, check_sparsity
from dit_sparse.methods import build_method, split_method_options

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
    """What every generation of a command shares; validated on construction (ConfigError / ValueError)
    so that the CLI rejects bad values before it loads a model."""

    steps: int = 30
    warmup_steps: float = 0.2
    warmup_layers: int = 1
    backend: str = "auto"
    options: tuple[tuple[str, Any], ...] = ()  # method options, e.g. (("tol", 0.05),)

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ConfigError(f"--steps must be >= 1, got {self.steps}")
        try:
            WarmupConfig(steps=self.warmup_steps, layers=self.warmup_layers)  # the checks `apply` runs later
        except ConfigError as exc:  # name the command-line flags the values came from
            raise ConfigError(f"--warmup / --warmup-layers: {exc}") from exc
        check_backend(self.backend)


def method_options(method: str, settings: RunSettings) -> tuple[str, dict[str, Any]]:
    """The method name and the options `apply` gets: the spec's bracket options over `--opt` ones
    (dense takes none: `--opt` is meant for the sparse methods a command compares with it)."""
    name, opts = split_method_options(method)
    if name != "dense":
        opts = {**dict(settings.options), **opts}
    return name, opts


def check_run(method: str, sparsity: float, settings: RunSettings, device: torch.device,
              dtype: torch.dtype | None) -> None:
    """Raise ConfigError / ValueError for a method, option, sparsity or backend/device/dtype combination
    that cannot run, without a model: call it before loading one. (`dtype` None: not known yet.)"""
    check_sparsity(sparsity)
    name, opts = method_options(method, settings)
    build_method(name, sparsity, opts)
    check_backend(settings.backend, device, dtype)


def check_applies(loaded: LoadedModel, method: str, sparsity: float, settings: RunSettings) -> None:
    """Apply `method` to the loaded model and remove it again: model-dependent checks (supported model,
    a calibration file's model and layers) fail here, after loading but before any generation."""
    name, opts = method_options(method, settings)
    dit_sparse.apply(loaded.pipe, name, sparsity, warmup_steps=settings.warmup_steps,
                     warmup_layers=settings.warmup_layers, num_steps=settings.steps,
                     backend=settings.backend, **opts).remove()


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


def warm_steps(settings: RunSettings, device: torch.device, through_sparse: bool) -> int:
    """Steps of the untimed warm run: 1 on CPUs (nothing to compile); on GPUs 2, or with `through_sparse`
    the dense warm-up steps plus two sparse ones (at most the generation's steps)."""
    if device.type != "cuda":
        return 1
    if not through_sparse:
        return 2
    dense = WarmupConfig(steps=settings.warmup_steps, layers=settings.warmup_layers).dense_steps(settings.steps)
    return min(settings.steps, max(2, dense + 2))


def timed_generation(loaded: LoadedModel, prompt: str, seed: int, device: torch.device, method: str,
                     sparsity: float, settings: RunSettings, warm_run: bool = True,
                     warm_sparse: bool = False) -> RunResult:
    """Generate once with `method` applied; `warm_run` first runs a short generation so compilation,
    autotuning and first-call costs stay out of the timings. On GPUs that run is 2 steps, or with
    `warm_sparse` (for comparisons with dense; dense generations keep 2) long enough to reach two sparse
    steps: the dense warm-up steps alone never compile or load the sparse kernels nor record their CUDA
    graphs, which then landed in the timed run (one-time costs of the process, not of a generation)."""
    from dit_sparse.eval.timing import AttentionTimer

    name, opts = method_options(method, settings)
    handle = dit_sparse.apply(loaded.pipe, name, sparsity, warmup_steps=settings.warmup_steps,
                              warmup_layers=settings.warmup_layers, num_steps=settings.steps,
                              backend=settings.backend, **opts)
    timer = AttentionTimer(device)
    for expert in handle.experts.values():  # Wan 2.2 A14B: both experts' attention is timed
        expert.core.timer = timer.section
    try:
        if warm_run:
            loaded.call(prompt, warm_steps(settings, device, warm_sparse and not handle.config.is_dense), seed)
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
