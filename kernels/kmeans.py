"""Triton kernels of semantic's k-means (`dit_sparse.methods.semantic.kmeans`; GPU, and on CPU under
TRITON_INTERPRET=1).

A Lloyd step is: `assign` (nearest centroid of every point), a stable sort of the labels (PyTorch),
then `segment_sum` (per-cluster sums over the sorted tokens) and a division by the cluster sizes.

* `assign`: each program loads a tile of BLOCK_S points once and streams its problem's centroids
  through tensor-core dot products, keeping a running (min distance, argmin) per point. The [S, K]
  distance matrix never exists in memory.
* `segment_sum`: per-cluster sums over the sorted order, balanced whatever the cluster sizes: each
  program takes a fixed chunk of sorted positions (a few clusters, since the order is sorted by label),
  sums the rows of each cluster it holds and adds that partial sum to the cluster's total with one
  atomic add per (chunk, cluster). A program per cluster serialised on the largest cluster (3.4 ms per
  semantic plan on an H200 at Wan-1.3B's shape); a float32 prefix sum along the sequence (a scan over a
  non-innermost dimension) took 46 ms. The few atomic adds per address make the last bits of a centroid
  depend on the order in which chunks finish.

Launch settings: `python tools/sweep_kmeans.py` on an H200 (2026-12-01, Wan-1.3B's 12 x 32,760 x 128 bf16
points, 128 / 256 clusters; two runs, ~10% apart): assign with 128 clusters 0.069-0.070 ms at 128 points x
32 centroids, 4 warps (was 0.113 at 128 x 64, 8 warps); with 256 clusters 256 x 64, 8 warps was fastest in
both runs (0.098 / 0.110 ms; 128 x 64, 8 warps 0.104 / 0.110). segment_sum 0.050-0.055 ms with 2 warps
(was 0.073 / 0.080 with 4).
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - CPU installs without Triton use the PyTorch path
    triton = None

Tensor = torch.Tensor


def available() -> bool:
    """True when Triton is importable (the caller checks the device)."""
    return triton is not None


if triton is not None:

    @triton.jit
    def _assign_kernel(
        X, C, CN, LAB,
        S, K, H,
        stride_xb, stride_xh, stride_xs, stride_xd,
        D: tl.constexpr,
        BLOCK_S: tl.constexpr,
        BLOCK_K: tl.constexpr,
    ):
        pid_s = tl.program_id(0)
        n = tl.program_id(1)  # problem index b * H + h
        b = (n // H).to(tl.int64)  # batch offsets can pass 2^31 elements
        h = n % H
        offs_s = pid_s * BLOCK_S + tl.arange(0, BLOCK_S)
        offs_d = tl.arange(0, D)
        s_ok = offs_s < S
        x_ptrs = X + b * stride_xb + h * stride_xh + offs_s[:, None] * stride_xs + offs_d[None, :] * stride_xd
        x = tl.load(x_ptrs, mask=s_ok[:, None], other=0.0)

        best = tl.full([BLOCK_S], float("inf"), tl.float32)
        best_i = tl.zeros([BLOCK_S], dtype=tl.int32)
        c_base = C + n * K * D
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            k_ok = offs_k < K
            # Centroid tile loaded transposed ([D, BLOCK_K]) so the dot needs no in-register transpose.
            c = tl.load(c_base + offs_k[None, :] * D + offs_d[:, None], mask=k_ok[None, :], other=0.0)
            cn = tl.load(CN + n * K + offs_k, mask=k_ok, other=float("inf"))
            # |x - c|^2 = |x|^2 - 2 x.c + |c|^2; |x|^2 is the same for every centroid of a point.
            dist = cn[None, :] - 2.0 * tl.dot(x, c)
            m = tl.min(dist, axis=1)
            am = tl.argmin(dist, axis=1).to(tl.int32) + k0
            better = m < best
            best = tl.where(better, m, best)
            best_i = tl.where(better, am, best_i)
        tl.store(LAB + n * S + offs_s, best_i, mask=s_ok)


if triton is not None:

    @triton.jit
    def _segment_sum_kernel(
        X, PERM, LAB, SUMS,
        S, K, H,
        stride_xb, stride_xh, stride_xs, stride_xd,
        D: tl.constexpr,
        BLOCK_R: tl.constexpr,
    ):
        c = tl.program_id(0)  # chunk of BLOCK_R sorted positions
        n = tl.program_id(1)  # problem b * H + h
        b = (n // H).to(tl.int64)
        h = n % H
        rows = c * BLOCK_R + tl.arange(0, BLOCK_R)
        ok = rows < S
        tok = tl.load(PERM + n.to(tl.int64) * S + rows, mask=ok, other=0)
        lab = tl.load(LAB + n.to(tl.int64) * S + tok, mask=ok, other=-1)
        offs_d = tl.arange(0, D)
        x_ptrs = X + b * stride_xb + h * stride_xh + tok[:, None] * stride_xs + offs_d[None, :] * stride_xd
        x = tl.load(x_ptrs, mask=ok[:, None], other=0.0).to(tl.float32)
        # Sorted positions: the chunk holds the clusters first..last, each as one run. The bounds are scalar
        # loads of its first and last rows' labels (a reduction's result is not a loop bound everywhere:
        # Triton 3.6's interpreter rejects it).
        base = n.to(tl.int64) * S
        r_last = tl.minimum(c * BLOCK_R + BLOCK_R, S) - 1
        first = tl.load(LAB + base + tl.load(PERM + base + c * BLOCK_R))
        last = tl.load(LAB + base + tl.load(PERM + base + r_last))
        for j in range(first, last + 1):
            part = tl.sum(tl.where((lab == j)[:, None], x, 0.0), axis=0)
            tl.atomic_add(SUMS + (n.to(tl.int64) * K + j) * D + offs_d, part)


def segment_sum(x: Tensor, perm: Tensor, labels: Tensor, num_clusters: int, block_r: int = 64,
                num_warps: int = 2) -> Tensor:
    """Sum of each cluster's points: x [B, H, S, D] (any strides), `perm` [B, H, S] the token order sorted
    by `labels` [B, H, S] (int32, natural order). Returns float32 [B, H, K, D]."""
    _need_triton()
    B, H, S, D = x.shape
    sums = torch.zeros(B, H, num_clusters, D, dtype=torch.float32, device=x.device)
    grid = (triton.cdiv(S, block_r), B * H)
    _segment_sum_kernel[grid](
        x, perm.contiguous(), labels.contiguous(), sums, S, num_clusters, H, *x.stride(),
        D=D, BLOCK_R=block_r, num_warps=num_warps,
    )
    return sums


def _need_triton() -> None:
    if triton is None:
        raise RuntimeError("Triton is not installed; use dit_sparse.kmeans (it falls back to PyTorch)")


def assign(x: Tensor, centroids: Tensor, block_s: int | None = None, block_k: int | None = None,
           num_warps: int | None = None) -> Tensor:
    """Nearest centroid (int32 [B, H, S]) of every point of x [B, H, S, D] (any strides).

    Dot products run in x's dtype (bf16/fp16 tensor cores, tf32 for float32) with float32 accumulation;
    centroid norms are float32. Launch settings left as None follow the measured table (module docstring):
    128 points x 32 centroids per step and 4 warps up to 128 clusters, 256 x 64 and 8 warps above.
    """
    _need_triton()
    B, H, S, D = x.shape
    K = centroids.shape[2]
    few = K <= 128
    block_s = block_s or (128 if few else 256)
    block_k = block_k or (32 if few else 64)
    num_warps = num_warps or (4 if few else 8)
    c = centroids.reshape(B * H, K, D)
    c_norm = (c * c).sum(-1).contiguous()
    c_in = c.to(x.dtype).contiguous()
    labels = torch.empty(B, H, S, dtype=torch.int32, device=x.device)
    grid = (triton.cdiv(S, block_s), B * H)
    _assign_kernel[grid](
        x, c_in, c_norm, labels, S, K, H, *x.stride(),
        D=D, BLOCK_S=block_s, BLOCK_K=block_k, num_warps=num_warps,
    )
    return labels
