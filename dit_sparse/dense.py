"""Trivial methods: dense attention, and every block through the block-sparse executor."""

from __future__ import annotations

from dataclasses import dataclass

from .context import AttentionContext
from .method import SparseMethod, register_method
from .plan import BlockPlan


@register_method
class DenseAttention(SparseMethod):
    """Always dense: the processor calls the model's own attention (useful as a timing baseline)."""

    name = "dense"

    def plan(self, q, k, v, ctx: AttentionContext) -> BlockPlan | None:
        return None


@dataclass(frozen=True)
class FullPlanConfig:
    block_size: int = 64

    def __post_init__(self) -> None:
        if self.block_size < 16 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a power of two >= 16, got {self.block_size}")


@register_method
class FullPlan(SparseMethod):
    """Every block selected, executed by the block-sparse kernels: checks plumbing, measures overhead."""

    name = "full"
    Config = FullPlanConfig

    def plan(self, q, k, v, ctx: AttentionContext) -> BlockPlan | None:
        # One plan per call shape, the same object on every call: static data, so a kernel's per-plan
        # preparation (and a refining method's cache of its own plan) is paid once.
        B, H, S, _ = q.shape
        key = (B, H, S, q.device)
        cached = ctx.state.get("full_plan")
        if cached is None or cached[0] != key:
            cached = ctx.state["full_plan"] = (key, BlockPlan.dense(B, H, S, self.options.block_size, device=q.device))
        return cached[1]
