"""tools/skip_headroom.py: both bounds it compares must bound the exact tile mass, and its skip rule must
keep every row's lost mass below the tolerance when driven by a bound."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

_PATH = Path(__file__).resolve().parents[2] / "tools" / "skip_headroom.py"
_spec = importlib.util.spec_from_file_location("skip_headroom", _PATH)
tool = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(tool)


@pytest.mark.parametrize("D", [64, 128])
def test_bounds_hold_and_the_tile_lse_bound_is_the_tighter(D):
    g = torch.Generator().manual_seed(D)
    S, block = 320, 32
    centres = torch.randn(6, D, generator=g) * 2.0
    q = centres[torch.randint(0, 6, (S,), generator=g)] + torch.randn(S, D, generator=g)
    k = centres[torch.randint(0, 6, (S,), generator=g)] + torch.randn(S, D, generator=g)
    row_tile, est = tool.estimates(q.double(), k.double(), block)
    assert torch.allclose(row_tile.sum(-1), torch.ones(S, dtype=torch.float64))  # rows' masses sum to 1
    exact = est["exact"]
    assert (est["tile-lse"] >= exact * (1 - 1e-9)).all() and (est["bound"] >= est["tile-lse"] * (1 - 1e-9)).all()
    assert (est["bound"] > est["tile-lse"] * 1.5).any()  # the n_tile factor is real slack
    for name in ("bound", "tile-lse", "exact"):
        for tol in (0.01, 0.1):
            skip = tool.skip_set(est[name], tol, max_skip=0.9)
            assert (skip.sum(-1) <= int(0.9 * skip.shape[-1])).all()
            lost = (row_tile.view(skip.shape[0], block, -1) * skip[:, None, :]).sum(-1)
            assert float(lost.max()) < tol, name  # bounds (and exact masses) keep every row within tol
