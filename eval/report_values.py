"""One metric value of a report, read and written: whatever a results row holds for a metric (a number,
None, ``float('inf')``, an `Unavailable`, a `metric_entry` dict, a 0-d array or the strings "inf"/"nan")
as a number or the reason it is missing (`read_value`), as the text of a table cell (`format_value`) and as
strict JSON (`jsonable`)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from .metrics import Unavailable

__all__ = ["format_value", "jsonable", "read_value"]

# Cell text of a finite number per column kind (see report_table.COLUMNS); unknown kinds get 4 digits.
_NUMBER_FORMATS = {
    "ratio": "{:.3f}",
    "psnr": "{:.2f}",
    "score": "{:.4f}",
    "time": "{:.3f}",
    "speedup": "{:.2f}x",
}


def read_value(v: Any) -> tuple[float | None, Unavailable | None]:
    """(number or None, Unavailable or None) from a number / Unavailable / metric_entry dict / string."""
    if isinstance(v, Unavailable):
        return None, v
    if isinstance(v, dict):
        if v.get("unavailable"):
            return None, Unavailable(str(v["unavailable"]), str(v.get("how_to_fix", "")))
        return read_value(v.get("value"))
    if isinstance(v, str) and v.strip().lower() in ("inf", "+inf", "-inf", "nan"):
        return float(v), None
    if isinstance(v, (bool, np.bool_)):
        return float(v), None
    if isinstance(v, (int, float, np.integer, np.floating)):
        return float(v), None
    if hasattr(v, "item") and getattr(v, "ndim", 1) == 0:  # 0-d torch / numpy
        return float(v.item()), None
    return None, None


def format_value(v: Any, kind: str) -> str:
    """Table-cell text of `v` in a column of format `kind` ("text", "ratio", "psnr", "score", "time",
    "speedup" or anything else for a generic number); an infinite PSNR reads "inf (identical)"."""
    if kind == "text":
        return "" if v is None else str(v)
    x, un = read_value(v)
    if un is not None:
        return str(un)
    if x is None:
        return "" if v is None else str(v)
    if math.isnan(x):
        return "nan"
    if math.isinf(x):
        return "inf (identical)" if kind == "psnr" and x > 0 else ("inf" if x > 0 else "-inf")
    return _NUMBER_FORMATS.get(kind, "{:.4g}").format(x)


def jsonable(obj: Any) -> Any:
    """Strict-JSON form: Unavailable -> dict, non-finite floats -> strings, arrays -> a short note."""
    if isinstance(obj, Unavailable):
        return obj.to_dict()
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
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
            return jsonable(obj.item())
        return f"<array shape={tuple(obj.shape)} dtype={obj.dtype}, not stored>"
    if obj is None or isinstance(obj, str):
        return obj
    return str(obj)
