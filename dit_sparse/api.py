"""Public API: `apply`, `remove`, and the `sparse_attention` context manager."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from .config import ConfigError, SparseConfig, WarmupConfig, check_sparsity
from .core import SparseAttentionCore
from .methods import build_method
from .stats import SparsityStats
from .tracking import StepTracker, attach_tracker, check_detachable, detach_tracker

_HANDLE_ATTR = "_dit_sparse_handle"

# Pipeline attributes that hold a denoiser, in the order the denoising loop first uses them. Wan 2.2 A14B
# pipelines carry a second expert, `transformer_2`, for the low-noise steps (`boundary_ratio` switches).
DENOISER_ATTRS = ("transformer", "transformer_2")


def _denoisers_of(target: Any) -> list[tuple[str, torch.nn.Module]]:
    """(attribute name, module) of every denoiser of a pipeline; a bare module is its own one denoiser."""
    if isinstance(target, torch.nn.Module):
        return [("transformer", target)]
    found: list[tuple[str, torch.nn.Module]] = []
    for attr in DENOISER_ATTRS:
        model = getattr(target, attr, None)
        # The same module registered twice is one expert: its processors can be swapped only once.
        if isinstance(model, torch.nn.Module) and all(model is not m for _, m in found):
            found.append((attr, model))
    if not found:
        raise ConfigError(
            f"dit_sparse.apply expects a Diffusers pipeline with a `.transformer` or a transformer model, "
            f"got {type(target).__name__}"
        )
    return found


@dataclass
class ExpertHandle:
    """One denoiser's share of an `apply`: its processors, step tracker, method state and statistics.

    Experts share nothing at run time: Wan 2.2's high- and low-noise experts have different weights, so
    a plan, cache or head classification learnt on one would be wrong for the other.
    """

    name: str  # the pipeline attribute ("transformer", "transformer_2"); "transformer" for a bare model
    transformer: torch.nn.Module
    core: SparseAttentionCore
    adapter: Any
    originals: dict[str, tuple[torch.nn.Module, Any]]
    remove_reorder: Callable[[], None] | None = None  # undoes pipelines.reorder.install, when installed

    @property
    def method(self):
        return self.core.method

    @property
    def tracker(self) -> StepTracker:
        return self.core.tracker


class SparseHandle:
    """What `apply` returns: the live configuration, statistics, and the way back (`remove`).

    `transformer`, `core`, `adapter`, `method` and `tracker` are the first denoiser's (`pipe.transformer`
    when the pipeline has one); `experts` maps every sparsified denoiser's attribute name to its own
    `ExpertHandle`.
    """

    def __init__(self, config: SparseConfig, experts: list[ExpertHandle]) -> None:
        if not experts:
            raise ValueError("a SparseHandle needs at least one expert")
        self.config = config
        self.experts: dict[str, ExpertHandle] = {e.name: e for e in experts}
        self.active = True

    @property
    def _primary(self) -> ExpertHandle:
        return next(iter(self.experts.values()))

    @property
    def transformer(self) -> torch.nn.Module:
        return self._primary.transformer

    @property
    def core(self) -> SparseAttentionCore:
        return self._primary.core

    @property
    def adapter(self) -> Any:
        return self._primary.adapter

    @property
    def method(self):
        return self._primary.method

    @property
    def tracker(self) -> StepTracker:
        return self._primary.tracker

    def stats(self) -> dict[str, Any]:
        """Achieved sparsity and call counts since the last `reset()` (one host sync per expert).

        With one denoiser: `sparse_calls`, `dense_calls`, `fallback_calls`, `sparsity_in_sparse_calls`,
        `sparsity_overall`. With several (Wan 2.2 A14B) the same keys cover all experts together (pairs
        added up, not sparsities averaged) and `experts` maps each expert's name to its own figures.
        """
        if len(self.experts) == 1:
            return self._primary.core.stats.summary()
        combined: dict[str, Any] = SparsityStats.merged(e.core.stats for e in self.experts.values()).summary()
        combined["experts"] = {name: e.core.stats.summary() for name, e in self.experts.items()}
        return combined

    def reset(self) -> None:
        """Forget caches and statistics: the next forward starts a new generation."""
        for expert in self.experts.values():
            expert.tracker.new_generation()
            expert.core.stats.reset()

    def remove(self) -> None:
        """Restore the original processors and detach the step trackers of every expert. Idempotent."""
        if not self.active:
            return
        for expert in self.experts.values():  # all or nothing: check every expert before undoing any
            check_detachable(expert.transformer)
        for expert in self.experts.values():
            _undo(expert)
            if getattr(expert.transformer, _HANDLE_ATTR, None) is self:
                delattr(expert.transformer, _HANDLE_ATTR)
        self.active = False

    def __enter__(self) -> SparseHandle:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def __repr__(self) -> str:
        state = "active" if self.active else "removed"
        layers = sum(len(e.originals) for e in self.experts.values())
        experts = "" if len(self.experts) == 1 else f", experts={list(self.experts)}"
        return (f"SparseHandle({self.config.method!r}, sparsity={self.config.sparsity}, "
                f"layers={layers}{experts}, {state})")


def _restore(originals: dict[str, tuple[torch.nn.Module, Any]]) -> None:
    for module, processor in originals.values():
        # enable_parallelism() after apply() configured only the sparse processor: hand its config back.
        current = module.get_processor() if hasattr(module, "get_processor") else module.processor
        if getattr(current, "_parallel_config", None) is not None and hasattr(processor, "_parallel_config"):
            processor._parallel_config = current._parallel_config
        module.set_processor(processor)


def _undo(expert: ExpertHandle) -> None:
    _restore(expert.originals)
    if expert.remove_reorder is not None:
        expert.remove_reorder()
    detach_tracker(expert.transformer)


def _order_fn(method: Any, config: SparseConfig) -> Callable[..., Any]:
    """The tracking hook's choice of token order for one forward: the method's, for a sparse run on one
    device (context parallelism shards the sequence in the model's own order)."""
    def order(module: torch.nn.Module, layout: Any, args: tuple, kwargs: dict) -> Any:
        if config.is_dense or layout is None or getattr(module, "_parallel_config", None) is not None:
            return None
        x = next((t for t in (*args, *kwargs.values()) if isinstance(t, torch.Tensor)), None)
        if x is None:
            return None
        return method.model_order(layout, x.device)

    return order


def _apply_to_expert(name: str, transformer: torch.nn.Module, adapter: Any, config: SparseConfig,
                     num_steps: int | None, backend: str, reorder_tokens: bool = True) -> ExpertHandle:
    """Swap sparse processors into one denoiser, with a method object, tracker and statistics of its own."""
    from dit_sparse.pipelines.reorder import install as install_reorder

    method_obj, _ = build_method(config.method, float(config.sparsity), config.options)
    modules = list(adapter.self_attention_modules(transformer))
    link = method_obj
    while link is not None:  # methods that depend on the model (e.g. a calibration file) check it here
        if hasattr(link, "bind_model"):
            link.bind_model(transformer, [layer_name for layer_name, _ in modules])
        link = link.base
    tracker = StepTracker(num_steps=num_steps)
    tracker.model_family = adapter.family
    core = SparseAttentionCore(config, method_obj, tracker, num_layers=len(modules), backend=backend)
    originals: dict[str, tuple[torch.nn.Module, Any]] = {}
    try:
        for layer, (layer_name, module) in enumerate(modules):
            original = module.get_processor() if hasattr(module, "get_processor") else module.processor
            originals[layer_name] = (module, original)
            module.set_processor(adapter.make_processor(original, core, layer, layer_name))
        # The whole model runs in the method's token order only where the method has one and the adapter can.
        points = adapter.reorder_points(transformer) if reorder_tokens and method_obj.has_model_order() else ()
        attach_tracker(transformer, tracker, adapter.layout, adapter.timestep,
                       order_fn=_order_fn(method_obj, config) if points else None)
    except Exception:
        _restore(originals)
        raise
    expert = ExpertHandle(name, transformer, core, adapter, originals)
    if points:
        try:
            expert.remove_reorder = install_reorder(transformer, points, tracker)
        except Exception:
            _undo(expert)
            raise
    return expert


def apply(
    target: Any,
    method: str = "semantic",
    sparsity: float = 0.9,
    *,
    warmup_steps: float = 0.2,
    warmup_layers: int = 1,
    num_steps: int | None = None,
    backend: str = "auto",
    reorder_tokens: bool = True,
    **options: Any,
) -> SparseHandle:
    """Swap sparse attention processors into a Diffusers pipeline or transformer.

    Every denoiser of a pipeline is made sparse: `pipe.transformer` and, in Wan 2.2 A14B pipelines, the
    low-noise expert `pipe.transformer_2`. Each expert gets its own processors, step tracker, method
    state (caches, plans) and statistics.

    Args:
        target: a pipeline with `.transformer` (and optionally `.transformer_2`) or a supported transformer.
        method: a method name from `dit_sparse.available_methods()`; `"a+b"` composes (b refines a).
        sparsity: fraction of query-key pairs skipped in sparse steps and layers, in [0, 1); 0 is dense.
        warmup_steps: fraction (< 1) or count (>= 1) of leading denoising steps that stay dense. Steps are
            the pipeline's (Wan passes its global step index to both experts), so the low-noise expert is
            not warmed up again.
        warmup_layers: number of leading self-attention layers that stay dense (per expert).
        num_steps: total denoising steps, if the pipeline does not report them.
        backend: kernel backend ("auto", "reference", or a registered GPU backend).
        reorder_tokens: where the method has one token order for every layer (window3d's tiles) and the
            model allows it (Wan), run the whole transformer in that order, reordered once per forward,
            instead of permuting q, k, v and the output in every attention call. Same output; False keeps
            the per-call permutations (for comparison).
        **options: the method's own options (see each method's `Config`).

    Returns:
        A `SparseHandle`; `handle.remove()` or `dit_sparse.remove(target)` restores the originals.
    """
    from dit_sparse.kernels import check_backend
    from dit_sparse.pipelines.families import get_adapter

    denoisers = _denoisers_of(target)
    if any(getattr(m, _HANDLE_ATTR, None) is not None for _, m in denoisers):
        raise ConfigError("dit-sparse is already applied to this transformer; call dit_sparse.remove() first")
    check_sparsity(sparsity)
    # A misspelt backend would otherwise surface only at the first sparse attention call, mid-generation.
    check_backend(backend)
    adapters = [get_adapter(m) for _, m in denoisers]  # every expert supported before anything is swapped
    build_method(method, float(sparsity), options)  # bad method names or options fail here, not mid-way
    warmup = WarmupConfig(steps=warmup_steps, layers=warmup_layers)
    config = SparseConfig(method=method, sparsity=sparsity, warmup=warmup, options=options)
    experts: list[ExpertHandle] = []
    try:
        for (name, model), adapter in zip(denoisers, adapters):
            experts.append(_apply_to_expert(name, model, adapter, config, num_steps, backend, reorder_tokens))
    except Exception:
        for expert in experts:  # all or nothing: an expert that failed must not leave the others sparse
            _undo(expert)
        raise
    handle = SparseHandle(config, experts)
    for expert in experts:
        setattr(expert.transformer, _HANDLE_ATTR, handle)
    return handle


def remove(target: Any) -> None:
    """Undo `apply` on a pipeline (every expert), transformer or handle (a no-op when nothing is applied)."""
    if isinstance(target, SparseHandle):
        target.remove()
        return
    for _, model in _denoisers_of(target):
        handle = getattr(model, _HANDLE_ATTR, None)
        if handle is not None:
            handle.remove()


@contextlib.contextmanager
def sparse_attention(target: Any, method: str = "semantic", sparsity: float = 0.9, **kwargs: Any
                     ) -> Iterator[SparseHandle]:
    """`with dit_sparse.sparse_attention(pipe, "semantic", 0.9) as h: ...` - removed on exit."""
    handle = apply(target, method, sparsity, **kwargs)
    try:
        yield handle
    finally:
        handle.remove()
