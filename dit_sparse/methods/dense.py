"""Trivial methods: dense attention, and every block through the block-sparse executor."""

from __future__ import annotations

from dataclasses import dataclass

from dit_sparse.context import AttentionContext
from dit_sparse.method import SparseMethod, register_method
from dit_sparse.plan import BlockPlan
from dit_sparse.state import LayerState


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


@dataclass
class FullPlanState(LayerState):
    """The plan of the last call shape (B, H, S, device) of one layer and branch."""

    shape: tuple | None = None
    plan: BlockPlan | None = None


@register_method
class FullPlan(SparseMethod):
    """Every block selected, executed by the block-sparse kernels: checks plumbing, measures overhead."""

    name = "full"
    Config = FullPlanConfig
    State = FullPlanState

    def plan(self, q, k, v, ctx: AttentionContext) -> BlockPlan | None:
        # One plan per call shape, the same object on every call: static data, so a kernel's per-plan
        # preparation (and a refining method's cache of its own plan) is paid once.
        B, H, S, _ = q.shape
        state: FullPlanState = self.state_of(ctx)
        shape = (B, H, S, q.device)
        if state.shape != shape:
            state.shape, state.plan = shape, BlockPlan.dense(B, H, S, self.options.block_size, device=q.device)
        return state.plan
