"""Triton kernels for `dit_sparse.kmeans` (GPU; they also run on CPU under TRITON_INTERPRET=1).

A Lloyd step is: `assign` (nearest centroid of every point), a stable sort of the labels (PyTorch),
then `dit_sparse.kmeans.segment_means` (prefix sums over the sorted tokens).

* `assign`: each program loads a tile of BLOCK_S points once and streams its problem's centroids
  through tensor-core dot products, keeping a running (min distance, argmin) per point. The [S, K]
  distance matrix never exists in memory.
* Means are not a kernel of this file: a kernel per (problem, cluster) serialised on the largest cluster
  (3.4 ms per semantic plan on an H200 at Wan-1.3B's shape, clusters of uneven sizes); prefix sums over
  the sorted tokens are balanced. Float atomics inside `assign` were slower still (contended).
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


def _need_triton() -> None:
    if triton is None:
        raise RuntimeError("Triton is not installed; use dit_sparse.kmeans (it falls back to PyTorch)")


def assign(x: Tensor, centroids: Tensor, block_s: int = 128, block_k: int = 64, num_warps: int = 8) -> Tensor:
    """Nearest centroid (int32 [B, H, S]) of every point of x [B, H, S, D] (any strides).

    Dot products run in x's dtype (bf16/fp16 tensor cores, tf32 for float32) with float32 accumulation;
    centroid norms are float32.
    """
    _need_triton()
    B, H, S, D = x.shape
    K = centroids.shape[2]
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
