"""Per-layer tolerance calibration for the "skip" wrapper (`TileSkipCache`), saved as a small JSON file.

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

import dataclasses
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from dit_sparse.kernels import block_sparse_attention
from dit_sparse.kernels.result import AttentionResult

from .config import ConfigError
from .context import AttentionContext
from .method import SparseMethod
from .plan import BlockPlan
from .tile_skip import STATE_KEY, SkipState, TileSkipCache

Tensor = torch.Tensor

FORMAT = "dit-sparse/tile-skip-calibration"
VERSION = 1
DEFAULT_TOLERANCES = (0.005, 0.01, 0.02, 0.05, 0.1)


@dataclass
class SkipCalibration:
    """Per-layer measurements at each candidate tolerance, and the tolerance chosen per layer."""

    model_class: str
    method: str
    tolerances: list[float]
    layers: dict[str, dict[str, Any]]  # name -> {"error": [mean per tol], "max_error": [...], "skip": [...], "calls": n}
    chosen: dict[str, float] = field(default_factory=dict)
    target: dict[str, float] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)

    # ------------------------------------------------------------------ choosing
    def choose(self, target_error: float | None = None, target_skip: float | None = None) -> SkipCalibration:
        """A copy whose `chosen` tolerances meet one target (exactly one of the two must be given)."""
        if (target_error is None) == (target_skip is None):
            raise ConfigError("give exactly one of target_error (relative L2, e.g. 0.02) or target_skip (e.g. 0.5)")
        tols = self.tolerances
        chosen = {}
        for name, rec in self.layers.items():
            if target_error is not None:
                ok = [t for t, e in zip(tols, rec["error"]) if e <= target_error]
                chosen[name] = max(ok) if ok else 0.0
            else:
                ok = [t for t, s in zip(tols, rec["skip"]) if s >= target_skip]
                chosen[name] = min(ok) if ok else max(tols)
        target = {"error": target_error} if target_error is not None else {"skip": target_skip}
        return dataclasses.replace(self, chosen=chosen, target=target)

    def tol_for(self, layer_name: str) -> float | None:
        """Chosen tolerance of a layer, or None when the calibration did not see it."""
        return self.chosen.get(layer_name)

    def check_model(self, model_class: str, layer_names: Sequence[str] | None = None) -> None:
        """Raise ConfigError when this calibration was made for another model class."""
        if model_class != self.model_class:
            raise ConfigError(
                f"skip calibration was made for {self.model_class}, but the model is {model_class}: "
                f"run dit_sparse.skip_calibration.calibrate_skip on this model"
            )
        if layer_names is not None:
            unknown = [n for n in self.chosen if n not in set(layer_names)]
            if unknown:
                raise ConfigError(
                    f"skip calibration names layers this {model_class} does not have (e.g. {unknown[:3]}): "
                    f"it was made for a different configuration; recalibrate"
                )

    # ------------------------------------------------------------------ file
    def to_json(self) -> dict[str, Any]:
        return {"format": FORMAT, "version": VERSION, **dataclasses.asdict(self)}

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_json(), indent=1, sort_keys=True))

    @classmethod
    def from_json(cls, data: dict[str, Any], source: str = "<dict>") -> SkipCalibration:
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise ConfigError(f"{source} is not a dit-sparse skip calibration file (format {FORMAT!r})")
        if data.get("version") != VERSION:
            raise ConfigError(f"{source} has calibration version {data.get('version')!r}; this dit-sparse "
                              f"reads version {VERSION}: recalibrate")
        names = {f.name for f in dataclasses.fields(cls)}
        missing = sorted(n for n in ("model_class", "method", "tolerances", "layers") if n not in data)
        if missing:
            raise ConfigError(f"{source} lacks the field(s) {missing}")
        cal = cls(**{k: v for k, v in data.items() if k in names})
        for name, tol in cal.chosen.items():
            if not (isinstance(tol, (int, float)) and 0.0 <= tol < 1.0):
                raise ConfigError(f"{source}: tolerance of layer {name!r} must lie in [0, 1), got {tol!r}")
        return cal


def load_calibration(path: str | Path, model_class: str | None = None) -> SkipCalibration:
    """Read a calibration JSON file; with `model_class`, also check it was made for that model."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"skip calibration file {str(p)!r} does not exist; create it with calibrate_skip()")
    try:
        data = json.loads(p.read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(f"skip calibration file {str(p)!r} is not valid JSON: {exc}") from exc
    cal = SkipCalibration.from_json(data, source=str(p))
    if model_class is not None:
        cal.check_model(model_class)
    return cal


# ---------------------------------------------------------------------------------------------- recorder
def _rel_l2(a: Tensor, b: Tensor) -> Tensor:
    a, b = a.float(), b.float()
    return torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b).clamp_min(1e-30)


