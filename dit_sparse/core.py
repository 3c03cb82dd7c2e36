"""`SparseAttentionCore`: the shared step every model's sparse processor delegates to.

Model processors do their model's own projections, norms and RoPE, then hand (q, k, v) here with a
`dense_fn` that runs the model's original attention call. The core decides dense vs sparse (config,
warm-up schedule, unsupported input), asks the method for a plan, runs it through the kernels and
reports what was skipped. With sparsity 0 it calls `dense_fn` and nothing else, so outputs are exactly
Diffusers' own.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Callable
from typing import Any

import torch

from dit_sparse.kernels import run_backend, select_backend

from .config import SparseConfig
from .context import AttentionContext
from .layout import VideoLayout
from .method import SparseMethod
from .parallel import UlyssesGroup, context_parallel_of, gathered_order, sharded_layout, ulysses_group
from .stats import SparsityStats
from .tracking import StepTracker
from .warn import WarnOnce

Tensor = torch.Tensor


class SparseAttentionCore:
    """One per `apply()`: the method, its config, the step tracker and the statistics."""

    def __init__(
        self,
        config: SparseConfig,
        method: SparseMethod,
        tracker: StepTracker,
        num_layers: int,
        backend: str = "auto",
    ) -> None:
        self.config = config
        self.method = method
        self.tracker = tracker
        self.num_layers = num_layers
        self.backend = backend
        self.stats = SparsityStats()
        self.timer: Callable[[str], Any] | None = None  # e.g. eval's AttentionTimer.section
        self._warn_once = WarnOnce("dit-sparse: running dense attention because ", stacklevel=4)
        self._warn_layer_budget = WarnOnce("dit-sparse: ", stacklevel=4)
        self._mask_verdict: tuple[weakref.ref, int, bool] | None = None
        self._orders: dict = {}  # context parallelism's token orders per shape (parallel.gathered_order)

    def _section(self):
        return self.timer("attention") if self.timer is not None else contextlib.nullcontext()

    def attend(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        *,
        layer: int,
        layer_name: str,
        dense_fn: Callable[[], Tensor],
        text_first: bool | None = None,
        attention_mask: Tensor | None = None,
        scale: float | None = None,
        parallel_config: Any = None,
    ) -> Tensor:
        """Self-attention of query/key/value given in Diffusers' [B, S, H, D] layout -> [B, S, H, D].

        `parallel_config` is the processor's Diffusers `_parallel_config`. Under Ulysses context
        parallelism the inputs are this rank's sequence shard and the sparse path exchanges them to head
        shards around the plan and kernel (`dit_sparse.parallel`); other parallel modes run `dense_fn`.
        """
        B, S, H, D = query.shape
        with self._section():
            if self.config.is_dense:
                return dense_fn()
            group, why = ulysses_group(parallel_config, H)
            if why is not None:
                self._warn_once(why)
                self.stats.add_dense(B * H * S * key.shape[1] * _cp_size(parallel_config), fallback=True)
                return dense_fn()
            if group is not None:
                return self._attend_ulysses(query, key, value, group, layer, layer_name, dense_fn, text_first,
                                            attention_mask, scale)
            ctx = self._context(layer, layer_name, self._layout(S, text_first))
            q, k, v = (t.transpose(1, 2) for t in (query, key, value))  # [B, H, S, D] views, no copy
            if self.config.warmup.is_dense(ctx.step, ctx.num_steps, layer):
                if layer >= self.config.warmup.layers:  # permanently dense layers never use a cache
                    self.method.warmup(q, k, v, ctx)
                self.stats.add_dense(B * H * S * key.shape[1])
                return dense_fn()
            reason = self._unsupported(query, key, attention_mask)
            if reason is not None:
                self._warn_once(reason)
                self.stats.add_dense(B * H * S * key.shape[1], fallback=True)
                return dense_fn()
            plan = self.method.plan(q, k, v, ctx)
            out = None if plan is None else self._execute(q, k, v, plan, ctx, scale)
            if out is None:
                self.stats.add_dense(B * H * S * key.shape[1], fallback=plan is not None)
                return dense_fn()
            return out.transpose(1, 2)

    def _execute(self, q: Tensor, k: Tensor, v: Tensor, plan, ctx, scale: float | None) -> Tensor | None:
        """Run `plan` on the fastest backend that supports it and let the method observe the result.

        Returns None (after one warning per reason) when the inputs are on a GPU but no fast kernel runs
        them (e.g. float32, an unsupported head dim): the caller then runs the model's own dense attention
        rather than the slow reference executor, which is for the CPU and tests.
        """
        lse, tile_stats = self.method.stats_wanted(ctx)
        name, why = select_backend(q, plan, self.backend, tile_stats, lse)
        if not name:
            self._warn_once(f"no fast kernel runs these inputs ({why})")
            return None
        result = run_backend(name, q, k, v, plan, scale=scale, return_lse=lse, return_tile_stats=tile_stats)
        self.method.observe(ctx, plan, result)
        self.stats.add_sparse(plan)
        return result.out

    def _attend_ulysses(self, query, key, value, group: UlyssesGroup, layer, layer_name, dense_fn, text_first,
                        attention_mask, scale) -> Tensor:
        """The sparse path on this rank's sequence shard: exchange to head shards, plan, run, exchange back.

        Every choice made before the exchange is the same on all ranks (config, step, layer, shapes; a
        mask is agreed on with one all-reduce), so all ranks take the same collectives. After the
        exchange a method may still return no plan for its heads: those run dense locally.
        """
        B, S, H, D = query.shape
        n = group.size
        pairs = B * H * S * key.shape[1] * n  # this rank's share of the query-key pairs
        layout = self._layout(S * n, text_first)
        if not sharded_layout(layout, n):
            layout = None  # text/video shards of unknown sizes: the gathered order is not the model's
        ctx = self._context(layer, layer_name, layout)
        warm = self.config.warmup.is_dense(ctx.step, ctx.num_steps, layer)
        reason = self._unsupported(query, key, attention_mask)
        if attention_mask is not None:  # masks are sharded data: every rank must reach the same verdict
            reason = reason if group.all_true(reason is None, query.device) else (
                reason or "the model passed an attention mask with masked positions on another rank")
        if reason is not None or (warm and not _has_warmup(self.method)):
            if reason is not None and not warm:
                self._warn_once(reason)
            self.stats.add_dense(pairs, fallback=reason is not None and not warm)
            return dense_fn()
        q, k, v = group.to_heads(query, key, value)  # [B, S*n, H/n, D]: all tokens of this rank's heads
        order = gathered_order(layout, n, q.device, self._orders)
        if order is not None:
            q, k, v = (t.index_select(1, order[0]) for t in (q, k, v))
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [B, H/n, S*n, D] views
        plan = None
        if warm:
            self.method.warmup(q, k, v, ctx)
        else:
            if _layer_budget(self.method):
                self._warn_layer_budget("under context parallelism budget_scope='layer' shares the budget "
                                        "among each rank's heads only")
            plan = self.method.plan(q, k, v, ctx)
        out = None if plan is None else self._execute(q, k, v, plan, ctx, scale)
        if out is None:
            out = torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=scale)
            self.stats.add_dense(pairs, fallback=plan is not None)
        out = out.transpose(1, 2)  # [B, S*n, H/n, D]
        if order is not None:
            out = out.index_select(1, order[1])
        return group.to_sequence(out)

    def _layout(self, seq_len: int, text_first: bool | None) -> VideoLayout | None:
        """The current forward's video layout with this call's text tokens, or None when it does not fit."""
        layout = self.tracker.layout
        if layout is None:
            return None
        try:
            return layout.with_text(seq_len, text_first)
        except ValueError:
            return None

    def _context(self, layer: int, layer_name: str, layout: VideoLayout | None) -> AttentionContext:
        return self.tracker.context(layer, layer_name, self.num_layers, self.config.sparsity, layout)

    def _unsupported(self, query: Tensor, key: Tensor, attention_mask: Tensor | None) -> str | None:
        if key.shape[1] != query.shape[1]:
            return "query and key lengths differ (cross-attention stays dense)"
        if attention_mask is not None and not self._mask_allows_all(attention_mask):
            return "the model passed an attention mask with masked positions (not expressible as a block plan)"
        return None

    def _mask_allows_all(self, mask: Tensor) -> bool:
        """Whether an attention mask allows every position.

        SYNC: reading the verdict is a host synchronisation. Models build one mask per forward and hand
        the same tensor to every layer, so the verdict is kept for that tensor object (and its version):
        one sync per forward, not per attention call.
        """
        cached = self._mask_verdict
        if cached is not None and cached[0]() is mask and cached[1] == mask._version:
            return cached[2]
        # Boolean masks mark allowed positions; additive float masks allow where they are 0.
        allowed = mask if mask.dtype == torch.bool else mask == 0
        verdict = bool(allowed.all())
        self._mask_verdict = (weakref.ref(mask), mask._version, verdict)
        return verdict


def _cp_size(parallel_config: Any) -> int:
    """Ranks the sequence is sharded over (1 without context parallelism)."""
    cp = context_parallel_of(parallel_config)
    return 1 if cp is None else int(cp.ring_degree or 1) * int(cp.ulysses_degree or 1)


def _has_warmup(method: SparseMethod) -> bool:
    """Whether `method` or a method it wraps overrides `warmup` (then warm-up calls must see head shards)."""
    while method is not None:
        if type(method).warmup is not SparseMethod.warmup:
            return True
        method = method.base
    return False


def _layer_budget(method: SparseMethod) -> bool:
    """Whether a method in the chain pools its budget over all heads of a layer."""
    while method is not None:
        if getattr(method.options, "budget_scope", None) == "layer":
            return True
        method = method.base
    return False
