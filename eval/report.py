"""Quality-vs-speed report: results dict -> results.json, report.md, report.html (self-contained, images
embedded as base64 PNG), pareto.png and side-by-side frame figures.

This module checks the input and the output folder and writes the files; what goes into them lives
beside it: `report_values` (one metric value read, formatted, made JSON), `report_table` (columns, rows
as reported, cell text), `report_figures` (the PNG figures) and `report_pages` (report.md, report.html
and the metric conventions they state).

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

import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any

from .report_figures import frame_figure, pareto_plot
from .report_pages import METRIC_CONVENTIONS, page_content, write_html, write_markdown
from .report_table import fill_speedup, flat_row, sparsity_label, table_columns, unavailable_notes
from .report_values import jsonable

__all__ = ["write_report", "ensure_writable", "OutputDirError"]


class OutputDirError(OSError):
    """The report folder cannot be created or written."""


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


def _slug(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", s).strip("_")[:60] or "item"


def _frame_items(results: dict[str, Any], rows: list[dict[str, Any]]) -> list[tuple[str, dict[str, Any]]]:
    """(title, frames entry) of every side-by-side figure: the rows' own "frames", then results["frames"]."""
    items: list[tuple[str, dict[str, Any]]] = []
    for r in rows:
        if isinstance(r.get("frames"), dict):
            lab = sparsity_label(r)
            items.append((f"{r['method']} {lab}".strip(), r["frames"]))
    for j, it in enumerate(results.get("frames") or []):
        if not isinstance(it, dict):
            raise ValueError(f"results['frames'][{j}] must be a dict with 'dense' and 'sparse'")
        items.append((str(it.get("title") or it.get("method") or f"frames {j}"), it))
    return items


def write_report(results: dict[str, Any], out_dir: str | os.PathLike) -> dict[str, Path]:
    """Write results.json, report.md, report.html (self-contained), pareto.png and one side-by-side
    figure per frames entry into ``out_dir`` (created if needed). Returns {name: path}.

    Raises `OutputDirError` when ``out_dir`` cannot be created or written, ValueError/TypeError for a
    malformed ``results`` (see the module docstring for its layout).
    """
    _validate(results)
    out = ensure_writable(out_dir)
    meta = results.get("meta", {}) or {}
    rows = [flat_row(r) for r in results["rows"]]
    fill_speedup(rows)
    cols = table_columns(rows)
    written: dict[str, Path] = {}

    pareto = out / "pareto.png"
    pareto_plot(rows, pareto)
    written["pareto.png"] = pareto
    images: list[tuple[str, Path]] = [("Quality vs speed (PSNR vs speed-up)", pareto)]
    for j, (title, it) in enumerate(_frame_items(results, rows)):
        f = out / f"frames_{j:02d}_{_slug(title)}.png"
        frame_figure(it, f"Dense vs sparse: {title}", f)
        written[f.name] = f
        images.append((f"Dense vs sparse frames and difference heat-map: {title}", f))

    page = page_content(meta, rows, cols, unavailable_notes(rows, cols))
    stored = dict(results)
    # Rows as reported: nested metrics lifted to the top level, speed-up filled in.
    stored["rows"] = [{k: v for k, v in r.items() if k not in ("vbench", "metrics")} for r in rows]
    stored["report_files"] = sorted(written) + ["report.md", "report.html", "results.json"]
    stored["metric_conventions"] = METRIC_CONVENTIONS
    (out / "results.json").write_text(
        json.dumps(jsonable(stored), indent=2, allow_nan=False) + "\n", encoding="utf-8"
    )
    written["results.json"] = out / "results.json"
    write_markdown(out / "report.md", page, images)
    written["report.md"] = out / "report.md"
    write_html(out / "report.html", page, images)
    written["report.html"] = out / "report.html"
    return written
