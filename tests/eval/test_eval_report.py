"""write_report: all files written, HTML self-contained, strict JSON, clear errors."""

from __future__ import annotations

import base64
import json
import os
import re

import numpy as np
import pytest
import torch
from dit_sparse.eval.metrics import Unavailable
from dit_sparse.eval.report import OutputDirError, write_report
from dit_sparse.eval.report_figures import _pareto_front


def _results(tmp_path, with_frames=True):
    rng = np.random.default_rng(0)
    dense = rng.uniform(0, 1, (5, 24, 32, 3)).astype(np.float32)
    sparse = np.clip(dense + rng.normal(0, 0.05, dense.shape), 0, 1).astype(np.float32)
    np.save(tmp_path / "dense.npy", dense)
    np.save(tmp_path / "sparse.npy", sparse)
    rows = [
        {
            "method": "dense",
            "sparsity": 0.0,
            "psnr": float("inf"),
            "ssim": 1.0,
            "total_time_s": 12.0,
            "attention_time_s": 8.0,
        },
        {
            "method": "tiles",
            "sparsity": 0.5,
            "achieved_sparsity": 0.47,
            "psnr": 31.2,
            "ssim": 0.93,
            "lpips": Unavailable("the 'lpips' package is not installed", "pip install lpips"),
            "vbench": {"temporal_flickering": 0.97, "motion_smoothness": 0.99, "dynamic_degree": 1.0},
            "attention_time_s": 4.0,
            "total_time_s": 8.0,
            "frames": {"dense": str(tmp_path / "dense.npy"), "sparse": str(tmp_path / "sparse.npy")},
        },
        {
            "method": "tiles",
            "sparsity": 0.8,
            "psnr": {"name": "PSNR", "value": 27.5, "unit": "dB"},
            "ssim": np.float32(0.88),
            "lpips": {"value": None, "unavailable": "no weights", "how_to_fix": "x"},
            "total_time_s": 6.0,
            "adherence": 0.3,
        },
        {
            "method": "radial",
            "sparsity": 0.8,
            "psnr": 28.0,
            "ssim": 0.9,
            "total_time_s": 7.0,
            "speedup": 1.7,
            "frames": {"dense": torch.from_numpy(dense), "sparse": sparse, "indices": [1, 3]},
        },
    ]
    meta = {
        "model": "tiny-wan",
        "device": "cpu",
        "prompts": ["a red fox <b>"],
        "seeds": [0, 1],
        "steps": 4,
        "commands": ["dit-sparse generate --sparsity 0.5"],
    }
    res = {"meta": meta, "rows": rows}
    if not with_frames:
        for r in rows:
            r.pop("frames", None)
    return res


def _images(html: str) -> list[bytes]:
    return [base64.b64decode(m) for m in re.findall(r"data:image/png;base64,([A-Za-z0-9+/=]+)", html)]


def test_write_report_writes_everything(tmp_path):
    out = tmp_path / "report" / "nested"
    written = write_report(_results(tmp_path), out)
    for name in ("results.json", "report.md", "report.html", "pareto.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0
        assert name in written
    frame_figs = sorted(out.glob("frames_*.png"))
    assert len(frame_figs) == 2
    for p in [out / "pareto.png", *frame_figs]:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    html = (out / "report.html").read_text()
    imgs = _images(html)
    assert len(imgs) == 3 and all(i[:8] == b"\x89PNG\r\n\x1a\n" for i in imgs)
    assert (out / "pareto.png").read_bytes() in imgs
    # self-contained: every src is a data URI, no links to files
    assert all(s.startswith("data:") for s in re.findall(r"src='([^']*)'", html))
    assert "a red fox <b>" not in html  # user text is escaped
    assert "a red fox &lt;b&gt;" in html

    md = (out / "report.md").read_text()
    assert "Gaussian window 11x11" in md and "[-1, 1]" in md
    assert "inf (identical)" in md
    assert "unavailable: the 'lpips' package is not installed" in md
    assert "unavailable: no weights" in md
    assert "dit-sparse generate --sparsity 0.5" in md
    assert "1.50x" in md and "2.00x" in md and "1.70x" in md  # filled from dense time; given kept
    assert "0.9700" in md  # nested vbench metrics shown
    assert "adherence" in md

    data = json.loads((out / "results.json").read_text(), parse_constant=lambda c: pytest.fail(c))
    assert data["rows"][0]["psnr"] == "inf"
    assert data["rows"][1]["lpips"]["unavailable"].startswith("the 'lpips'")
    assert data["rows"][1]["speedup"] == pytest.approx(1.5)
    assert data["rows"][1]["temporal_flickering"] == 0.97
    assert "not stored" in data["rows"][3]["frames"]["dense"]
    assert data["meta"]["model"] == "tiny-wan"


def test_report_without_frames_or_plottable_points(tmp_path):
    res = {"meta": {}, "rows": [{"method": "dense", "total_time_s": 1.0}]}
    write_report(res, tmp_path / "r")
    assert len(_images((tmp_path / "r" / "report.html").read_text())) == 1
    write_report(_results(tmp_path, with_frames=False), tmp_path / "r2")
    assert not list((tmp_path / "r2").glob("frames_*.png"))


def test_unwritable_dir_raises_clear_error(tmp_path):
    blocker = tmp_path / "file.txt"
    blocker.write_text("x")
    with pytest.raises(OutputDirError, match="cannot create the report folder"):
        write_report(_results(tmp_path, with_frames=False), blocker / "sub")


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root ignores permission bits")
def test_read_only_dir_raises_clear_error(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        with pytest.raises(OutputDirError, match="not writable"):
            write_report(_results(tmp_path, with_frames=False), ro)
    finally:
        ro.chmod(0o700)


def test_bad_results_raise(tmp_path):
    with pytest.raises(ValueError, match="non-empty list"):
        write_report({"meta": {}, "rows": []}, tmp_path)
    with pytest.raises(ValueError, match="'method'"):
        write_report({"rows": [{"psnr": 1.0}]}, tmp_path)
    with pytest.raises(TypeError):
        write_report([1, 2], tmp_path)
    bad = {"rows": [{"method": "x", "frames": {"dense": str(tmp_path / "nope.npy"), "sparse": "y.npy"}}]}
    with pytest.raises(FileNotFoundError, match="nope.npy"):
        write_report(bad, tmp_path / "o")


def test_pareto_front():
    pts = [(1.5, 30.0), (2.0, 25.0), (1.8, 31.0), (3.0, 20.0), (2.5, 19.0)]
    assert _pareto_front(pts) == [(1.8, 31.0), (2.0, 25.0), (3.0, 20.0)]
