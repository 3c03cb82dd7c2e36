"""The report's figures (matplotlib, written as PNG): the quality-vs-speed plot with its Pareto front, and
one dense-vs-sparse frame comparison with a difference heat-map per frames entry."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import numpy as np

from .report_table import sparsity_label
from .report_values import read_value

__all__ = ["frame_figure", "pareto_plot"]


def _plt():
    import matplotlib

    matplotlib.use("Agg")  # no display; must precede pyplot's first import in this process
    import matplotlib.pyplot as plt

    return plt


def _pareto_front(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Points not beaten in both speed-up and PSNR, sorted by speed-up."""
    front, best = [], -math.inf
    for x, y in sorted(points, key=lambda p: (-p[0], -p[1])):
        if y > best:
            front.append((x, y))
            best = y
    return sorted(front)


def pareto_plot(rows: list[dict[str, Any]], path: Path) -> None:
    """PSNR against speed-up, one line per method (dense rows and rows without a finite PSNR left out),
    with the Pareto front over all methods, written as a PNG to `path`."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7.5, 5), dpi=120)
    series: dict[str, list[tuple[float, float, str]]] = {}
    for r in rows:
        x, _ = read_value(r.get("speedup"))
        y, _ = read_value(r.get("psnr"))
        if str(r["method"]).lower() == "dense" or x is None or y is None or not math.isfinite(y):
            continue
        series.setdefault(str(r["method"]), []).append((x, y, sparsity_label(r)))
    allpts = []
    for method, pts in series.items():
        pts.sort()
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=method)
        for x, y, lab in pts:
            if lab:
                ax.annotate(lab, (x, y), textcoords="offset points", xytext=(5, 4), fontsize=7)
        allpts += [(p[0], p[1]) for p in pts]
    if len(allpts) > 1:
        front = _pareto_front(allpts)
        ax.plot(
            [p[0] for p in front], [p[1] for p in front], ls="--", color="0.6", lw=1, label="Pareto front"
        )
    ax.axvline(1.0, color="0.3", ls=":", lw=1, label="dense (speed-up 1, PSNR inf)")
    if not allpts:
        ax.text(
            0.5,
            0.5,
            "no rows with both speed-up and finite PSNR",
            transform=ax.transAxes,
            ha="center",
            va="center",
        )
    ax.set_xlabel("speed-up vs dense (x)")
    ax.set_ylabel("PSNR vs dense video (dB)")
    ax.set_title("Quality vs speed")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, format="png")
    plt.close(fig)


def _load_frames(src: Any, what: str) -> np.ndarray:
    """Frames [F, H, W, 3] float32 in [0, 1] from a .npy path, a torch tensor or an array ([H, W, 3]: one
    frame)."""
    if isinstance(src, (str, os.PathLike)):
        p = Path(src).expanduser()
        if not p.is_file():
            raise FileNotFoundError(
                f"{what}: frames file {p} not found (expected a .npy [F, H, W, 3] in [0, 1])"
            )
        arr = np.load(p)
    elif hasattr(src, "detach"):  # torch tensor
        arr = src.detach().float().cpu().numpy()
    else:
        arr = np.asarray(src)
    arr = arr.astype(np.float32)
    if arr.ndim == 3:
        arr = arr[None]
    if arr.ndim != 4 or arr.shape[-1] != 3:
        raise ValueError(f"{what}: frames must be [F, H, W, 3] or [H, W, 3] in [0, 1], got {arr.shape}")
    return np.clip(arr, 0.0, 1.0)


def frame_figure(item: dict[str, Any], title: str, path: Path) -> None:
    """Dense frame, sparse frame (with its PSNR) and their difference heat-map, one figure row per frame
    index of `item` ("dense", "sparse", optional "indices"; default first, middle and last), as a PNG."""
    dense = _load_frames(item.get("dense"), f"{title} (dense)")
    sparse = _load_frames(item.get("sparse"), f"{title} (sparse)")
    if dense.shape != sparse.shape:
        raise ValueError(
            f"{title}: dense frames {dense.shape} and sparse frames {sparse.shape} differ in shape"
        )
    n = dense.shape[0]
    idx = item.get("indices")
    idx = sorted({0, n // 2, n - 1}) if idx is None else [int(i) for i in idx]
    if any(not -n <= i < n for i in idx):
        raise ValueError(f"{title}: frame indices {idx} out of range for {n} frames")
    diffs = [np.abs(dense[i] - sparse[i]).mean(-1) for i in idx]
    vmax = max(float(max(d.max() for d in diffs)), 1e-6)  # one colour scale for every row
    plt = _plt()
    h, w = dense.shape[1:3]
    cw = 3.2
    fig, axes = plt.subplots(
        len(idx), 3, figsize=(3 * cw + 0.8, len(idx) * cw * h / w + 0.8), dpi=110, squeeze=False
    )
    for row, (i, d) in enumerate(zip(idx, diffs)):
        mse = float(np.mean((dense[i] - sparse[i]) ** 2))
        p = "inf" if mse == 0 else f"{-10 * math.log10(mse):.1f} dB"
        axes[row, 0].imshow(dense[i])
        axes[row, 0].set_title(f"dense, frame {i}", fontsize=8)
        axes[row, 1].imshow(sparse[i])
        axes[row, 1].set_title(f"sparse, frame {i} (PSNR {p})", fontsize=8)
        im = axes[row, 2].imshow(d, cmap="inferno", vmin=0, vmax=vmax)
        axes[row, 2].set_title("|dense - sparse| (mean over RGB)", fontsize=8)
        fig.colorbar(im, ax=axes[row, 2], fraction=0.046, pad=0.02)
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, format="png")
    plt.close(fig)
