"""The report's pages: report.md and a self-contained report.html (figures embedded as base64 PNG) with the
same content, gathered once in a `PageContent`: run settings, commands, the results table, unavailable
metrics, the metric conventions and the figures."""

from __future__ import annotations

import base64
import html
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .metrics import Unavailable
from .report_table import Column, table_cells
from .report_values import jsonable

__all__ = ["METRIC_CONVENTIONS", "PageContent", "page_content", "write_html", "write_markdown"]

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

_TITLE = "dit-sparse: sparse vs dense quality and speed"
# The settings listed first, in this order; the other meta keys follow as given ("commands" has its block).
_META_FIRST = ("model", "device", "steps", "prompts", "seeds")

_HTML_STYLE = (
    "body{font-family:system-ui,sans-serif;margin:2em;max-width:1400px}"
    "table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #bbb;padding:3px 7px;"
    "text-align:right}td:first-child,th{text-align:left}th{background:#eee}"
    "pre{background:#f6f6f6;padding:8px;overflow-x:auto}img{max-width:100%;border:1px solid #ddd}"
)


@dataclass(frozen=True)
class PageContent:
    """What both pages show, as plain text (each writer escapes it for its markup)."""

    settings: list[tuple[str, str]]  # (meta key, value) in display order
    commands: list[str]  # command lines that made the results (may be empty)
    headers: list[str]  # results table column headers
    cells: list[list[str]]  # results table, one list of cell texts per row
    notes: list[str]  # one line per unavailable metric: the reason and how to fix it


def _settings(meta: dict[str, Any]) -> list[tuple[str, str]]:
    out = []
    for k in [*_META_FIRST, *(k for k in meta if k not in (*_META_FIRST, "commands"))]:
        if k in meta:
            v = meta[k]
            out.append((k, "; ".join(map(str, v)) if isinstance(v, (list, tuple)) else str(jsonable(v))))
    return out


def page_content(
    meta: dict[str, Any], rows: list[dict[str, Any]], cols: list[Column], notes: list[tuple[str, Unavailable]]
) -> PageContent:
    """The pages' content from the run's meta dict, the rows as reported, their columns and the
    unavailable metrics (column header, Unavailable)."""
    cmds = meta.get("commands")
    commands = [str(c) for c in (cmds if isinstance(cmds, (list, tuple)) else [cmds])] if cmds else []
    return PageContent(
        settings=_settings(meta),
        commands=commands,
        headers=[c[1] for c in cols],
        cells=table_cells(rows, cols),
        notes=[f"{h}: {u.reason}" + (f" — to fix: {u.how_to_fix}" if u.how_to_fix else "") for h, u in notes],
    )


def _md_cell(s: str) -> str:
    return s.replace("|", "\\|").replace("\n", " ")


def _md_row(cells: list[str]) -> str:
    return "| " + " | ".join(_md_cell(c) for c in cells) + " |"


def write_markdown(path: Path, page: PageContent, images: list[tuple[str, Path]]) -> None:
    """report.md: `page` and the figures (caption, PNG path), linked by file name (they sit beside it)."""
    lines = [f"# {_TITLE}", ""]
    lines += [f"- **{k}**: {v}" for k, v in page.settings]
    if page.commands:
        lines += ["", "Commands:", "", "```", *page.commands, "```"]
    lines += ["", "## Results", "", _md_row(page.headers), "|" + "|".join("---" for _ in page.headers) + "|"]
    lines += [_md_row(cells) for cells in page.cells]
    if page.notes:
        lines += ["", "### Unavailable metrics", ""] + [f"- {n}" for n in page.notes]
    lines += ["", "## Metric conventions", ""] + [f"- {c}" for c in METRIC_CONVENTIONS]
    lines += ["", "## Figures", ""]
    for caption, p in images:
        lines += [f"### {caption}", "", f"![{caption}]({p.name})", ""]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def write_html(path: Path, page: PageContent, images: list[tuple[str, Path]]) -> None:
    """report.html: `page` and the figures (caption, PNG path) embedded as base64 PNG, so that the file
    stands alone."""
    e = html.escape
    parts = [
        "<!DOCTYPE html><html><head><meta charset='utf-8'><title>dit-sparse report</title><style>",
        _HTML_STYLE,
        f"</style></head><body><h1>{_TITLE}</h1><ul>",
    ]
    parts += [f"<li><b>{e(k)}</b>: {e(v)}</li>" for k, v in page.settings]
    parts.append("</ul>")
    if page.commands:
        parts.append("<p>Commands:</p><pre>" + e("\n".join(page.commands)) + "</pre>")
    parts.append("<h2>Results</h2><table><tr>" + "".join(f"<th>{e(h)}</th>" for h in page.headers) + "</tr>")
    parts += ["<tr>" + "".join(f"<td>{e(c)}</td>" for c in cells) + "</tr>" for cells in page.cells]
    parts.append("</table>")
    if page.notes:
        parts.append("<h3>Unavailable metrics</h3><ul>")
        parts += [f"<li>{e(n)}</li>" for n in page.notes]
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
