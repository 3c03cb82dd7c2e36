"""The report's results table: which columns it shows, the rows as reported (nested metrics lifted,
speed-up filled in), the text of every cell, the metrics that were unavailable and each row's sparsity
label. Shared by the Markdown and HTML pages and the figures."""

from __future__ import annotations

from typing import Any

import numpy as np

from .metrics import Unavailable
from .report_values import format_value, read_value

__all__ = [
    "COLUMNS",
    "Column",
    "fill_speedup",
    "flat_row",
    "sparsity_label",
    "table_cells",
    "table_columns",
    "unavailable_notes",
]

Column = tuple[str, str, str]  # (row key, column header, format kind of report_values.format_value)

COLUMNS: list[Column] = [
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
# Row keys that hold figures or nested metrics, never a column of their own.
_NOT_COLUMNS = {"frames", "vbench", "metrics"}


def flat_row(row: dict[str, Any]) -> dict[str, Any]:
    """Row with nested metric dicts ("vbench", "metrics": {id: value}) lifted to the top level."""
    out = dict(row)
    for nest in ("metrics", "vbench"):
        inner = row.get(nest)
        if isinstance(inner, dict):
            for k, v in inner.items():
                out.setdefault(k, v)
    return out


def fill_speedup(rows: list[dict[str, Any]]) -> None:
    """Set a missing "speedup" to dense total time / row total time, where a "dense" row has a total time."""
    dense = [r for r in rows if str(r.get("method", "")).lower() == "dense"]
    t_dense = read_value(dense[0].get("total_time_s"))[0] if dense else None
    for r in rows:
        if r.get("speedup") is None and t_dense:
            t = read_value(r.get("total_time_s"))[0]
            if t:
                r["speedup"] = t_dense / t


def table_columns(rows: list[dict[str, Any]]) -> list[Column]:
    """The known columns some row has a value for, in `COLUMNS` order, then every other scalar or
    metric-entry key of the rows (in order of appearance, format kind "auto")."""
    known = [c for c in COLUMNS if any(r.get(c[0]) is not None for r in rows)]
    names = {c[0] for c in COLUMNS}
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


def table_cells(rows: list[dict[str, Any]], cols: list[Column]) -> list[list[str]]:
    """Cell text of every row (one list per row, one string per column), not yet escaped for a page."""
    return [[format_value(r.get(k), kind) for k, _, kind in cols] for r in rows]


def unavailable_notes(rows: list[dict[str, Any]], cols: list[Column]) -> list[tuple[str, Unavailable]]:
    """(column header, Unavailable) for each distinct reason a shown metric is missing, first seen first."""
    seen: dict[tuple[str, str], Unavailable] = {}
    for r in rows:
        for key, header, _ in cols:
            _, un = read_value(r.get(key))
            if un is not None:
                seen.setdefault((header, un.reason), un)
    return [(h, u) for (h, _), u in seen.items()]


def sparsity_label(r: dict[str, Any]) -> str:
    """A row's sparsity for titles and plot labels, e.g. 's=0.90 (0.87 achieved)': the achieved sparsity is
    shown where it differs from the requested one; "" when the row has neither."""
    s, _ = read_value(r.get("sparsity"))
    a, _ = read_value(r.get("achieved_sparsity"))
    if s is None and a is None:
        return ""
    txt = f"s={s:.2f}" if s is not None else ""
    if a is not None and (s is None or abs(a - s) > 5e-3):
        txt += f" ({a:.2f} achieved)" if txt else f"s={a:.2f} achieved"
    return txt
