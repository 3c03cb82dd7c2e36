"""Public API: `apply`, `remove`, and the `sparse_attention` context manager."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch

from .config import ConfigError, SparseConfig, WarmupConfig, check_sparsity
from .core import SparseAttentionCore
from .method import build_method
from .tracking import StepTracker, attach_tracker, detach_tracker

_HANDLE_ATTR = "_dit_sparse_handle"


def _transformer_of(target: Any) -> torch.nn.Module:
    """The denoiser of a pipeline, or the module itself."""
    if isinstance(target, torch.nn.Module):
        return target
    model = getattr(target, "transformer", None)
    if isinstance(model, torch.nn.Module):
        return model
    raise ConfigError(
        f"dit_sparse.apply expects a Diffusers pipeline with a `.transformer` or a transformer model, "
        f"got {type(target).__name__}"
    )


class SparseHandle:
    """What `apply` returns: the live configuration, statistics, and the way back (`remove`)."""

    def __init__(self, transformer: torch.nn.Module, config: SparseConfig, core: SparseAttentionCore,
                 originals: dict[str, tuple[torch.nn.Module, Any]], adapter: Any) -> None:
        self.transformer = transformer
        self.config = config
        self.core = core
        self.adapter = adapter
        self._originals = originals
        self.active = True

    @property
    def method(self):
        return self.core.method

    @property
    def tracker(self) -> StepTracker:
        return self.core.tracker

    def stats(self) -> dict[str, float | int]:
        """Achieved sparsity and call counts since the last `reset()` (one host sync)."""
        return self.core.stats.summary()

    def reset(self) -> None:
        """Forget caches and statistics: the next forward starts a new generation."""
        self.core.tracker.new_generation()
        self.core.stats.reset()

    def remove(self) -> None:
        """Restore the original processors and detach the step tracker. Idempotent."""
        if not self.active:
            return
        for module, processor in self._originals.values():
            # enable_parallelism() after apply() configured only the sparse processor: hand its config back.
            current = module.get_processor() if hasattr(module, "get_processor") else module.processor
            if getattr(current, "_parallel_config", None) is not None and hasattr(processor, "_parallel_config"):
                processor._parallel_config = current._parallel_config
            module.set_processor(processor)
        detach_tracker(self.transformer)
        if getattr(self.transformer, _HANDLE_ATTR, None) is self:
            delattr(self.transformer, _HANDLE_ATTR)
        self.active = False

    def __enter__(self) -> SparseHandle:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def __repr__(self) -> str:
        state = "active" if self.active else "removed"
        return (f"SparseHandle({self.config.method!r}, sparsity={self.config.sparsity}, "
                f"layers={len(self._originals)}, {state})")


def apply(
    target: Any,
    method: str = "semantic",
    sparsity: float = 0.9,
    *,
    warmup_steps: float = 0.2,
    warmup_layers: int = 1,
    num_steps: int | None = None,
    backend: str = "auto",
    **options: Any,
) -> SparseHandle:
    """Swap sparse attention processors into a Diffusers pipeline or transformer.

    Args:
        target: a pipeline with `.transformer` or a supported transformer model.
        method: a method name from `dit_sparse.available_methods()`; `"a+b"` composes (b refines a).
        sparsity: fraction of query-key pairs skipped in sparse steps and layers, in [0, 1); 0 is dense.
        warmup_steps: fraction (< 1) or count (>= 1) of leading denoising steps that stay dense.
        warmup_layers: number of leading self-attention layers that stay dense.
        num_steps: total denoising steps, if the pipeline does not report them.
        backend: kernel backend ("auto", "reference", or a registered GPU backend).
        **options: the method's own options (see each method's `Config`).

    Returns:
        A `SparseHandle`; `handle.remove()` or `dit_sparse.remove(target)` restores the originals.
    """
    from dit_sparse.kernels import check_backend
    from dit_sparse.pipelines.adapters import get_adapter

    transformer = _transformer_of(target)
    if getattr(transformer, _HANDLE_ATTR, None) is not None:
        raise ConfigError("dit-sparse is already applied to this transformer; call dit_sparse.remove() first")
    check_sparsity(sparsity)
    # A misspelt backend would otherwise surface only at the first sparse attention call, mid-generation.
    check_backend(backend)
    adapter = get_adapter(transformer)
    warmup = WarmupConfig(steps=warmup_steps, layers=warmup_layers)
    method_obj, _ = build_method(method, float(sparsity), options)
    config = SparseConfig(method=method, sparsity=sparsity, warmup=warmup, options=options)
    modules = list(adapter.self_attention_modules(transformer))
    link = method_obj
    while link is not None:  # methods that depend on the model (e.g. a calibration file) check it here
        if hasattr(link, "bind_model"):
            link.bind_model(transformer, [name for name, _ in modules])
        link = link.base
    tracker = StepTracker(num_steps=num_steps)
    tracker.model_family = adapter.family
    core = SparseAttentionCore(config, method_obj, tracker, num_layers=len(modules), backend=backend)
    originals: dict[str, tuple[torch.nn.Module, Any]] = {}
    try:
        for layer, (name, module) in enumerate(modules):
            original = module.get_processor() if hasattr(module, "get_processor") else module.processor
            originals[name] = (module, original)
            module.set_processor(adapter.make_processor(original, core, layer, name))
        attach_tracker(transformer, tracker, adapter.layout, adapter.timestep)
    except Exception:
        for module, processor in originals.values():
            module.set_processor(processor)
        raise
    handle = SparseHandle(transformer, config, core, originals, adapter)
    setattr(transformer, _HANDLE_ATTR, handle)
    return handle


def remove(target: Any) -> None:
    """Undo `apply` on a pipeline, transformer or handle (a no-op when nothing is applied)."""
    if isinstance(target, SparseHandle):
        target.remove()
        return
    handle = getattr(_transformer_of(target), _HANDLE_ATTR, None)
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
