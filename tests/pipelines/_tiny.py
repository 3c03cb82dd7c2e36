"""Helpers shared by the adapter tests: tiny random models built from configs, run on the CPU."""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
from dit_sparse.pipelines.families import get_adapter

import dit_sparse


def randn(g: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=g)


def seeded_model(build: Callable[[], torch.nn.Module]) -> torch.nn.Module:
    """`build()` with the same random weights every time, in eval mode."""
    torch.manual_seed(0)
    return build().eval()


def run(model, inputs) -> torch.Tensor:
    """The model's first output, without gradients."""
    with torch.no_grad():
        return model(**inputs)[0]


def processors(model) -> dict[str, object]:
    """Every attention processor of the model by module name (Mochi's attention has no set_processor)."""
    return {name: m.processor for name, m in model.named_modules() if hasattr(m, "processor")}


def sparse_names(model) -> set[str]:
    return {name for name, _ in get_adapter(model).self_attention_modules(model)}


def fail_on_fallback() -> None:
    """Inside `warnings.catch_warnings()`: a dense fallback (dit-sparse warns once per reason) fails the test.

    Only dit-sparse's warnings: Mochi's RoPE warns about CPU autocast on every forward.
    """
    warnings.filterwarnings("error", message="dit-sparse")


def apply_full(model, warmup_layers: int = 0):
    return dit_sparse.apply(model, "full", 0.5, warmup_steps=0, warmup_layers=warmup_layers, block_size=16)
