"""Denoising-step and CFG-branch tracking through a Diffusers `ModelHook` on the transformer.

The hook is stateful, so Diffusers hands it the pipeline's `cache_context` ("cond", "uncond", or
"cond_uncond" when both branches are batched) and resets it at the end of each pipeline call
(`maybe_free_model_hooks`). Steps are counted from the timestep passed to the transformer's forward,
which works for every pipeline (only some fill `CacheContext.step_index`): a new, smaller timestep is the
next step; a larger one starts a new generation, which clears all method state.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from diffusers.hooks import HookRegistry, ModelHook
from diffusers.hooks.hooks import BaseState, StateManager

from .context import AttentionContext
from .layout import VideoLayout
from .state import StateStore

HOOK_NAME = "dit_sparse_step_tracker"
DEFAULT_BRANCH = "default"


class _NoState(BaseState):
    def reset(self, *args, **kwargs) -> None:
        pass


class StepTracker:
    """Where the denoising loop is, plus per-(layer, branch) method state. One per `apply()`."""

    def __init__(self, num_steps: int | None = None) -> None:
        self.fixed_num_steps = num_steps
        self.num_steps: int | None = num_steps
        self.step = 0
        self.branch = DEFAULT_BRANCH
        self.layout: VideoLayout | None = None
        # (order, inverse) the current forward's sequence runs in (pipelines.reorder), None = its own order.
        self.token_order: tuple[torch.Tensor, torch.Tensor] | None = None
        self.model_family: str | None = None
        self.generation = 0
        self.forward_calls = 0
        self._last_t: float | None = None
        self._unnamed_in_step = 0  # forwards of the current step that came without a cache context
        self.states = StateStore()  # the methods' state of every (layer, branch) of this generation

    # Called by the hook ---------------------------------------------------------------------------
    def begin_forward(
        self, timestep: float | None, branch: str | None, step_index: int | None, num_steps: int | None
    ) -> None:
        """Record one transformer forward; advance the step or start a new generation.

        Pipelines that run CFG as separate forwards without naming them in a `cache_context` (ChronoEdit,
        Cosmos, ...) call the transformer twice with the same timestep: the second and later forwards of a
        step get branches "default_1", "default_2", ... so that each keeps its own state (plans, caches)
        instead of reusing the first forward's plan, built from other queries and keys.
        """
        same_step = False
        if timestep is not None:
            if self._last_t is None:
                pass
            elif timestep > self._last_t + 1e-6:
                self.new_generation()
            elif timestep < self._last_t - 1e-6:
                self.step += 1
            else:
                same_step = True
            self._last_t = timestep
        if branch is None:
            self._unnamed_in_step = self._unnamed_in_step + 1 if same_step else 0
            if self._unnamed_in_step:
                branch = f"{DEFAULT_BRANCH}_{self._unnamed_in_step}"
        if step_index is not None:
            self.step = int(step_index)
        if num_steps is not None:
            self.num_steps = int(num_steps)
        self.branch = branch or DEFAULT_BRANCH
        self.forward_calls += 1

    def new_generation(self) -> None:
        """Forget every step counter and cache: the next forward is step 0 of a new generation."""
        self.step = 0
        self._last_t = None
        self.num_steps = self.fixed_num_steps
        self.states.clear()
        self.forward_calls = 0
        self.generation += 1

    # Used by the attention processors --------------------------------------------------------------
    def context(
        self, layer: int, layer_name: str, num_layers: int, sparsity: float, layout: VideoLayout | None
    ) -> AttentionContext:
        return AttentionContext(
            layer=layer,
            layer_name=layer_name,
            num_layers=num_layers,
            step=self.step,
            num_steps=self.num_steps,
            branch=self.branch,
            layout=layout,
            sparsity=sparsity,
            states=self.states.get(layer_name, self.branch),
            model_family=self.model_family,
            token_order=None if self.token_order is None else self.token_order[0],
        )


def _scalar_timestep(t: Any) -> float | None:
    if t is None:
        return None
    if isinstance(t, torch.Tensor):
        # Per-sample (or, in Wan 2.2 TI2V, per-token) timesteps: the largest one tracks the loop.
        # SYNC: the one host synchronisation of a sparse forward: once per transformer forward (the
        # step counter must be a Python int to key caches and schedules), never per attention call.
        return float(t.detach().float().max()) if t.numel() else None
    return float(t)


class StepTrackingHook(ModelHook):
    """Feeds a `StepTracker` from the transformer's forward (timestep, cache context, latent shape)."""

    _is_stateful = True

    def __init__(
        self,
        tracker: StepTracker,
        layout_fn: Callable[[torch.nn.Module, tuple, dict], VideoLayout | None] | None = None,
        timestep_fn: Callable[[tuple, dict], Any] | None = None,
        order_fn: Callable[[torch.nn.Module, VideoLayout | None, tuple, dict], Any] | None = None,
    ) -> None:
        super().__init__()
        self.tracker = tracker
        self.layout_fn = layout_fn
        self.timestep_fn = timestep_fn
        # (module, layout, args, kwargs) -> (order, inverse) | None: the token order of this forward.
        self.order_fn = order_fn
        # A StateManager attribute is how Diffusers finds the hook to hand it the cache context.
        self.state_manager = StateManager(_NoState)

    def pre_forward(self, module: torch.nn.Module, *args, **kwargs):
        ctx = self.state_manager._context
        if self.timestep_fn is not None:
            t = self.timestep_fn(args, kwargs)
        else:
            t = kwargs.get("timestep", args[1] if len(args) > 1 else None)
        self.tracker.begin_forward(
            _scalar_timestep(t),
            ctx.name if ctx is not None else None,
            getattr(ctx, "step_index", None),
            getattr(ctx, "num_inference_steps", None),
        )
        if self.layout_fn is not None:
            self.tracker.layout = self.layout_fn(module, args, kwargs)
        order_fn = self.order_fn
        self.tracker.token_order = None if order_fn is None else order_fn(module, self.tracker.layout, args, kwargs)
        return args, kwargs

    def post_forward(self, module: torch.nn.Module, output: Any) -> Any:
        self.tracker.token_order = None  # submodules called outside a forward see the model's own order
        return output

    def reset_state(self, module: torch.nn.Module) -> torch.nn.Module:
        self.tracker.new_generation()
        self.state_manager.reset()
        return module


