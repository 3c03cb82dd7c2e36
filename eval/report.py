"""Quality-vs-speed report: results dict -> results.json, report.md, report.html (self-contained, images
embedded as base64 PNG), pareto.png and side-by-side frame figures.

``results`` layout (extra keys are kept and shown where sensible)::

    {
      "meta": {"model": ..., "device": ..., "prompts": [...], "seeds": [...], "steps": 50,
               "commands": ["dit-sparse ..."], ...},
      "rows": [
        {"method": "dense", "sparsity": 0.0, "total_time_s": 100.0, ...},
        {"method": "tiles", "sparsity": 0.9, "achieved_sparsity": 0.87,
         "psnr": 27.1, "ssim": 0.88, "lpips": 0.12 | Unavailable | metric_entry dict,
         "vbench": {"temporal_flickering": 0.97, ...}   # or the same keys directly in the row
         "adherence": 0.31,                               # optional
         "attention_time_s": 40.0, "total_time_s": 60.0, "speedup": 1.67,
         "frames": {"dense": "dense.npy" | array, "sparse": ... | array, "indices": [0, 40, 80]}},
      ],
      "frames": [{"title": ..., "dense": ..., "sparse": ..., "indices": [...]}],   # optional
    }

Metric values may be numbers, None, ``float('inf')``, `Unavailable` objects or `metric_entry` dicts
(what `compare_videos` returns). A missing ``speedup`` is filled in as dense total time / row total time
when a row with method "dense" has a total time. In results.json non-finite numbers are written as the
strings "inf", "-inf", "nan" so the file is strict JSON; video arrays are not stored there.
"""

from __future__ import annotations

import base64
import html
import json
import math
import os
import re
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from .metrics import Unavailable

__all__ = ["write_report", "ensure_writable", "OutputDirError", "METRIC_CONVENTIONS"]

METRIC_CONVENTIONS = [
    "Every sparse video is compared with the dense video generated from the same prompt, seed and "
    "settings. Videos are float RGB frames in [0, 1].",
    "PSNR: per frame with peak 1.0 (10·log10(1/MSE) over all pixels and channels), then the mean over "
    "frames, then over videos. 'inf (identical)' means the frames are bit-identical to the dense ones.",
    "SSIM: Gaussian window 11x11, sigma 1.5, K1 = 0.01, K2 = 0.03, data range 1, population covariances, "
    "computed per RGB channel and averaged, over valid (unpadded) window positions, mean over frames "
    "(equals scikit-image structural_similarity(gaussian_weights=True, sigma=1.5, "
    "use_sample_covariance=False, data_range=1, channel_axis=-1)). Not a box-window SSIM.",
    "LPIPS: the `lpips` package with its pretrained linear heads and a pretrained ImageNet backbone "
    "found locally; inputs scaled from [0, 1] to [-1, 1] as the package expects; mean over frames; lower "
    "is better. When the package or the backbone weights are missing it is reported as unavailable, "
    "never computed with a random backbone.",
    "VBench-style (no reference, on the sparse video, frames quantised to uint8): temporal flickering "
    "uses VBench's formula; motion smoothness uses VBench's formula with a Farneback-flow frame "
    "interpolator instead of AMT; dynamic degree uses Farneback optical flow instead of RAFT, with "
    "VBench's thresholds scaled to the video size (1 = dynamic); subject/background consistency need "
    "DINO/CLIP weights locally and are unavailable otherwise. These are not VBench scores.",
    "Times: attention_time_s is the time inside attention calls (CUDA events on GPU); total_time_s is the "
    "wall time of the generation; speedup = dense total time / method total time unless given.",
]

# (row key, column header, format kind)
_COLUMNS: list[tuple[str, str, str]] = [
    ("method", "method", "text"),
    ("sparsity", "sparsity", "ratio"),
    ("achieved_sparsity", "achieved sparsity", "ratio"),
    ("psnr", "PSNR (dB) ↑", "psnr"),
    ("ssim", "SSIM ↑", "score"),
    ("lpips", "LPIPS ↓", "score"),
    ("temporal_flickering", "temporal flickering ↑", "score"),
    ("motion_smoothness", "motion smoothness (Farneback) ↑", "score"),
    ("dynamic_degree", "dynamic degree (Farneback)", "score"),
    ("subject_consistency", "subject consistency ↑", "score"),
    ("background_consistency", "background consistency ↑", "score"),
    ("adherence", "adherence ↑", "score"),
    ("attention_time_s", "attention time (s)", "time"),
    ("total_time_s", "total time (s)", "time"),
    ("speedup", "speed-up vs dense", "speedup"),
]
_NOT_COLUMNS = {"frames", "vbench", "metrics"}


class OutputDirError(OSError):
    """The report folder cannot be created or written."""


# ------------------------------------------------------------------------------------------ values


