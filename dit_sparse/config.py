"""Validated configuration shared by every sparse-attention method.

`sparsity` always means the fraction of query-key pairs that are *skipped* (0 = dense attention,
0.9 = at most 10% of pairs computed) in the steps and layers where a method is active. Peers use the
word for density; we do not.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any


class ConfigError(ValueError):
    """A configuration value is out of range; the message says what is allowed."""


def check_sparsity(sparsity: float) -> float:
    """Return `sparsity` as a float, or raise `ConfigError` unless it lies in [0, 1)."""
    try:
        value = float(sparsity)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"sparsity must be a number in [0, 1), got {sparsity!r}") from exc
    if not (0.0 <= value < 1.0) or math.isnan(value):
        raise ConfigError(
            f"sparsity must lie in [0, 1): 0 means dense attention, 0.9 skips 90% of query-key pairs; "
            f"got {sparsity!r}"
        )
    return value


@dataclass(frozen=True)
class WarmupConfig:
    """Dense warm-up shared by all methods: early steps and early layers run dense attention.

    `steps` is a fraction of the denoising steps in [0, 1] (0.2 = first 20% dense) when the total number
    of steps is known, else an absolute count if >= 1. `layers` is the number of leading attention layers
    that always stay dense.
    """

    steps: float = 0.2
    layers: int = 1

    def __post_init__(self) -> None:
        if not isinstance(self.steps, (int, float)) or self.steps < 0 or math.isnan(self.steps):
            raise ConfigError(
                f"warmup steps must be a fraction in [0, 1] or a step count >= 1, got {self.steps!r}"
            )
        if not isinstance(self.layers, int) or self.layers < 0:
            raise ConfigError(f"warmup layers must be an integer >= 0, got {self.layers!r}")

    def dense_steps(self, num_steps: int | None) -> int:
        """Number of leading steps that run dense, given the total (None when unknown)."""
        if self.steps >= 1:
            return int(self.steps)
        if num_steps is None:
            return 0
        return int(math.ceil(self.steps * num_steps - 1e-9))

    def is_dense(self, step: int, num_steps: int | None, layer: int) -> bool:
        """True when (step, layer) falls inside the dense warm-up."""
        return layer < self.layers or step < self.dense_steps(num_steps)


@dataclass(frozen=True)
class SparseConfig:
    """What `dit_sparse.apply` was asked for: the method, the target sparsity, the warm-up.

    `options` holds the method's own validated config dataclass (see each method's `Config`).
    """

    method: str = "semantic"
    sparsity: float = 0.9
    warmup: WarmupConfig = field(default_factory=WarmupConfig)
    options: Any = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "sparsity", check_sparsity(self.sparsity))
        if not isinstance(self.method, str) or not self.method:
            raise ConfigError(f"method must be a non-empty string, got {self.method!r}")

    @property
    def is_dense(self) -> bool:
        return self.sparsity == 0.0 or self.method == "dense"
