"""`SparseAttentionCore`: the shared step every model's sparse processor delegates to.

Model processors do their model's own projections, norms and RoPE, then hand (q, k, v) here with a
`dense_fn` that runs the model's original attention call. The core decides dense vs sparse (config,
warm-up schedule, unsupported input), asks the method for a plan, runs it through the kernels and
reports what was skipped. With sparsity 0 it calls `dense_fn` and nothing else, so outputs are exactly
Diffusers' own.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable
from typing import Any

import torch

from dit_sparse.kernels import block_sparse_attention

from .config import SparseConfig
from .method import SparseMethod
from .stats import SparsityStats
from .tracking import StepTracker

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
        self._warned: set[str] = set()

    def _warn_once(self, reason: str) -> None:
        if reason not in self._warned:
            self._warned.add(reason)
            warnings.warn(f"dit-sparse: running dense attention because {reason}", stacklevel=4)

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
    ) -> Tensor:
        """Self-attention of query/key/value given in Diffusers' [B, S, H, D] layout -> [B, S, H, D]."""
        B, S, H, D = query.shape
        with self._section():
            if self.config.is_dense:
                return dense_fn()
            layout = self.tracker.layout
            if layout is not None:
                try:
                    layout = layout.with_text(S, text_first)
                except ValueError:
                    layout = None
            ctx = self.tracker.context(layer, layer_name, self.num_layers, self.config.sparsity, layout)
            q, k, v = (t.transpose(1, 2) for t in (query, key, value))  # [B, H, S, D] views, no copy
            if self.config.warmup.is_dense(ctx.step, ctx.num_steps, layer):
                self.method.warmup(q, k, v, ctx)
                self.stats.add_dense(B * H * S * key.shape[1])
                return dense_fn()
            reason = self._unsupported(query, key, attention_mask)
            if reason is not None:
                self._warn_once(reason)
                self.stats.add_dense(B * H * S * key.shape[1], fallback=True)
                return dense_fn()
            plan = self.method.plan(q, k, v, ctx)
            if plan is None:
                self.stats.add_dense(B * H * S * key.shape[1])
                return dense_fn()
            result = block_sparse_attention(
                q,
                k,
                v,
                plan,
                scale=scale,
                return_lse=self.method.wants_lse,
                return_tile_stats=self.method.wants_tile_stats,
                backend=self.backend,
            )
            self.method.observe(ctx, plan, result)
            self.stats.add_sparse(plan)
            return result.out.transpose(1, 2)

    @staticmethod
    def _unsupported(query: Tensor, key: Tensor, attention_mask: Tensor | None) -> str | None:
        if key.shape[1] != query.shape[1]:
            return "query and key lengths differ (cross-attention stays dense)"
        # Boolean masks mark allowed positions; additive float masks allow where they are 0.
        allowed = attention_mask
        if allowed is not None and allowed.dtype != torch.bool:
            allowed = allowed == 0
        if allowed is not None and not bool(allowed.all()):
            return "the model passed an attention mask with masked positions (not expressible as a block plan)"
        return None