def _value(v: Any) -> tuple[float | None, Unavailable | None]:
    """(number or None, Unavailable or None) from a number / Unavailable / metric_entry dict / string."""
    if isinstance(v, Unavailable):
        return None, v
    if isinstance(v, dict):
        if v.get("unavailable"):
            return None, Unavailable(str(v["unavailable"]), str(v.get("how_to_fix", "")))
        return _value(v.get("value"))
    if isinstance(v, str) and v.strip().lower() in ("inf", "+inf", "-inf", "nan"):
        return float(v), None
    if isinstance(v, (bool, np.bool_)):
        return float(v), None
    if isinstance(v, (int, float, np.integer, np.floating)):
        return float(v), None
    if hasattr(v, "item") and getattr(v, "ndim", 1) == 0:  # 0-d torch / numpy
        return float(v.item()), None
    return None, None


def _fmt(v: Any, kind: str) -> str:
    if kind == "text":
        return "" if v is None else str(v)
    x, un = _value(v)
    if un is not None:
        return str(un)
    if x is None:
        return "" if v is None else str(v)
    if math.isnan(x):
        return "nan"
    if math.isinf(x):
        return "inf (identical)" if kind == "psnr" and x > 0 else ("inf" if x > 0 else "-inf")
    return {
        "ratio": f"{x:.3f}",
        "psnr": f"{x:.2f}",
        "score": f"{x:.4f}",
        "time": f"{x:.3f}",
        "speedup": f"{x:.2f}x",
    }.get(kind, f"{x:.4g}")


def _flat_row(row: dict[str, Any]) -> dict[str, Any]:
    """Row with nested metric dicts ("vbench", "metrics": {id: value}) lifted to the top level."""
    out = dict(row)
    for nest in ("metrics", "vbench"):
        inner = row.get(nest)
        if isinstance(inner, dict):
            for k, v in inner.items():
                out.setdefault(k, v)
    return out


def _fill_speedup(rows: list[dict[str, Any]]) -> None:
    dense = [r for r in rows if str(r.get("method", "")).lower() == "dense"]
    t_dense = _value(dense[0].get("total_time_s"))[0] if dense else None
    for r in rows:
        if r.get("speedup") is None and t_dense:
            t = _value(r.get("total_time_s"))[0]
            if t:
                r["speedup"] = t_dense / t


def _columns(rows: list[dict[str, Any]]) -> list[tuple[str, str, str]]:
    known = [c for c in _COLUMNS if any(r.get(c[0]) is not None for r in rows)]
    names = {c[0] for c in _COLUMNS}
    extra: list[str] = []
    for r in rows:
        for k, v in r.items():
            if k in names or k in _NOT_COLUMNS or k in extra:
                continue
            if isinstance(v, (str, int, float, np.number, Unavailable)) or (
                isinstance(v, dict) and "value" in v
            ):
                extra.append(k)
    return known + [(k, k, "auto") for k in extra]


def _jsonable(obj: Any) -> Any:
    """Strict-JSON form: Unavailable -> dict, non-finite floats -> strings, arrays -> a short note."""
    if isinstance(obj, Unavailable):
        return obj.to_dict()
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        x = float(obj)
        return x if math.isfinite(x) else ("nan" if math.isnan(x) else ("inf" if x > 0 else "-inf"))
    if hasattr(obj, "shape") and hasattr(obj, "dtype"):  # numpy / torch arrays
        if getattr(obj, "ndim", 1) == 0:
            return _jsonable(obj.item())
        return f"<array shape={tuple(obj.shape)} dtype={obj.dtype}, not stored>"
    if obj is None or isinstance(obj, str):
        return obj
    return str(obj)


# --------------------------------------------------------------------------------------- validation


def ensure_writable(out_dir: str | os.PathLike) -> Path:
    """Create the report folder `out_dir` if needed and check a file can be written in it; returns it as a
    Path, else raises OutputDirError saying what to do."""
    p = Path(out_dir).expanduser()
    try:
        p.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputDirError(
            f"cannot create the report folder {p}: {e.strerror or e}; pass an out_dir you can write to"
        ) from e
    try:
        with tempfile.NamedTemporaryFile(dir=p, prefix=".write_test_"):
            pass
    except OSError as e:
        raise OutputDirError(
            f"the report folder {p} is not writable: {e.strerror or e}; fix its permissions or pass "
            "another out_dir"
        ) from e
    return p


def _validate(results: Any) -> None:
    if not isinstance(results, dict):
        raise TypeError(f"results must be a dict with 'meta' and 'rows', got {type(results).__name__}")
    rows = results.get("rows")
    if not isinstance(rows, list) or not rows:
        raise ValueError("results['rows'] must be a non-empty list of dicts (one per method and sparsity)")
    for i, r in enumerate(rows):
        if not isinstance(r, dict) or not r.get("method"):
            raise ValueError(f"results['rows'][{i}] must be a dict with a 'method' name, got {r!r:.200}")
    if not isinstance(results.get("meta", {}), dict):
        raise ValueError("results['meta'] must be a dict (model, device, prompts, seeds, steps, commands)")


