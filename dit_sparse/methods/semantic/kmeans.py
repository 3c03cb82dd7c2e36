"""Batched Lloyd k-means over many independent problems (one per (batch, head)), without host syncs.

All problems of a call are solved together: `x` is [B, H, S, D] and every (b, h) slice gets its own
`K` centroids. The iteration count is fixed (no convergence test that would read a value back to the
host), so a call costs the same every time and can be captured in a CUDA graph.

Distance is plain Euclidean on the raw vectors, not on normalised ones. Clustering exists to make
q.k nearly constant inside a (query cluster, key cluster) block, and |q.k - qc.k| <= |q - qc| |k|:
the Euclidean radius of a cluster is exactly what bounds the logit error. Normalising would merge
vectors of very different length, whose logits (and softmax weights) differ most.

A Lloyd step is: assign (nearest centroid), stable sort of the labels, per-cluster mean read through
the sort order. On CUDA with a power-of-two head dim, assignment and per-cluster sums are Triton
kernels (`dit_sparse.kernels.kmeans`; distances never reach HBM, sums balanced over fixed chunks of the
sorted order); elsewhere a batched PyTorch path runs the same maths. The last step's sort is returned:
it is the token permutation the attention plan uses.
Default seeds are tokens sampled at a fixed stride in natural order: deterministic, free, and spread
over the whole video because video tokens are laid out frame by frame; k-means++ seeding on a
subsample is available for cold starts (better on well-separated data, K sequential small steps).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dit_sparse.kernels import kmeans as kmeans_kernels

Tensor = torch.Tensor

_CPU_CHUNK = 4096  # tokens per distance block on the PyTorch path: keeps [chunk, K] small


@dataclass
class KMeansResult:
    """Result of `kmeans` for x of shape [B, H, S, D] and K clusters.

    centroids: float32 [B, H, K, D], the mean of each cluster's members under `labels` (an empty
        cluster keeps its previous centroid).
    labels: int32 [B, H, S], the nearest centroid of each point *before* the last update, i.e. the
        partition whose means are `centroids`.
    perm: int64 [B, H, S], token indices grouped by label (natural order inside a cluster).
    offsets: int32 [B, H, K + 1], cluster j occupies perm[..., offsets[j]:offsets[j + 1]].
    """

    centroids: Tensor
    labels: Tensor
    perm: Tensor
    offsets: Tensor

    @property
    def counts(self) -> Tensor:
        """Cluster sizes, int32 [B, H, K]."""
        return self.offsets[..., 1:] - self.offsets[..., :-1]


def strided_init(x: Tensor, num_clusters: int) -> Tensor:
    """Initial centroids: `num_clusters` tokens taken at evenly spaced positions (float32 [B, H, K, D])."""
    S = x.shape[2]
    if not 1 <= num_clusters <= S:
        raise ValueError(f"num_clusters must lie in [1, {S}] for a sequence of {S} tokens, got {num_clusters}")
    # Offset by half a stride so the first and last tokens (often borders/padding) are not both seeds.
    pos = ((torch.arange(num_clusters, device=x.device, dtype=torch.float64) + 0.5) * (S / num_clusters)).long()
    return x.index_select(2, pos.clamp_(max=S - 1)).float()


def kmeanspp_init(x: Tensor, num_clusters: int, sample: int = 4096, seed: int = 0) -> Tensor:
    """k-means++ seeding on a strided subsample of at most `sample` tokens (float32 [B, H, K, D]).

    Better seeds than `strided_init` when clusters are well separated (fewer merged clusters), at the
    price of K small sequential steps; deterministic for a given seed. Meant for cold starts only.
    """
    B, H, S, D = x.shape
    if not 1 <= num_clusters <= S:
        raise ValueError(f"num_clusters must lie in [1, {S}] for a sequence of {S} tokens, got {num_clusters}")
    m = max(min(S, sample), num_clusters)
    pos = (torch.arange(m, device=x.device, dtype=torch.float64) * (S / m)).long()
    pts = x.index_select(2, pos).float().reshape(B * H, m, D)
    gen = torch.Generator(device=x.device).manual_seed(seed)
    rows = torch.arange(B * H, device=x.device)
    centroids = torch.empty(B * H, num_clusters, D, dtype=torch.float32, device=x.device)
    centroids[:, 0] = pts[:, m // 2]
    d2 = ((pts - centroids[:, :1]) ** 2).sum(-1)
    for i in range(1, num_clusters):
        # D^2 sampling; the epsilon keeps the weights valid once every point coincides with a seed.
        pick = torch.multinomial(d2 + 1e-12, 1, generator=gen).squeeze(1)
        centroids[:, i] = pts[rows, pick]
        d2 = torch.minimum(d2, ((pts - centroids[:, i : i + 1]) ** 2).sum(-1))
    return centroids.reshape(B, H, num_clusters, D)


def _use_triton(x: Tensor) -> bool:
    D = x.shape[-1]
    if not x.is_cuda or D < 16 or D > 256 or D & (D - 1):
        return False
    return kmeans_kernels.available()


def _assign_torch(x: Tensor, centroids: Tensor) -> Tensor:
    """Nearest centroid of every point on the PyTorch path (all problems at once): int32 [B, H, S]."""
    B, H, S, D = x.shape
    K = centroids.shape[2]
    xf = x.reshape(B * H, S, D).float()
    c = centroids.reshape(B * H, K, D)
    c_norm = (c * c).sum(-1)  # [N, K]; |x|^2 does not change the argmin
    labels = torch.empty(B * H, S, dtype=torch.int32, device=x.device)
    for s0 in range(0, S, _CPU_CHUNK):
        dist = torch.baddbmm(c_norm[:, None, :], xf[:, s0 : s0 + _CPU_CHUNK], c.transpose(1, 2), alpha=-2.0)
        labels[:, s0 : s0 + _CPU_CHUNK] = dist.argmin(-1)
    return labels.reshape(B, H, S)


def _mean_torch(x: Tensor, labels: Tensor, counts: Tensor, old: Tensor) -> Tensor:
    """Per-cluster means on the PyTorch path; empty clusters keep `old`."""
    B, H, S, D = x.shape
    K = old.shape[2]
    flat = labels.long().reshape(B * H, S) + torch.arange(B * H, device=x.device)[:, None] * K
    sums = torch.zeros(B * H * K, D, dtype=torch.float32, device=x.device)
    # scatter_add_ with an expanded index: index_add_ is ~1000x slower on multi-threaded CPU here.
    sums.scatter_add_(0, flat.reshape(-1, 1).expand(-1, D), x.reshape(B * H * S, D).float())
    cnt = counts.reshape(B, H, K, 1).float()
    return torch.where(cnt > 0, sums.reshape(B, H, K, D) / cnt.clamp_min(1.0), old)


def sort_by_label(labels: Tensor, num_clusters: int) -> tuple[Tensor, Tensor]:
    """Permutation grouping tokens by cluster (stable: natural order inside a cluster) and range offsets.

    Returns perm int64 [B, H, S] (plan position -> token) and offsets int32 [B, H, K + 1].
    """
    *lead, S = labels.shape
    n = labels.numel() // max(S, 1)
    # One stable 1-D sort of (problem, label) keys instead of a batched sort along the last dim: the
    # problems stay in order, so each problem's tokens land in its own slice of S positions.
    # 16-bit keys where they fit: a radix sort makes one pass per key byte, so half the passes of int32
    # (Wan-1.3B: 12 heads x 256 clusters).
    kdt = torch.int16 if n * num_clusters < 2**15 else torch.int32
    problem = torch.arange(n, device=labels.device, dtype=torch.int32)[:, None]
    keys = (labels.reshape(n, S).to(torch.int32) + problem * num_clusters).reshape(-1).to(kdt)
    sorted_keys, order = torch.sort(keys, stable=True)
    perm = (order.reshape(n, S) - problem.long() * S).reshape(*lead, S)
    bounds = (torch.arange(num_clusters + 1, device=labels.device, dtype=torch.int32) + problem * num_clusters).to(kdt)
    offsets = torch.searchsorted(sorted_keys, bounds.reshape(-1), out_int32=True).reshape(n, num_clusters + 1)
    offsets = offsets - problem * S
    return perm, offsets.reshape(*lead, num_clusters + 1)


def lloyd_step(x: Tensor, centroids: Tensor) -> KMeansResult:
    """Assign every point to its nearest centroid, then move each centroid to its members' mean."""
    K = centroids.shape[2]
    if _use_triton(x):
        labels = kmeans_kernels.assign(x, centroids)
        perm, offsets = sort_by_label(labels, K)
        cnt = (offsets[..., 1:] - offsets[..., :-1])[..., None].float()
        sums = kmeans_kernels.segment_sum(x, perm, labels, K)
        new = torch.where(cnt > 0, sums / cnt.clamp_min(1.0), centroids.float())  # empty: keep the old one
    else:
        labels = _assign_torch(x, centroids)
        perm, offsets = sort_by_label(labels, K)
        new = _mean_torch(x, labels, offsets[..., 1:] - offsets[..., :-1], centroids)
    return KMeansResult(centroids=new, labels=labels, perm=perm, offsets=offsets)


