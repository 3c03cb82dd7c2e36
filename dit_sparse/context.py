"""`AttentionContext`: what a method knows about the attention call it is planning for."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .layout import VideoLayout
from .state import LayerStates

Tensor = torch.Tensor


@dataclass
class AttentionContext:
    """Position of one attention call in the model and in the denoising loop.

    `states` holds the typed state of every method of the chain for this (layer, CFG branch): it survives
    across denoising steps and is dropped between generations; a method reads its own with
    `method.state_of(ctx)` (centroids, skip lists, plans), so the cond and uncond branches never share one.

    `token_order` is None when q, k and v come in the model's own token order. Otherwise the adapter runs
    the whole transformer in the order its method asked for (`SparseMethod.model_order`): int64 [S] on the
    device, position in this call -> the model's own token index. `layout` still describes the model's own
    order.
    """

    layer: int
    layer_name: str
    num_layers: int
    step: int
    num_steps: int | None
    branch: str
    layout: VideoLayout | None
    sparsity: float
    states: LayerStates = field(default_factory=LayerStates)
    model_family: str | None = None  # the adapter's family ("wan", "flux", ...), for saved per-model configs
    token_order: Tensor | None = None