# ------------------------------------------------------------------------------------------ figures


def _plt():
    import matplotlib

    matplotlib.use("Agg")  # no display; must precede pyplot's first import in this process
    import matplotlib.pyplot as plt

    return plt


def _label_sparsity(r: dict[str, Any]) -> str:
    s, _ = _value(r.get("sparsity"))
    a, _ = _value(r.get("achieved_sparsity"))
    if s is None and a is None:
        return ""
    txt = f"s={s:.2f}" if s is not None else ""
    if a is not None and (s is None or abs(a - s) > 5e-3):
        txt += f" ({a:.2f} achieved)" if txt else f"s={a:.2f} achieved"
    return txt


def _pareto_front(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Points not beaten in both speed-up and PSNR, sorted by speed-up."""
    front, best = [], -math.inf
    for x, y in sorted(points, key=lambda p: (-p[0], -p[1])):
        if y > best:
            front.append((x, y))
            best = y
    return sorted(front)


def _pareto_plot(rows: list[dict[str, Any]], path: Path) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7.5, 5), dpi=120)
    series: dict[str, list[tuple[float, float, str]]] = {}
    for r in rows:
        x, _ = _value(r.get("speedup"))
        y, _ = _value(r.get("psnr"))
        if str(r["method"]).lower() == "dense" or x is None or y is None or not math.isfinite(y):
            continue
        series.setdefault(str(r["method"]), []).append((x, y, _label_sparsity(r)))
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


def _frame_figure(item: dict[str, Any], title: str, path: Path) -> None:
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
    vmax = max(float(max(d.max() for d in diffs)), 1e-6)
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


def _slug(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", s).strip("_")[:60] or "item"


# ------------------------------------------------------------------------------------------- writers


def _meta_lines(meta: dict[str, Any]) -> list[tuple[str, str]]:
    out = []
    for k in ["model", "device", "steps", "prompts", "seeds"] + [
        k for k in meta if k not in ("model", "device", "steps", "prompts", "seeds", "commands")
    ]:
        if k in meta:
            v = meta[k]
            out.append((k, "; ".join(map(str, v)) if isinstance(v, (list, tuple)) else str(_jsonable(v))))
    return out


def _unavailable_notes(
    rows: list[dict[str, Any]], cols: list[tuple[str, str, str]]
) -> list[tuple[str, Unavailable]]:
    seen: dict[tuple[str, str], Unavailable] = {}
    for r in rows:
        for key, header, _ in cols:
            _, un = _value(r.get(key))
            if un is not None:
                seen.setdefault((header, un.reason), un)
    return [(h, u) for (h, _), u in seen.items()]


def _md_cell(s: str) -> str:
    return s.replace("|", "\\|").replace("\n", " ")


def _write_md(
    path: Path,
    meta: dict[str, Any],
    rows,
    cols,
    images: list[tuple[str, str]],
    notes: list[tuple[str, Unavailable]],
) -> None:
    lines = ["# dit-sparse: sparse vs dense quality and speed", ""]
    for k, v in _meta_lines(meta):
        lines.append(f"- **{k}**: {v}")
    cmds = meta.get("commands")
    if cmds:
        lines += (
            ["", "Commands:", "", "```"]
            + [str(c) for c in (cmds if isinstance(cmds, (list, tuple)) else [cmds])]
            + ["```"]
        )
    lines += ["", "## Results", ""]
    lines.append("| " + " | ".join(_md_cell(c[1]) for c in cols) + " |")
    lines.append("|" + "|".join("---" for _ in cols) + "|")
    for r in rows:
        lines.append("| " + " | ".join(_md_cell(_fmt(r.get(k), kind)) for k, _, kind in cols) + " |")
    if notes:
        lines += ["", "### Unavailable metrics", ""]
        lines += [
            f"- {h}: {u.reason}" + (f" — to fix: {u.how_to_fix}" if u.how_to_fix else "") for h, u in notes
        ]
    lines += ["", "## Metric conventions", ""] + [f"- {c}" for c in METRIC_CONVENTIONS]
    lines += ["", "## Figures", ""]
    for caption, fname in images:
        lines += [f"### {caption}", "", f"![{caption}]({fname})", ""]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def _write_html(
    path: Path,
    meta: dict[str, Any],
    rows,
    cols,
    images: list[tuple[str, Path]],
    notes: list[tuple[str, Unavailable]],
) -> None:
    e = html.escape
    parts = [
        "<!DOCTYPE html><html><head><meta charset='utf-8'><title>dit-sparse report</title><style>",
        "body{font-family:system-ui,sans-serif;margin:2em;max-width:1400px}"
        "table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #bbb;padding:3px 7px;"
        "text-align:right}td:first-child,th{text-align:left}th{background:#eee}"
        "pre{background:#f6f6f6;padding:8px;overflow-x:auto}img{max-width:100%;border:1px solid #ddd}",
        "</style></head><body><h1>dit-sparse: sparse vs dense quality and speed</h1><ul>",
    ]
    parts += [f"<li><b>{e(k)}</b>: {e(v)}</li>" for k, v in _meta_lines(meta)]
    parts.append("</ul>")
    cmds = meta.get("commands")
    if cmds:
        cmds = cmds if isinstance(cmds, (list, tuple)) else [cmds]
        parts.append("<p>Commands:</p><pre>" + e("\n".join(map(str, cmds))) + "</pre>")
    parts.append("<h2>Results</h2><table><tr>" + "".join(f"<th>{e(c[1])}</th>" for c in cols) + "</tr>")
    for r in rows:
        parts.append("<tr>" + "".join(f"<td>{e(_fmt(r.get(k), kind))}</td>" for k, _, kind in cols) + "</tr>")
    parts.append("</table>")
    if notes:
        parts.append("<h3>Unavailable metrics</h3><ul>")
        parts += [
            f"<li>{e(h)}: {e(u.reason)}" + (f" — to fix: {e(u.how_to_fix)}" if u.how_to_fix else "") + "</li>"
            for h, u in notes
        ]
        parts.append("</ul>")
    parts.append(
        "<h2>Metric conventions</h2><ul>" + "".join(f"<li>{e(c)}</li>" for c in METRIC_CONVENTIONS) + "</ul>"
    )
    parts.append("<h2>Figures</h2>")
    for caption, p in images:
        b64 = base64.b64encode(p.read_bytes()).decode("ascii")
        parts.append(f"<h3>{e(caption)}</h3><img alt='{e(caption)}' src='data:image/png;base64,{b64}'>")
    parts.append("</body></html>")
    path.write_text("\n".join(parts) + "\n", encoding="utf-8")


def write_report(results: dict[str, Any], out_dir: str | os.PathLike) -> dict[str, Path]:
    """Write results.json, report.md, report.html (self-contained), pareto.png and one side-by-side
    figure per frames entry into ``out_dir`` (created if needed). Returns {name: path}.

    Raises `OutputDirError` when ``out_dir`` cannot be created or written, ValueError/TypeError for a
    malformed ``results`` (see the module docstring for its layout).
    """
    _validate(results)
    out = ensure_writable(out_dir)
    meta = results.get("meta", {}) or {}
    rows = [_flat_row(r) for r in results["rows"]]
    _fill_speedup(rows)
    cols = _columns(rows)
    written: dict[str, Path] = {}

    pareto = out / "pareto.png"
    _pareto_plot(rows, pareto)
    written["pareto.png"] = pareto
    images: list[tuple[str, Path]] = [("Quality vs speed (PSNR vs speed-up)", pareto)]

    items: list[tuple[str, dict[str, Any]]] = []
    for r in rows:
        if isinstance(r.get("frames"), dict):
            lab = _label_sparsity(r)
            items.append((f"{r['method']} {lab}".strip(), r["frames"]))
    for j, it in enumerate(results.get("frames") or []):
        if not isinstance(it, dict):
            raise ValueError(f"results['frames'][{j}] must be a dict with 'dense' and 'sparse'")
        items.append((str(it.get("title") or it.get("method") or f"frames {j}"), it))
    for j, (title, it) in enumerate(items):
        f = out / f"frames_{j:02d}_{_slug(title)}.png"
        _frame_figure(it, f"Dense vs sparse: {title}", f)
        written[f.name] = f
        images.append((f"Dense vs sparse frames and difference heat-map: {title}", f))

    notes = _unavailable_notes(rows, cols)
    stored = dict(results)
    # Rows as reported: nested metrics lifted to the top level, speed-up filled in.
    stored["rows"] = [{k: v for k, v in r.items() if k not in ("vbench", "metrics")} for r in rows]
    stored["report_files"] = sorted(written) + ["report.md", "report.html", "results.json"]
    stored["metric_conventions"] = METRIC_CONVENTIONS
    (out / "results.json").write_text(
        json.dumps(_jsonable(stored), indent=2, allow_nan=False) + "\n", encoding="utf-8"
    )
    written["results.json"] = out / "results.json"
    _write_md(out / "report.md", meta, rows, cols, [(c, p.name) for c, p in images], notes)
    written["report.md"] = out / "report.md"
    _write_html(out / "report.html", meta, rows, cols, images, notes)
    written["report.html"] = out / "report.html"
    return written
