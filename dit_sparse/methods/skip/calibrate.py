"""Per-layer tolerance calibration for the "skip" wrapper (`SkipCache`), saved as a small JSON file
(`calibration.py`).

One calibration run replays the real skip cache at several candidate tolerances side by side ("shadow"
caches), while the model itself follows the base method's plan (no skipping), so every candidate sees the
same inputs. For every sparse call and candidate it records the relative L2 error of the attention output
against the base plan's output (for ``"full+skip"`` that is dense attention) and the share of base tiles
skipped. Then, per layer, it picks the largest tolerance whose mean error stays within `target_error`
(0, i.e. no skipping, if none does), or the smallest whose mean skip share reaches `target_skip` (the
largest if none does).

    cal = calibrate_skip(pipe, lambda: pipe(**kwargs), "full+skip", target_error=0.02, path="skip.json")
    dit_sparse.apply(pipe, "full+skip", 0.5, calibration="skip.json")
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from dit_sparse.api import apply
from dit_sparse.config import ConfigError
from dit_sparse.context import AttentionContext
from dit_sparse.kernels import block_sparse_attention
from dit_sparse.kernels.result import AttentionResult
from dit_sparse.method import SparseMethod
from dit_sparse.plan import BlockPlan
from dit_sparse.state import LayerState

from .cache import SkipState
from .calibration import DEFAULT_TOLERANCES, SkipCalibration
from .method import SkipCache

Tensor = torch.Tensor


# ---------------------------------------------------------------------------------------------- recorder
def _rel_l2(a: Tensor, b: Tensor) -> Tensor:
    a, b = a.float(), b.float()
    return torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b).clamp_min(1e-30)


@dataclass
class CalibrationState(LayerState):
    """One layer and branch: the call awaiting its result, and one shadow skip cache per tolerance."""

    call: tuple | None = field(default=None, repr=False)  # (q, k, v, base plan) of the planned call
    shadows: list[SkipState] | None = None


class SkipCalibrationRecorder(SparseMethod):
    """Stands in for a `SkipCache` during calibration: executes the base plan, shadows each tolerance.

    Not registered as a method; `calibrate_skip` swaps it into an applied handle. Usable directly, too:
    call `plan` and `observe` as the core does.
    """

    name = "_skip_calibration"
    State = CalibrationState
    wraps = True
    needs_lse = True
    needs_tile_stats = True

    def __init__(self, skip: SkipCache, tolerances: Sequence[float] = DEFAULT_TOLERANCES,
                 backend: str = "auto", scale: float | None = None) -> None:
        super().__init__(skip.sparsity, skip.options, base=skip.base)
        tols = sorted(float(t) for t in tolerances)
        if not tols or tols[0] <= 0.0 or tols[-1] >= 1.0:
            raise ConfigError(f"calibration tolerances must lie in (0, 1), got {list(tolerances)}")
        self.skip = skip
        self.tolerances = tols
        self.backend = backend
        self.scale = scale
        # name -> [sum error, max error, sum skip share] per tolerance, and call count
        self.records: dict[str, dict[str, Any]] = {}

    def plan(self, q: Tensor, k: Tensor, v: Tensor, ctx: AttentionContext) -> BlockPlan | None:
        assert self.base is not None
        base_plan = self.base.plan(q, k, v, ctx)
        if base_plan is not None:
            self.state_of(ctx).call = (q, k, v, base_plan)
        return base_plan

    def observe(self, ctx: AttentionContext, plan: BlockPlan, result: AttentionResult) -> None:
        super().observe(ctx, plan, result)
        state: CalibrationState = self.state_of(ctx)
        call, state.call = state.call, None
        if call is None:
            return
        q, k, v, base_plan = call
        if state.shadows is None:
            state.shadows = [SkipState() for _ in self.tolerances]
        rec = self.records.setdefault(ctx.layer_name, {
            "sum_error": [0.0] * len(self.tolerances), "max_error": [0.0] * len(self.tolerances),
            "sum_skip": [0.0] * len(self.tolerances), "calls": 0,
        })
        rec["calls"] += 1
        base_tiles = max(int(base_plan.kv_counts.sum()), 1)
        for i, (tol, shadow) in enumerate(zip(self.tolerances, state.shadows)):
            exec_plan = self.skip.refine(base_plan, shadow, tol)
            if exec_plan is base_plan:  # nothing skipped: the base result is this candidate's result
                res, err, share = result, 0.0, 0.0
            else:
                res = block_sparse_attention(q, k, v, exec_plan, scale=self.scale, return_lse=True,
                                             return_tile_stats=True, backend=self.backend)
                err = float(_rel_l2(res.out, result.out))
                share = 1.0 - int(exec_plan.kv_counts.sum()) / base_tiles
            self.skip.update(shadow, exec_plan, res)
            rec["sum_error"][i] += err
            rec["max_error"][i] = max(rec["max_error"][i], err)
            rec["sum_skip"][i] += share

    def calibration(self, model_class: str, method: str) -> SkipCalibration:
        """The measurements so far as a `SkipCalibration` (nothing chosen yet)."""
        layers = {}
        for name, rec in self.records.items():
            n = max(rec["calls"], 1)
            layers[name] = {
                "error": [s / n for s in rec["sum_error"]],
                "max_error": list(rec["max_error"]),
                "skip": [s / n for s in rec["sum_skip"]],
                "calls": rec["calls"],
            }
        opts = self.skip.options
        settings = {"recheck_every": opts.recheck_every, "max_skip": opts.max_skip,
                    "drift_threshold": opts.drift_threshold, "reference": "base plan output"}
        return SkipCalibration(model_class=model_class, method=method, tolerances=list(self.tolerances),
                               layers=layers, settings=settings)


# ---------------------------------------------------------------------------------------------- driver
def calibrate_skip(
    target: Any,
    run: Callable[[], Any],
    method: str = "full+skip",
    sparsity: float = 0.5,
    *,
    tolerances: Sequence[float] = DEFAULT_TOLERANCES,
    target_error: float | None = None,
    target_skip: float | None = None,
    path: str | Path | None = None,
    **apply_kwargs: Any,
) -> SkipCalibration:
    """Calibrate the per-layer `tol` of a ``"X+skip"`` method from one run of `run()` (e.g. one generation).

    Args:
        target: the pipeline or transformer (as for `dit_sparse.apply`).
        run: callable doing one denoising run of `target`; its output is discarded.
        method, sparsity, **apply_kwargs: as for `dit_sparse.apply` (warm-up, backend, method options);
            `method` must end in "+skip".
        tolerances: candidate tolerances, each in (0, 1).
        target_error / target_skip: exactly one: a mean relative L2 error of the attention output vs the
            base plan's output, or a mean share of base tiles skipped.
        path: where to save the JSON file (optional).
    """
    if not method.replace(" ", "").endswith("+skip"):
        raise ConfigError(f"calibrate_skip needs a method ending in '+skip' (e.g. 'full+skip'), got {method!r}")
    if (target_error is None) == (target_skip is None):
        raise ConfigError("give exactly one of target_error (relative L2, e.g. 0.02) or target_skip (e.g. 0.5)")
    if apply_kwargs.get("calibration") is not None:
        raise ConfigError("calibrate_skip makes a calibration file; do not pass calibration=")
    handle = apply(target, method, sparsity, **apply_kwargs)
    try:
        skip = handle.core.method
        if not isinstance(skip, SkipCache):
            raise ConfigError(f"method {method!r} does not end in the skip wrapper")
        recorder = SkipCalibrationRecorder(skip, tolerances, backend=handle.core.backend)
        handle.core.method = recorder
        with torch.no_grad():
            run()
    finally:
        handle.remove()
    if not recorder.records:
        raise ConfigError("the calibration run made no sparse attention call (all warm-up?); lower warmup_steps "
                          "or run more steps")
    cal = recorder.calibration(type(handle.transformer).__name__, method)
    cal = cal.choose(target_error=target_error, target_skip=target_skip)
    if path is not None:
        cal.save(path)
    return cal
