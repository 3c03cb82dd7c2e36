"""The skip calibration file: per-layer measurements at candidate tolerances and the `tol` chosen per
layer (`SkipCalibration`), read by the "skip" wrapper's `calibration=` option. `calibrate.py` makes one."""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dit_sparse.config import ConfigError

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


def summarize(cal: SkipCalibration) -> str:
    """One line per layer: chosen tol, and mean error / skip share at each candidate."""
    lines = [f"{cal.model_class} {cal.method} target {cal.target}"]
    for name, rec in cal.layers.items():
        cells = " ".join(f"{t:g}:{e:.3g}/{s:.2f}" for t, e, s in zip(cal.tolerances, rec["error"], rec["skip"]))
        tol = cal.chosen.get(name, math.nan)
        lines.append(f"{name}: tol={tol:g}  [tol:error/skip] {cells}")
    return "\n".join(lines)
