"""The built-in methods and method specs.

Importing this package registers every built-in method: "dense" and "full" (`dense`), "pooled"
(`pooled`), "semantic" (`semantic/`), "window3d" (`window3d/`) and the "skip" wrapper (`skip/`). A method
spec names a method chain with options, e.g. ``"semantic[top_p=0.95]+skip"``; `build_method` turns one into
method objects, dealing each option to the method whose config declares it.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from dit_sparse.config import ConfigError
from dit_sparse.method import SparseMethod, registered_methods

from .dense import DenseAttention, FullPlan
from .pooled import PooledBlocks
from .semantic import SemanticPermutation
from .skip import SkipCache
from .window3d import Window3D

__all__ = [
    "DenseAttention", "FullPlan", "PooledBlocks", "SemanticPermutation", "SkipCache", "Window3D",
    "available_methods", "build_method", "method_class", "method_configs", "parse_method", "split_method_list",
    "split_method_options",
]


def available_methods() -> list[str]:
    """Names of every registered method (built-ins and those registered by users)."""
    return sorted(registered_methods())


def method_class(name: str) -> type[SparseMethod]:
    """The class registered under `name` (a clear error listing the names otherwise)."""
    methods = registered_methods()
    if name not in methods:
        raise ConfigError(f"unknown method {name!r}; available: {sorted(methods)}")
    return methods[name]


def _split_outside_brackets(text: str) -> list[str]:
    """`text` cut at the commas that are not inside square brackets, each piece stripped, empty ones dropped."""
    pieces, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        depth += (ch == "[") - (ch == "]")
        if ch == "," and depth == 0:
            pieces.append(text[start:i])
            start = i + 1
    pieces.append(text[start:])
    return [p.strip() for p in pieces if p.strip()]


def split_method_options(spec: str) -> tuple[str, dict[str, Any]]:
    """'semantic[replan_every=5,top_p=0.95]' -> ("semantic", {"replan_every": 5, "top_p": 0.95}).

    Values are JSON when they parse as JSON (numbers, true/false, lists such as
    `candidates=["spatial","radial"]`), strings otherwise.
    """
    if "[" not in spec:
        return spec, {}
    if not spec.endswith("]"):
        raise ConfigError(f"method spec {spec!r}: options go in brackets at the end, e.g. 'semantic[top_p=0.95]'")
    name, rest = spec[:-1].split("[", 1)
    opts: dict[str, Any] = {}
    for item in _split_outside_brackets(rest):
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
    return _split_outside_brackets(text)


def parse_method(spec: str) -> list[type[SparseMethod]]:
    """'semantic+skip' -> [SemanticPermutation, SkipCache] (base first, then wrappers)."""
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
    configs = _configs(spec, classes, options)
    method: SparseMethod | None = None
    for cls, cfg in zip(classes, configs):
        method = cls(sparsity, cfg, base=method) if cls.wraps else cls(sparsity, cfg)
    assert method is not None
    return method, configs


def method_configs(spec: str, options: dict[str, Any]) -> list[Any]:
    """The config of every method of `spec`'s chain (base first), each option dealt to the config that
    declares it, without building the methods."""
    return _configs(spec, parse_method(spec), options)


def _configs(spec: str, classes: list[type[SparseMethod]], options: dict[str, Any]) -> list[Any]:
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
    return configs