class SkipCalibrationRecorder(SparseMethod):
    """Stands in for a `TileSkipCache` during calibration: executes the base plan, shadows each tolerance.

    Not registered as a method; `calibrate_skip` swaps it into an applied handle. Usable directly, too:
    call `plan` and `observe` as the core does.
    """

    name = "_skip_calibration"
    wraps = True
    needs_lse = True
    needs_tile_stats = True

    def __init__(self, skip: TileSkipCache, tolerances: Sequence[float] = DEFAULT_TOLERANCES,
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
            ctx.state[STATE_KEY + ".calibration_call"] = (q, k, v, base_plan)
        return base_plan

    def observe(self, ctx: AttentionContext, plan: BlockPlan, result: AttentionResult) -> None:
        super().observe(ctx, plan, result)
        call = ctx.state.pop(STATE_KEY + ".calibration_call", None)
        if call is None:
            return
        q, k, v, base_plan = call
        shadows = ctx.state.setdefault(STATE_KEY + ".calibration", [SkipState() for _ in self.tolerances])
        rec = self.records.setdefault(ctx.layer_name, {
            "sum_error": [0.0] * len(self.tolerances), "max_error": [0.0] * len(self.tolerances),
            "sum_skip": [0.0] * len(self.tolerances), "calls": 0,
        })
        rec["calls"] += 1
        base_tiles = max(int(base_plan.kv_counts.sum()), 1)
        for i, (tol, state) in enumerate(zip(self.tolerances, shadows)):
            exec_plan = self.skip.refine(base_plan, state, tol)
            if exec_plan is base_plan:  # nothing skipped: the base result is this candidate's result
                res, err, share = result, 0.0, 0.0
            else:
                res = block_sparse_attention(q, k, v, exec_plan, scale=self.scale, return_lse=True,
                                             return_tile_stats=True, backend=self.backend)
                err = float(_rel_l2(res.out, result.out))
                share = 1.0 - int(exec_plan.kv_counts.sum()) / base_tiles
            self.skip.update(state, exec_plan, res)
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
    from .api import apply

    if not method.replace(" ", "").endswith("+skip"):
        raise ConfigError(f"calibrate_skip needs a method ending in '+skip' (e.g. 'full+skip'), got {method!r}")
    if (target_error is None) == (target_skip is None):
        raise ConfigError("give exactly one of target_error (relative L2, e.g. 0.02) or target_skip (e.g. 0.5)")
    if apply_kwargs.get("calibration") is not None:
        raise ConfigError("calibrate_skip makes a calibration file; do not pass calibration=")
    handle = apply(target, method, sparsity, **apply_kwargs)
    try:
        skip = handle.core.method
        if not isinstance(skip, TileSkipCache):
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


def summarize(cal: SkipCalibration) -> str:
    """One line per layer: chosen tol, and mean error / skip share at each candidate."""
    lines = [f"{cal.model_class} {cal.method} target {cal.target}"]
    for name, rec in cal.layers.items():
        cells = " ".join(f"{t:g}:{e:.3g}/{s:.2f}" for t, e, s in zip(cal.tolerances, rec["error"], rec["skip"]))
        tol = cal.chosen.get(name, math.nan)
        lines.append(f"{name}: tol={tol:g}  [tol:error/skip] {cells}")
    return "\n".join(lines)
