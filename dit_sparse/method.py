"""The `SparseMethod` interface, the registry methods add themselves to, and `ReusedPlan`.

A method turns (q, k, v, context) into a `BlockPlan` (or None for "run dense"); it never calls a
kernel. Methods may observe the executor's result (LSE, tile statistics) to update caches, and may look
at dense warm-up calls to warm their caches; what they keep between calls is their typed `State`, one per
(layer, CFG branch) (`dit_sparse.state`). Wrapper methods (e.g. `SkipCache`) refine the plan of a base
method, which is how methods compose: ``method="semantic+skip"``. The built-in methods and the parsing
of method specs live in `dit_sparse.methods`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, ClassVar

import torch

from dit_sparse.kernels.result import AttentionResult

from .config import ConfigError
from .context import AttentionContext
from .graphs import PlanGraphs
from .layout import VideoLayout
from .plan import BlockPlan
from .state import LayerState, NoState

Tensor = torch.Tensor


@dataclasses.dataclass(frozen=True)
class NoOptions:
    """Methods without options."""


class SparseMethod:
    """Base class. Subclasses set `name`, `Config` (a frozen dataclass), `State` (a `LayerState` dataclass,
    if they keep anything between calls) and implement `plan`."""

    name: ClassVar[str] = ""
    Config: ClassVar[type] = NoOptions
    State: ClassVar[type[LayerState]] = NoState
    wraps: ClassVar[bool] = False  # True for methods that refine another method's plan
    needs_lse: ClassVar[bool] = False
    needs_tile_stats: ClassVar[bool] = False

    def __init__(self, sparsity: float, options: Any, base: SparseMethod | None = None) -> None:
        self.sparsity = sparsity
        self.options = options
        self.base = base
        self.graphs = PlanGraphs()  # CUDA graphs of this method's planning functions (dit_sparse.graphs)
        if self.wraps and base is None:
            raise ConfigError(f"method {self.name!r} refines another method: use e.g. 'semantic+{self.name}'")

    def state_of(self, ctx: AttentionContext) -> Any:
        """This method's `State` for the (layer, CFG branch) of `ctx` (created on first use)."""
        return ctx.states.of(self)

    @property
    def wants_lse(self) -> bool:
        return self.needs_lse or (self.base is not None and self.base.wants_lse)

    @property
    def wants_tile_stats(self) -> bool:
        return self.needs_tile_stats or (self.base is not None and self.base.wants_tile_stats)

    def plan(self, q: Tensor, k: Tensor, v: Tensor, ctx: AttentionContext) -> BlockPlan | None:
        """Plan for q, k, v of shape [B, H, S, D] (views in the processor's layout); None = dense."""
        raise NotImplementedError

    def has_model_order(self) -> bool:
        """Whether `model_order` can return an order (adapters install their reorder hooks only then)."""
        return self.base.has_model_order() if self.base is not None else False

    def model_order(self, layout: VideoLayout, device: torch.device) -> tuple[Tensor, Tensor] | None:
        """(order, inverse), or None: a token order (int64 [S] on `device`, position -> token index; the
        same tensor objects on every call) that every layer's plan for `layout` applies to q, k and v alike.

        When a method has one, adapters that can (Wan) reorder the model's whole sequence once per forward
        (after the patch embedding and RoPE table, back before the output projection) and the plans then
        carry no permutation: no gather of q, k, v and scatter of the output in every layer. Everything
        else in such a transformer is token-wise, so its output is unchanged. The calls then see
        `ctx.token_order` set to `order`.
        """
        return self.base.model_order(layout, device) if self.base is not None else None

    def stats_wanted(self, ctx: AttentionContext) -> tuple[bool, bool]:
        """(LSE, tile statistics) this call's result must carry, asked after `plan`; the backend is chosen
        to provide them. Default: what the method (chain) ever needs."""
        return self.wants_lse, self.wants_tile_stats

    def observe(self, ctx: AttentionContext, plan: BlockPlan, result: AttentionResult) -> None:
        """See the result of executing `plan` (LSE / tile stats when requested)."""
        if self.base is not None:
            self.base.observe(ctx, plan, result)

    def warmup(self, q: Tensor, k: Tensor, v: Tensor, ctx: AttentionContext) -> None:
        """Called instead of `plan` on dense warm-up calls (e.g. to warm a clustering cache)."""
        if self.base is not None:
            self.base.warmup(q, k, v, ctx)


@dataclasses.dataclass
class ReusedPlan:
    """A plan kept for up to `every` denoising steps of the same input signature (a `State` field).

    Returning the *same* plan object also lets the kernels reuse their per-plan preparation, so the
    steps in between cost only the attention itself.
    """

    signature: Any = None  # None until the first plan is built (signatures are tuples)
    step: int = 0
    plan: BlockPlan | None = None

    def get(self, signature: Any, step: int, every: int, build: Callable[[], BlockPlan | None]
            ) -> BlockPlan | None:
        """The kept plan if it was built fewer than `every` steps before `step` for `signature`; otherwise
        a new one from `build()`, kept and returned."""
        if self.signature is not None and self.signature == signature and 0 <= step - self.step < every:
            return self.plan
        self.signature, self.step, self.plan = signature, step, build()
        return self.plan


_METHODS: dict[str, type[SparseMethod]] = {}


def register_method(cls: type[SparseMethod]) -> type[SparseMethod]:
    """Class decorator adding a method to the registry under `cls.name`."""
    if not cls.name:
        raise ValueError("a SparseMethod subclass needs a non-empty `name`")
    _METHODS[cls.name] = cls
    return cls


def registered_methods() -> dict[str, type[SparseMethod]]:
    """Name -> class of every registered method (the built-ins once `dit_sparse.methods` is imported)."""
    return dict(_METHODS)
