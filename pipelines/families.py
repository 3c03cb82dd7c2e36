"""The built-in model families, and the adapter of a model.

Importing this module registers every built-in adapter (one module per family); `get_adapter` picks the
one whose `transformer_classes` names the model's class.
"""

from __future__ import annotations

import torch

from . import (  # noqa: F401  (imported to register their adapters; no two claim one class)
    chronoedit,
    cogvideox,
    cosmos,
    flux,
    flux2,
    hunyuan_video,
    hunyuan_video15,
    ltx2,
    ltx_video,
    mochi,
    qwen_image,
    skyreels_v2,
    wan,
    wan_animate,
)
from .adapters import ModelAdapter, UnsupportedModelError, registered_adapters


def supported_models() -> list[str]:
    """Transformer class names that dit-sparse supports."""
    return [name for cls in registered_adapters() for name in cls.transformer_classes]


def get_adapter(model: torch.nn.Module) -> ModelAdapter:
    """The adapter for `model`'s class, or UnsupportedModelError naming the supported ones."""
    name = type(model).__name__
    for cls in registered_adapters():
        if name in cls.transformer_classes:
            return cls()
    raise UnsupportedModelError(
        f"dit-sparse does not support {name}; supported transformers: {', '.join(supported_models())}"
    )