def kmeans(
    x: Tensor,
    num_clusters: int,
    iters: int,
    init: Tensor | str = "strided",
) -> KMeansResult:
    """Batched Lloyd k-means of x [B, H, S, D] (any float dtype, any strides) with a fixed iteration count.

    Args:
        x: points; each (b, h) slice is an independent problem.
        num_clusters: K, ignored when `init` is given.
        iters: Lloyd iterations (>= 1); no early stop, so no host sync.
        init: float32 [B, H, K, D] starting centroids (warm start), or the seeding for a cold start:
            "strided" (`strided_init`) or "kmeans++" (`kmeanspp_init`).
    """
    if x.dim() != 4:
        raise ValueError(f"kmeans expects x of shape [B, H, S, D], got {tuple(x.shape)}")
    if iters < 1:
        raise ValueError(f"iters must be >= 1, got {iters}")
    if isinstance(init, str):
        if init not in ("strided", "kmeans++"):
            raise ValueError(f"init must be a centroid tensor, 'strided' or 'kmeans++', got {init!r}")
        centroids = strided_init(x, num_clusters) if init == "strided" else kmeanspp_init(x, num_clusters)
    else:
        if init.shape[:2] != x.shape[:2] or init.shape[-1] != x.shape[-1]:
            raise ValueError(f"init centroids {tuple(init.shape)} do not match points {tuple(x.shape)}")
        centroids = init.float()
    result = None
    for _ in range(iters):
        result = lloyd_step(x, centroids)
        centroids = result.centroids
    assert result is not None
    return result


def inertia(x: Tensor, result: KMeansResult) -> Tensor:
    """Sum of squared distances of each point to the centroid of its label: float32 [B, H]."""
    lab = result.labels.long()[..., None].expand(-1, -1, -1, x.shape[-1])
    c = torch.gather(result.centroids, 2, lab)
    return ((x.float() - c) ** 2).sum((-1, -2))