def attach_tracker(
    transformer: torch.nn.Module,
    tracker: StepTracker,
    layout_fn: Callable[[torch.nn.Module, tuple, dict], VideoLayout | None] | None = None,
    timestep_fn: Callable[[tuple, dict], Any] | None = None,
    order_fn: Callable[[torch.nn.Module, VideoLayout | None, tuple, dict], Any] | None = None,
) -> StepTrackingHook:
    """Register the tracking hook on `transformer` (raises if dit-sparse is already applied to it).

    `order_fn` gives each forward's token order when the model runs in a method's order (pipelines.reorder).
    """
    registry = HookRegistry.check_if_exists_or_initialize(transformer)
    if registry.get_hook(HOOK_NAME) is not None:
        raise RuntimeError(
            "dit-sparse is already applied to this transformer; call dit_sparse.remove() on it first"
        )
    hook = StepTrackingHook(tracker, layout_fn, timestep_fn, order_fn)
    registry.register_hook(hook, HOOK_NAME)
    # What the registry installed, to tell at removal whether something outside it (cache-dit patches
    # `transformer.forward` directly) has replaced the forward since.
    hook.installed_forward = transformer.__dict__.get("forward")
    # New stateful hook: the registry's cached list of children must be rebuilt.
    registry.invalidate_child_registries_cache()
    return hook


def detach_tracker(transformer: torch.nn.Module) -> None:
    """Remove the tracking hook from `transformer`, leaving every other hook on it working.

    Hooks registered after ours wrap our forward. Diffusers' `remove_hook` (0.42) re-points the next
    hook's `forward` at our inner forward, which is right for a plain pre/post hook but drops the
    `new_forward` of a hook that has one (FasterCache's denoiser hook, TextKVCache's transformer hook):
    that cache would silently stop working while still listed, and disabling it later would bring our
    removed hook back into the forward chain. For such a hook the inner forward belongs in
    `original_forward`, so it is put there and its `new_forward` restored.
    """
    registry = getattr(transformer, "_diffusers_hook", None)
    if registry is None or registry.get_hook(HOOK_NAME) is None:
        return
    check_detachable(transformer)
    own_forward = _forward_is_own(transformer)
    index = registry._hook_order.index(HOOK_NAME)
    outer = registry._fn_refs[index + 1] if index + 1 < len(registry._fn_refs) else None
    outer_new_forward = outer.forward if outer is not None and outer.original_forward is not None else None
    registry.remove_hook(HOOK_NAME, recurse=False)
    if outer_new_forward is not None:
        outer.original_forward = outer.forward  # what remove_hook handed over: the forward we wrapped
        outer.forward = outer_new_forward
    if own_forward and not registry.hooks:
        # A wrapper outside the registry put the class's own forward back (cache-dit's disable_cache):
        # remove_hook just re-installed the forward we wrapped, i.e. that wrapper's stale one.
        del transformer.forward
    registry.invalidate_child_registries_cache()


def _forward_is_own(transformer: torch.nn.Module) -> bool:
    forward = transformer.__dict__.get("forward")
    return forward is None or getattr(forward, "__func__", None) is type(transformer).forward


def check_detachable(transformer: torch.nn.Module) -> None:
    """Raise if the tracking hook cannot be removed without undoing someone else's forward wrapper.

    Diffusers hooks registered after ours are re-linked by `remove_hook`, but a library that assigns
    `transformer.forward` itself (cache-dit) after `apply` wraps the registry's forward; removing our
    hook would re-install the forward from before that wrapper and silently drop it.
    """
    registry = getattr(transformer, "_diffusers_hook", None)
    hook = registry.get_hook(HOOK_NAME) if registry is not None else None
    if hook is None or registry._hook_order[-1] != HOOK_NAME:
        return  # not ours, or a later Diffusers hook owns the forward and remove_hook re-links it
    forward = transformer.__dict__.get("forward")
    if forward is getattr(hook, "installed_forward", forward) or _forward_is_own(transformer):
        return
    raise RuntimeError(
        "dit-sparse cannot be removed: transformer.forward was replaced after dit_sparse.apply() by "
        "something outside Diffusers' hook registry (e.g. cache_dit.enable_cache). Removing dit-sparse "
        "would silently drop that wrapper. Enable such caches before dit_sparse.apply() and remove "
        "dit-sparse before disabling them; a transformer wrapped in the other order must be reloaded."
    )
