"""Semantic permutation ("semantic"): cluster queries and keys, attend between similar clusters.

Per (batch, head), queries and keys of the video tokens are clustered separately with k-means
(`kmeans.py`). Tokens are ordered by cluster (the plan carries the permutation; nothing is
moved in memory), so each cluster is one contiguous range and a (query cluster, key cluster) block is
a block of the plan. Blocks are scored from the centroids, P'_ij ~ |K_j| exp(Qc_i . Kc_j * scale),
and chosen by `dit_sparse.methods.budget.select_blocks` under the target sparsity.

Centroids are cached in the per-(layer, CFG branch) state and refined with a few Lloyd iterations each
call (cold start: more iterations from strided seeds). Dense warm-up calls run the clustering too, so
the first sparse step starts warm. Text tokens of joint-attention models are left out of the
clustering and placed as one range at the end of both orders: text queries attend every key range and
every query range attends the text keys; those pairs count toward the budget.
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

from ..budget import check_selection_options, select_blocks
from .kmeans import KMeansResult, kmeans

Tensor = torch.Tensor


def default_clusters(seq_len: int) -> tuple[int, int]:
    """(query clusters, key clusters) for `seq_len` video tokens.

    32 / 128 at 4,096 tokens; query clusters grow as S^(2/3) and key clusters as S^(1/3) (128 / 256 at
    Wan-1.3B's 32,760, 224 / 336 at 75,600), never coarser than 8 / 32 so short sequences still reach
    high sparsity, capped at 256 / 1,024 and at S. Key clusters grow slowly on purpose: at 32,760 tokens
    on an H100 (benchmarks/semantic.md) the block-sparse kernel at sparsity 0.9 took 2.8 ms with 250
    key clusters and 5.0 ms with 1,000 (q = 100), while the output error on clustered inputs barely
    moved; more query clusters lowered the error at a small kernel cost.
    """
    scale = seq_len / 4096
    nq = min(max(8, 8 * round(4 * scale ** (2 / 3))), 256)
    nk = min(max(32, 8 * round(16 * scale ** (1 / 3))), 1024)
    return max(1, min(nq, seq_len)), max(1, min(nk, seq_len))


def fine_clusters(seq_len: int) -> tuple[int, int]:
    """(query clusters, key clusters) for the exact-cluster layout: S / 32 and S / 8 (128 / 512 at 4,096
    tokens), at least 8 / 32, at most 256 / 1,024 and S.

    Measured on the first bundled model (v1, 4,096 tokens; CPU eval of 2026-12-01, 2 prompts, PSNR vs dense at
    sparsity 0.75 / 0.9 / 0.95): 128 / 512 clusters with the whole budget (top_p 1.0) gave 20.6 / 18.2 /
    16.7 dB against 16.6 / 15.7 / 15.3 dB with `default_clusters` (32 / 128) and top_p 0.9, and pooled
    18.4 / 17.4 / 17.1 dB. Short sequences take this layout (`layout="auto"` below 8,192 video
    tokens), where many small ranges cost little; long ones take fixed blocks and `default_clusters`.
    """
    nq = min(max(8, seq_len // 32), 256)
    nk = min(max(32, seq_len // 8), 1024)
    return max(1, min(nq, seq_len)), max(1, min(nk, seq_len))


@dataclass(frozen=True)
class SemanticConfig:
    """Options of the "semantic" method (see the module docstring).

    num_q_clusters / num_k_clusters: None = `fine_clusters(video tokens)` in the exact-cluster layout
        below 8,192 video tokens, `default_clusters(video tokens)` otherwise (48 / 160 at 8,192).
    top_p: attention mass per query cluster after which no more key clusters are added (1.0, the default,
        spends the whole pair budget: on the bundled model that measured better at every sparsity).
    min_kc_ratio: fraction of key clusters every query cluster takes before top-p candidates (at
        least one), still inside the sparsity budget.
    cold_iters / warm_iters: Lloyd iterations without / with cached centroids.
    init: cold-start seeding, "strided" (free) or "kmeans++" (K sequential steps on a subsample).
    budget_scope: "head" (each head meets the target) or "layer" (heads share one budget).
    replan_every: re-cluster and re-select every this many denoising steps, reusing the plan (token
        order and selected blocks) in between; 1 = every step. Larger values trade a little quality for
        planning cost (k-means plus selection are paid once per `replan_every` steps).
    layout: how the cluster-sorted order is cut into plan ranges. "clusters": one range per cluster
        (exact clusters, variable sizes: the kernel's 128-row tiles run partly empty on small clusters).
        "blocks": fixed `block_size` blocks of the cluster-sorted order, each scored by the exact mean of
        its tokens (computed from the centroids, no pass over the tokens): every tile is full and the
        fastest fixed-block kernels run the plan. "auto": blocks from 16,384 video tokens on, clusters below
        (on the bundled model v2, 8,192 tokens, clusters kept 28.0 / 22.4 dB at sparsity 0.75 / 0.9 where
        blocks kept 21.9 / 18.6: CPU, 2 prompts, first 30% of steps dense, BENCHMARKS.md section 4).
    block_size: tokens per block in the "blocks" layout.
    """

    num_q_clusters: int | None = None
    num_k_clusters: int | None = None
    top_p: float = 1.0
    min_kc_ratio: float = 0.02
    cold_iters: int = 20
    warm_iters: int = 2
    init: str = "strided"
    budget_scope: str = "head"
    replan_every: int = 1
    layout: str = "auto"
    block_size: int = 128

    def __post_init__(self) -> None:
        check_selection_options(self.top_p, "min_kc_ratio", self.min_kc_ratio, self.budget_scope, self.replan_every)
        if self.layout not in ("auto", "clusters", "blocks"):
            raise ValueError(f"layout must be 'auto', 'clusters' or 'blocks', got {self.layout!r}")
        if not isinstance(self.block_size, int) or self.block_size < 16 or self.block_size % 16:
            raise ValueError(f"block_size must be a multiple of 16 (e.g. 128), got {self.block_size!r}")
        for name in ("num_q_clusters", "num_k_clusters"):
            val = getattr(self, name)
            if val is not None and (not isinstance(val, int) or val < 1):
                raise ValueError(f"{name} must be a positive integer or None (automatic), got {val!r}")
        if self.cold_iters < 1 or self.warm_iters < 1:
            raise ValueError(f"cold_iters and warm_iters must be >= 1, got {self.cold_iters}, {self.warm_iters}")
        if self.init not in ("strided", "kmeans++"):
            raise ValueError(f"init must be 'strided' or 'kmeans++', got {self.init!r}")


def _video_span(S: int, ctx: AttentionContext) -> tuple[int, int]:
    """(first video token, number of video tokens) of this call; all tokens when the layout is unknown."""
    layout = ctx.layout
    if layout is None or layout.text_tokens == 0 or layout.seq_len != S:
        return 0, S
    return layout.video_start, layout.video_tokens


@dataclass
class SemanticState(LayerState):
    """One layer and branch: the last centroids (warm start of the next k-means) and the reused plan."""

    signature: tuple | None = None  # what the centroids were computed for (`_signature`)
    q_centroids: Tensor | None = None  # [B, H, Kq, D]
    k_centroids: Tensor | None = None  # [B, H, Kk, D]
    plan: ReusedPlan = field(default_factory=ReusedPlan)

    def warm_for(self, signature: tuple) -> bool:
        """Whether the kept centroids can warm-start k-means on inputs of this signature."""
        return self.signature == signature  # set with the centroids; None before the first k-means


@register_method
class SemanticPermutation(SparseMethod):
    """K-means permutation of queries and keys with centroid-scored block selection."""

    name = "semantic"
    Config = SemanticConfig
    State = SemanticState

    # ------------------------------------------------------------------ clustering
    def cluster_counts(self, video_tokens: int) -> tuple[int, int]:
        """Query and key cluster counts for this many video tokens (options override the defaults)."""
        # Fine clusters pay off where ranges are cheap: short sequences in the exact-cluster layout. From
        # 8,192 tokens the clusters layout keeps the coarser counts too (at CogVideoX's 17,550 video tokens
        # 256 / 1,024 fine clusters made the call 3.5x slower on an H200).
        fine = not self.blocked(video_tokens) and video_tokens < _FINE_CLUSTERS_BELOW
        nq, nk = fine_clusters(video_tokens) if fine else default_clusters(video_tokens)
        o = self.options
        nq = min(o.num_q_clusters or nq, video_tokens)
        nk = min(o.num_k_clusters or nk, video_tokens)
        return nq, nk

    def cluster(self, q: Tensor, k: Tensor, ctx: AttentionContext) -> tuple[KMeansResult, KMeansResult]:
        """K-means of the video queries and keys ([B, H, Sv, D] views), warm-started from this layer and
        branch's last centroids when they fit."""
        B, H, S, D = q.shape
        nq, nk = self.cluster_counts(S)
        state: SemanticState = self.state_of(ctx)
        signature = self._signature(q)
        warm = state.warm_for(signature)
        o = self.options
        iters = o.warm_iters if warm else o.cold_iters
        qr = kmeans(q, nq, iters, init=state.q_centroids if warm else o.init)
        kr = kmeans(k, nk, iters, init=state.k_centroids if warm else o.init)
        state.signature, state.q_centroids, state.k_centroids = signature, qr.centroids, kr.centroids
        return qr, kr

    def _signature(self, video_q: Tensor) -> tuple:
        """What cached centroids must match to warm-start k-means on these video queries."""
        B, H, S, D = video_q.shape
        return (B, H, S, D, *self.cluster_counts(S), video_q.device)

    def warmup(self, q: Tensor, k: Tensor, v: Tensor, ctx: AttentionContext) -> None:
        start, n = _video_span(q.shape[2], ctx)
        self.cluster(q[:, :, start : start + n], k[:, :, start : start + n], ctx)

    # ------------------------------------------------------------------ planning
    def plan(self, q: Tensor, k: Tensor, v: Tensor, ctx: AttentionContext) -> BlockPlan | None:
        sig = (tuple(q.shape), q.device, self.sparsity)
        state: SemanticState = self.state_of(ctx)
        return state.plan.get(sig, ctx.step, self.options.replan_every, lambda: self._plan(q, k, ctx))

    def blocked(self, video_tokens: int) -> bool:
        """Whether plans use the fixed-block layout for this many video tokens (see `SemanticConfig`)."""
        layout = self.options.layout
        return layout == "blocks" or (layout == "auto" and video_tokens >= _AUTO_BLOCKS_FROM)

    def _plan(self, q: Tensor, k: Tensor, ctx: AttentionContext) -> BlockPlan:
        start, n = _video_span(q.shape[2], ctx)
        qv, kv = q[:, :, start : start + n], k[:, :, start : start + n]
        state: SemanticState = self.state_of(ctx)
        if not state.warm_for(self._signature(qv)):  # cold start: once, eagerly
            qr, kr = self.cluster(qv, kv, ctx)
            return self._plan_from(q, k, qr, kr, start, n)
        # Warm: k-means from the kept centroids and the whole plan, replayed as one CUDA graph on GPUs.
        warm = functools.partial(self._warm_plan, start=start, n=n)
        plan, state.q_centroids, state.k_centroids = self.graphs.run(
            ("semantic", start, n), warm, (q, k, state.q_centroids, state.k_centroids))
        return plan

    def _warm_plan(self, q: Tensor, k: Tensor, q_centroids: Tensor, k_centroids: Tensor, *, start: int, n: int
                   ) -> tuple[BlockPlan, Tensor, Tensor]:
        """(plan, new query centroids, new key centroids): a pure function of its tensors (graphed)."""
        iters = self.options.warm_iters
        qr = kmeans(q[:, :, start : start + n], q_centroids.shape[2], iters, init=q_centroids)
        kr = kmeans(k[:, :, start : start + n], k_centroids.shape[2], iters, init=k_centroids)
        return self._plan_from(q, k, qr, kr, start, n), qr.centroids, kr.centroids

    def _plan_from(self, q: Tensor, k: Tensor, qr: KMeansResult, kr: KMeansResult, start: int, n: int) -> BlockPlan:
        """The plan for the video clusters `qr`, `kr` of q, k's tokens [start, start + n) (text, if any,
        as one last range)."""
        B, H, S, D = q.shape
        q_perm, q_off, qc = _with_text(q, qr, start, n)
        k_perm, k_off, kc = _with_text(k, kr, start, n)
        scale = 1.0 / math.sqrt(D)
        if self.blocked(n):
            return self._block_plan(q_perm, q_off, qc, k_perm, k_off, kc, n, scale)
        # The text range (last) is computed both ways: marked by a device comparison, since writing a Python
        # scalar into a CUDA tensor (`x[-1] = True`) copies it from the host.
        force_q = _last(qc.shape[2], q.device) if S > n else None
        force_k = _last(kc.shape[2], q.device) if S > n else None
        mask = self._select(torch.matmul(qc, kc.transpose(-1, -2)) * scale, _sizes(q_off), _sizes(k_off),
                            kr.counts.shape[-1], force_q, force_k)
        return BlockPlan.from_range_mask(mask, q_off, k_off, q_perm=q_perm, k_perm=k_perm, seq_lens=(S, S))

    def _block_plan(self, q_perm: Tensor, q_off: Tensor, qc: Tensor, k_perm: Tensor, k_off: Tensor, kc: Tensor,
                    n: int, scale: float) -> BlockPlan:
        """Fixed blocks over the cluster-sorted orders (text, if any, at the end), scored by block means."""
        B, H, S = q_perm.shape
        bs = min(self.options.block_size, S)
        nb = (S + bs - 1) // bs
        b0 = torch.arange(nb, device=q_perm.device) * bs
        b1 = (b0 + bs).clamp(max=S)
        sizes = (b1 - b0).expand(B, H, nb)
        logits = torch.matmul(_block_means(q_off, qc, b0, b1), _block_means(k_off, kc, b0, b1).transpose(-1, -2))
        text = (b1 > n) if S > n else None  # blocks holding text: computed both ways
        mask = self._select(logits * scale, sizes, sizes, nb, text, text)
        return BlockPlan.from_block_mask(mask, bs, S, q_perm=q_perm, k_perm=k_perm)

    def _select(self, logits: Tensor, q_sizes: Tensor, k_sizes: Tensor, num_keys: int,
                force_q: Tensor | None, force_k: Tensor | None) -> Tensor:
        """`select_blocks` with this method's options; `num_keys` ranges set the per-row floor."""
        o = self.options
        return select_blocks(logits, q_sizes, k_sizes, self.sparsity, top_p=o.top_p,
                             min_blocks=max(1, math.ceil(o.min_kc_ratio * num_keys)), force_q=force_q,
                             force_k=force_k, budget_scope=o.budget_scope)


def _sizes(offsets: Tensor) -> Tensor:
    return offsets[..., 1:] - offsets[..., :-1]


def _last(n: int, device: torch.device) -> Tensor:
    """bool [n], True for the last range only."""
    return torch.arange(n, device=device) == n - 1


def _with_text(x: Tensor, km: KMeansResult, start: int, n: int) -> tuple[Tensor, Tensor, Tensor]:
    """(order, range offsets, range means) of x's tokens: the video tokens [start, start + n) sorted by
    cluster, then, for joint-attention models, every text token as one last range scored by its mean."""
    B, H, S, D = x.shape
    perm, off, means = km.perm + start, km.offsets, km.centroids
    if S == n:
        return perm, off, means
    pos = torch.arange(S - n, device=x.device)
    text_idx = torch.where(pos < start, pos, pos + n).expand(B, H, S - n)  # the tokens before and after
    end = torch.full((B, H, 1), S, dtype=off.dtype, device=x.device)
    text_mean = torch.gather(x, 2, text_idx[..., None].expand(B, H, S - n, D)).float().mean(2, keepdim=True)
    return torch.cat([perm, text_idx], -1), torch.cat([off, end], -1), torch.cat([means, text_mean], 2)


_AUTO_BLOCKS_FROM = 16384  # video tokens from which layout="auto" uses fixed blocks (CogVideoX, Wan, ...)
_FINE_CLUSTERS_BELOW = 8192  # video tokens below which the clusters layout takes `fine_clusters`


def _block_means(offsets: Tensor, centroids: Tensor, b0: Tensor, b1: Tensor) -> Tensor:
    """Mean vector of each fixed block [b0, b1) of a cluster-sorted order, from the cluster ranges
    `offsets` [B, H, K + 1] and their means `centroids` [B, H, K, D]: float32 [B, H, NB, D].

    A block's mean is the token-weighted mean of the centroids of the clusters it overlaps, which is
    exactly the mean of its tokens because each centroid is the mean of its cluster's members.
    """
    lo = offsets[..., :-1].unsqueeze(-2).long()  # [B, H, 1, K]
    hi = offsets[..., 1:].unsqueeze(-2).long()
    overlap = (torch.minimum(hi, b1[:, None]) - torch.maximum(lo, b0[:, None])).clamp_min(0).float()
    return torch.matmul(overlap, centroids.float()) / (b1 - b0)[:, None].float()
