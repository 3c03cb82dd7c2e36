"""Pooled blocks ("pooled"): the position-based baseline on the same kernels and budget rule.

Tokens stay in natural order and are cut into fixed blocks. Each block's queries and keys are
mean-pooled; the block logit is pooled q . pooled k * scale, and blocks are chosen by
`dit_sparse.methods.budget.select_blocks` exactly like the semantic method's clusters, so the two differ only
in how tokens are grouped. Blocks that hold text tokens (joint attention) are computed in both
directions.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field

import torch

from dit_sparse.context import AttentionContext
from dit_sparse.method import ReusedPlan, SparseMethod, register_method
from dit_sparse.plan import BlockPlan
from dit_sparse.state import LayerState

from .budget import check_selection_options, select_blocks

Tensor = torch.Tensor


@dataclass(frozen=True)
class PooledConfig:
    """Options of the "pooled" method: block size (tokens, power of two >= 16; None = 128 from 8,192
    tokens on, where blocks of the kernels' 128-row tiles leave no tile half empty, 64 below), top_p
    (0.9: a query block stops taking key blocks once it holds that much estimated mass, which leaves
    budget to diffuse query blocks; on the bundled model, CPU eval of 2026-12-01, 2 prompts, 30 steps,
    0.9 gave 18.40 / 17.39 / 17.05 dB at sparsity 0.75 / 0.9 / 0.95 and 1.0 gave 18.22 / 17.35 /
    16.72 dB), min_block_ratio (key blocks per query block taken before top-p candidates), budget_scope ("head" or
    "layer"), replan_every (denoising steps a plan is reused for; 1 = re-estimate every step)."""

    block_size: int | None = None
    top_p: float = 0.9
    min_block_ratio: float = 0.02
    budget_scope: str = "head"
    replan_every: int = 1

    def __post_init__(self) -> None:
        check_selection_options(self.top_p, "min_block_ratio", self.min_block_ratio, self.budget_scope,
                                self.replan_every)
        if self.block_size is not None and (self.block_size < 16 or self.block_size & (self.block_size - 1)):
            raise ValueError(f"block_size must be a power of two >= 16, got {self.block_size}")


def mean_pool(x: Tensor, block: int) -> Tensor:
    """Mean of each run of `block` tokens of x [B, H, S, D] (last block may be short): float32 [B, H, N, D].

    Sums accumulate in float32 straight from x's dtype and layout (a view of the full blocks plus the
    tail): no float32 or padded copy of x is made.
    """
    B, H, S, D = x.shape
    full = S // block
    parts = [x[:, :, : full * block].unflatten(2, (full, block)).sum(3, dtype=torch.float32)] if full else []
    if S % block:
        parts.append(x[:, :, full * block :].sum(2, keepdim=True, dtype=torch.float32))
    sums = torch.cat(parts, 2) if len(parts) > 1 else parts[0]
    n = sums.shape[2]
    sizes = (torch.arange(1, n + 1, device=x.device) * block).clamp(max=S) - torch.arange(n, device=x.device) * block
    return sums / sizes[:, None].float()


@dataclass
class PooledState(LayerState):
    """The plan of one layer and branch, reused for `replan_every` steps."""

    plan: ReusedPlan = field(default_factory=ReusedPlan)


@register_method
class PooledBlocks(SparseMethod):
    """Fixed blocks in natural order, scored by mean-pooled q . k."""

    name = "pooled"
    Config = PooledConfig
    State = PooledState

    def plan(self, q: Tensor, k: Tensor, v: Tensor, ctx: AttentionContext) -> BlockPlan | None:
        sig = (tuple(q.shape), q.device, self.sparsity)
        state: PooledState = self.state_of(ctx)
        return state.plan.get(sig, ctx.step, self.options.replan_every, lambda: self._plan(q, k, ctx))

    def _plan(self, q: Tensor, k: Tensor, ctx: AttentionContext) -> BlockPlan:
        B, H, S, D = q.shape
        bs = self.options.block_size or (128 if S >= 8192 else 64)
        text = None
        layout = ctx.layout
        if layout is not None and layout.text_tokens > 0 and layout.seq_len == S:
            text = (layout.text_start, layout.text_start + layout.text_tokens)
        # Pooling reads q and k once; everything after it works on the small block means and is replayed
        # as one CUDA graph on GPUs.
        select = functools.partial(self._select, seq_len=S, block=bs, text=text)
        return self.graphs.run(("pooled", S, bs, text), select, (mean_pool(q, bs), mean_pool(k, bs)))

    def _select(self, q_means: Tensor, k_means: Tensor, *, seq_len: int, block: int,
                text: tuple[int, int] | None) -> BlockPlan:
        """The plan from block means [B, H, N, D]: a pure function of its tensors (graphed)."""
        B, H, n, D = q_means.shape
        S, bs = seq_len, block
        logits = torch.matmul(q_means, k_means.transpose(-1, -2)) * (1.0 / math.sqrt(D))
        starts = torch.arange(n, device=q_means.device) * bs
        sizes = (starts + bs).clamp(max=S) - starts
        sizes = sizes.expand(B, H, n)
        force = None if text is None else (starts < text[1]) & (starts + bs > text[0])  # blocks holding text
        mask = select_blocks(
            logits,
            sizes,
            sizes,
            self.sparsity,
            top_p=self.options.top_p,
            min_blocks=max(1, math.ceil(self.options.min_block_ratio * n)),
            force_q=force,
            force_k=force,
            budget_scope=self.options.budget_scope,
        )
        return BlockPlan.from_block_mask(mask, bs, S)
