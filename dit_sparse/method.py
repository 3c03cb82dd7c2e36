"""The `SparseMethod` interface and the one registry of methods.

A method turns (q, k, v, context) into a `BlockPlan` (or None for "run dense"); it never calls a
kernel. Methods may observe the executor's result (LSE, tile statistics) to update caches, and may look
at dense warm-up calls to warm their caches. Wrapper methods (e.g. `TileSkipCache`) refine the plan of
a base method, which is how methods compose: ``method="semantic+skip"``.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Callable
from typing import Any, ClassVar

import torch

from dit_sparse.kernels.result import AttentionResult

from .config import ConfigError
from .context import AttentionContext
from .graphs import PlanGraphs
from .layout import VideoLayout
from .plan import BlockPlan

Tensor = torch.Tensor


@dataclasses.dataclass(frozen=True)
class NoOptions:
    """Methods without options."""


class SparseMethod:
    """Base class. Subclasses set `name`, `Config` (a frozen dataclass) and implement `plan`."""

    name: ClassVar[str] = ""
    Config: ClassVar[type] = NoOptions
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

    @property
    def wants_lse(self) -> bool:
        return self.needs_lse or (self.base is not None and self.base.wants_lse)

    @property
    def wants_tile_stats(self) -> bool:
        return self.needs_tile_stats or (self.base is not None and self.base.wants_tile_stats)

    def plan(self, q: Tensor, k: Tensor, v: Tensor, ctx: AttentionContext) -> BlockPlan | None:
        """Plan for q, k, v of shape [B, H, S, D] (views in the processor's layout); None = dense."""
        raise NotImplementedError

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


def reuse_plan(ctx: AttentionContext, key: str, signature: Any, every: int,
               build: Callable[[], BlockPlan | None]) -> BlockPlan | None:
    """Return the plan cached in ctx.state under `key` if it was built fewer than `every` denoising steps
    ago for the same input `signature`; otherwise build, cache and return a new one.

    Returning the *same* plan object also lets the kernels reuse their per-plan preparation, so the
    steps in between cost only the attention itself.
    """
    cached = ctx.state.get(key)
    if cached is not None and cached[0] == signature and 0 <= ctx.step - cached[1] < every:
        return cached[2]
    plan = build()
    ctx.state[key] = (signature, ctx.step, plan)
    return plan


_METHODS: dict[str, type[SparseMethod]] = {}


def register_method(cls: type[SparseMethod]) -> type[SparseMethod]:
    """Class decorator adding a method to the registry under `cls.name`."""
    if not cls.name:
        raise ValueError("a SparseMethod subclass needs a non-empty `name`")
    _METHODS[cls.name] = cls
    return cls


def available_methods() -> list[str]:
    _load_builtin_methods()
    return sorted(_METHODS)


def _load_builtin_methods() -> None:
    # Imported lazily so that `dit_sparse.method` has no import cycle with the methods.
    from . import dense  # noqa: F401
    for mod in ("semantic", "pooled", "patterns3d", "tile_skip"):
        try:
            __import__(f"dit_sparse.{mod}")
        except ModuleNotFoundError as exc:  # a method not built yet is simply not registered
            if exc.name != f"dit_sparse.{mod}":
                raise


def method_class(name: str) -> type[SparseMethod]:
    _load_builtin_methods()
    if name not in _METHODS:
        raise ConfigError(f"unknown method {name!r}; available: {sorted(_METHODS)}")
    return _METHODS[name]


def split_method_options(spec: str) -> tuple[str, dict[str, Any]]:
    """'semantic[replan_every=5,top_p=0.95]' -> ("semantic", {"replan_every": 5, "top_p": 0.95}).

    Values are JSON when they parse as JSON (numbers, true/false, lists), strings otherwise.
    """
    if "[" not in spec:
        return spec, {}
    if not spec.endswith("]"):
        raise ConfigError(f"method spec {spec!r}: options go in brackets at the end, e.g. 'semantic[top_p=0.95]'")
    name, rest = spec[:-1].split("[", 1)
    opts: dict[str, Any] = {}
    for item in filter(None, (x.strip() for x in rest.split(","))):
        if "=" not in item:
            raise ConfigError(f"method spec {spec!r}: expected KEY=VALUE, got {item!r}")
        key, raw = item.split("=", 1)
        try:
            opts[key.strip()] = json.loads(raw)
        except json.JSONDecodeError:
            opts[key.strip()] = raw
    return name, opts


def split_method_list(text: str) -> list[str]:
    """'semantic[a=1,b=2],pooled' -> ['semantic[a=1,b=2]', 'pooled'] (commas inside brackets kept)."""
    return [m.strip() for m in re.split(r",(?![^\[]*\])", text) if m.strip()]


def parse_method(spec: str) -> list[type[SparseMethod]]:
    """'semantic+skip' -> [SemanticPermutation, TileSkipCache] (base first, then wrappers)."""
    classes = [method_class(part.strip()) for part in spec.split("+")]
    for i, cls in enumerate(classes):
        if (i == 0) == cls.wraps:
            raise ConfigError(
                f"in method {spec!r}, {cls.name!r} "
                + ("refines another method and cannot come first" if cls.wraps else "must come first")
            )
    return classes


def build_method(spec: str, sparsity: float, options: dict[str, Any]) -> tuple[SparseMethod, list[Any]]:
    """Instantiate the method chain of `spec`, dealing each option to the config that declares it."""
    classes = parse_method(spec)
    remaining = dict(options)
    configs = []
    for cls in classes:
        names = {f.name for f in dataclasses.fields(cls.Config)}
        mine = {k: remaining.pop(k) for k in list(remaining) if k in names}
        try:
            configs.append(cls.Config(**mine))
        except TypeError as exc:
            raise ConfigError(f"bad options for method {cls.name!r}: {exc}") from exc
    if remaining:
        allowed = sorted({f.name for cls in classes for f in dataclasses.fields(cls.Config)})
        raise ConfigError(f"unknown option(s) {sorted(remaining)} for method {spec!r}; allowed: {allowed}")
    method: SparseMethod | None = None
    for cls, cfg in zip(classes, configs):
        method = cls(sparsity, cfg, base=method) if cls.wraps else cls(sparsity, cfg)
    assert method is not None
    return method, configs
