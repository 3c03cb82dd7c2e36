"""Running a transformer's whole token sequence in a method's order (`SparseMethod.model_order`).

A method whose plans apply one token order to q, k and v in every layer (window3d's tile-major order)
would otherwise gather q, k and v into that order and scatter the output back in every attention call
(four passes over the activations per layer). When everything else in the transformer is token-wise
(norms, MLPs, cross-attention queries, per-token modulation) the sequence can instead be reordered once
per forward: after the patch embedding and the RoPE table, back before the output is unpatchified.

An adapter declares where that happens as `ReorderPoint`s on named submodules; `install` puts a Diffusers
hook on each. Every hook reads the order of the current forward from the `StepTracker`
(`tracker.token_order`, set by the tracking hook before anything else runs; None = leave the tensors as
they are), so a forward that runs without an order (context parallelism, a method without one) is
untouched.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from diffusers.hooks import HookRegistry, ModelHook

Tensor = torch.Tensor
HOOK_NAME = "dit_sparse_token_order"


@dataclass(frozen=True)
class ReorderPoint:
    """One place where a transformer's sequence enters or leaves the method's order.

    module: dotted path of the submodule (e.g. "patch_embedding").
    edit: "output" (the submodule's output is rewritten) or "input" (its (args, kwargs) are).
    fn: (value, order, inverse) -> value, with `order` int64 [S] (position -> the model's own token index)
        and `inverse` its inverse; value is the output, or the (args, kwargs) pair for "input".
    """

    module: str
    edit: str
    fn: Callable[[Any, Tensor, Tensor], Any]

    def __post_init__(self) -> None:
        if self.edit not in ("input", "output"):
            raise ValueError(f"ReorderPoint.edit must be 'input' or 'output', got {self.edit!r}")


class _ReorderHook(ModelHook):
    def __init__(self, point: ReorderPoint, tracker: Any) -> None:
        super().__init__()
        self.point = point
        self.tracker = tracker

    def pre_forward(self, module: torch.nn.Module, *args, **kwargs):
        order = self.tracker.token_order
        if order is None or self.point.edit != "input":
            return args, kwargs
        return self.point.fn((args, kwargs), *order)

    def post_forward(self, module: torch.nn.Module, output: Any) -> Any:
        order = self.tracker.token_order
        if order is None or self.point.edit != "output":
            return output
        return self.point.fn(output, *order)


def install(model: torch.nn.Module, points: tuple[ReorderPoint, ...], tracker: Any) -> Callable[[], None]:
    """Hook every point of `model`; returns the function that removes them all again."""
    modules = dict(model.named_modules())
    missing = [p.module for p in points if p.module not in modules]
    if missing:
        raise ValueError(f"{type(model).__name__} has no submodule(s) {missing} to reorder tokens at")
    registries = []
    try:
        for point in points:
            registry = HookRegistry.check_if_exists_or_initialize(modules[point.module])
            registry.register_hook(_ReorderHook(point, tracker), HOOK_NAME)
            registries.append(registry)
    except Exception:
        for registry in registries:
            registry.remove_hook(HOOK_NAME, recurse=False)
        raise

    def remove() -> None:
        for registry in registries:
            if registry.get_hook(HOOK_NAME) is not None:
                registry.remove_hook(HOOK_NAME, recurse=False)

    return remove


# ---------------------------------------------------------------------- a helper for adapters
def back_along(dim: int) -> Callable[[Tensor, Tensor, Tensor], Tensor]:
    """A point function taking a tensor's `dim` back to the model's own order."""
    return lambda x, order, inverse: x.index_select(dim, inverse)
