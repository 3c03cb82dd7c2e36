"""Launch settings of the k-means Triton kernels (`dit_sparse.kernels.kmeans`) on one GPU, timed one by one.

Times `assign` (block of points, block of centroids, warps) and `segment_sum` (rows per program, warps)
on [B, H, S, D] bf16 points with the cluster counts semantic uses at that length (Wan2.1-1.3B 480p by
default: 12 heads x 32,760 tokens, 128 query / 256 key clusters), next to the defaults, and prints the
fastest. What it finds goes into the kernels' defaults by hand, with the figure in the commit.

    python tools/sweep_kmeans.py [--heads 12 --tokens 32760 --dim 128]
"""

from __future__ import annotations

import argparse
import itertools

import torch
from dit_sparse.kernels.kmeans import assign, segment_sum

from dit_sparse.methods.semantic.kmeans import sort_by_label
from dit_sparse.methods.semantic.method import default_clusters


def _ms(fn, reps: int = 50) -> float:
    for _ in range(5):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / reps


def _sweep(x: torch.Tensor, K: int) -> None:
    """Time every launch setting of both kernels for K clusters and print the three fastest."""
    c = x[:, :, :: x.shape[2] // K][:, :, :K].float().contiguous()
    base = _ms(lambda: assign(x, c))
    rows = []
    for bs, bk, w in itertools.product((64, 128, 256), (32, 64, 128), (4, 8)):
        try:
            rows.append((_ms(lambda bs=bs, bk=bk, w=w: assign(x, c, block_s=bs, block_k=bk, num_warps=w)),
                         f"block_s={bs} block_k={bk} warps={w}"))
        except Exception as exc:  # out of shared memory / registers: not a candidate
            rows.append((float("inf"), f"block_s={bs} block_k={bk} warps={w}: {type(exc).__name__}"))
    rows.sort()
    print(f"assign K={K}: default {base:.4f} ms; best: " + "; ".join(f"{ms:.4f} {n}" for ms, n in rows[:3]))
    labels = assign(x, c)
    perm, _ = sort_by_label(labels, K)
    base = _ms(lambda: segment_sum(x, perm, labels, K))
    rows = []
    for br, w in itertools.product((32, 64, 128, 256), (2, 4, 8)):
        try:
            rows.append((_ms(lambda br=br, w=w: segment_sum(x, perm, labels, K, block_r=br, num_warps=w)),
                         f"block_r={br} warps={w}"))
        except Exception as exc:
            rows.append((float("inf"), f"block_r={br} warps={w}: {type(exc).__name__}"))
    rows.sort()
    print(f"segment_sum K={K}: default {base:.4f} ms; best: " + "; ".join(f"{ms:.4f} {n}" for ms, n in rows[:3]))
    print(f"sort_by_label K={K}: {_ms(lambda: sort_by_label(labels, K)):.4f} ms")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--tokens", type=int, default=32760)
    p.add_argument("--dim", type=int, default=128)
    ns = p.parse_args(argv)
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(1, ns.tokens, ns.heads, ns.dim, device="cuda", generator=g, dtype=torch.bfloat16)
    x = x.transpose(1, 2)  # [B, H, S, D] view of Diffusers' layout, as semantic gets it
    print(f"{torch.cuda.get_device_name()}: x {tuple(x.shape)} bf16")
    for K in default_clusters(ns.tokens):
        _sweep(x, K)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
