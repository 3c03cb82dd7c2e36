"""Per-layer tolerance calibration of the skip cache: choosing, the JSON file, one run on a tiny Wan."""

import dataclasses
import json

import pytest
import torch

import dit_sparse
from dit_sparse.config import ConfigError
from dit_sparse.methods.skip.calibrate import calibrate_skip
from dit_sparse.methods.skip.calibration import SkipCalibration, load_calibration, summarize


def _table():
    return SkipCalibration(
        model_class="WanTransformer3DModel",
        method="full+skip",
        tolerances=[0.01, 0.02, 0.05],
        layers={
            "blocks.0.attn1": {"error": [0.001, 0.004, 0.03], "max_error": [0.002, 0.01, 0.05],
                               "skip": [0.2, 0.4, 0.7], "calls": 4},
            "blocks.1.attn1": {"error": [0.02, 0.03, 0.04], "max_error": [0.03, 0.04, 0.05],
                               "skip": [0.05, 0.1, 0.2], "calls": 4},
        },
    )


def test_choose_by_error_or_by_skip_share():
    by_err = _table().choose(target_error=0.01)
    assert by_err.chosen == {"blocks.0.attn1": 0.02, "blocks.1.attn1": 0.0}  # none fits -> no skipping
    assert by_err.target == {"error": 0.01}
    by_skip = _table().choose(target_skip=0.3)
    assert by_skip.chosen == {"blocks.0.attn1": 0.02, "blocks.1.attn1": 0.05}  # none reaches -> largest
    with pytest.raises(ConfigError, match="exactly one"):
        _table().choose()
    with pytest.raises(ConfigError, match="exactly one"):
        _table().choose(target_error=0.1, target_skip=0.5)


def test_json_round_trip_and_clear_errors(tmp_path):
    cal = _table().choose(target_error=0.01)
    path = tmp_path / "skip.json"
    cal.save(path)
    back = load_calibration(path, model_class="WanTransformer3DModel")
    assert back == cal
    assert back.tol_for("blocks.0.attn1") == 0.02 and back.tol_for("blocks.9.attn1") is None
    assert "blocks.1.attn1: tol=0" in summarize(back)
    with pytest.raises(ConfigError, match="made for WanTransformer3DModel, but the model is FluxTransformer2DModel"):
        load_calibration(path, model_class="FluxTransformer2DModel")
    with pytest.raises(ConfigError, match="layers this WanTransformer3DModel does not have"):
        back.check_model("WanTransformer3DModel", ["blocks.0.attn1"])
    data = json.loads(path.read_text())
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({**data, "version": 99}))
    with pytest.raises(ConfigError, match="version 99"):
        load_calibration(bad)
    bad.write_text(json.dumps({"format": "something else"}))
    with pytest.raises(ConfigError, match="not a dit-sparse skip calibration file"):
        load_calibration(bad)
    bad.write_text(json.dumps({**data, "chosen": {"blocks.0.attn1": 2.0}}))
    with pytest.raises(ConfigError, match=r"must lie in \[0, 1\)"):
        load_calibration(bad)
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_calibration(bad)


@torch.no_grad()
def test_calibrate_on_tiny_wan_then_apply_the_file(tmp_path, coherent_tiny_wan):
    model, x, e = coherent_tiny_wan()
    ts = [900.0, 800.0, 700.0, 600.0]
    ref = [model(x, torch.tensor([t]), e, return_dict=False)[0] for t in ts]
    outs = []

    def run():
        outs[:] = [model(x, torch.tensor([t]), e, return_dict=False)[0] for t in ts]

    path = tmp_path / "skip.json"
    cal = calibrate_skip(model, run, "full+skip", 0.5, tolerances=(1e-6, 0.02, 0.3), target_error=0.01,
                         path=path, warmup_steps=0, warmup_layers=0, backend="reference", recheck_every=3)
    assert not hasattr(model, "_dit_sparse_handle")  # removed after the run
    # The model followed the base plan (here: dense), so every candidate saw the same inputs.
    assert max(float((o - r).norm() / r.norm()) for o, r in zip(outs, ref)) < 1e-4
    assert set(cal.layers) == {"blocks.0.attn1", "blocks.1.attn1"}
    for rec in cal.layers.values():
        assert rec["calls"] == len(ts)
        assert rec["skip"][0] <= rec["skip"][1] <= rec["skip"][2] and rec["skip"][2] > 0.2
        assert rec["error"][0] < 1e-5  # a tiny tolerance skips (almost) nothing
        assert all(e <= m + 1e-12 for e, m in zip(rec["error"], rec["max_error"]))
    assert set(cal.chosen.values()) <= {0.0, 1e-6, 0.02, 0.3}
    assert load_calibration(path) == cal
    assert cal.settings["recheck_every"] == 3

    # Per-layer tolerances from a file: layer 0 never skips, layer 1 does.
    forced = dataclasses.replace(cal, chosen={"blocks.0.attn1": 0.0, "blocks.1.attn1": 0.3})
    forced.save(path)
    handle = dit_sparse.apply(model, "full+skip", 0.5, warmup_steps=0, warmup_layers=0, backend="reference",
                              calibration=str(path))
    handle.method.bind_model(model, ["blocks.0.attn1", "blocks.1.attn1"])
    for t in ts:
        model(x, torch.tensor([t]), e)
    share = handle.method.skip_stats()["per_layer"]
    assert share["blocks.0.attn1"] == 0.0 and share["blocks.1.attn1"] > 0.2
    with pytest.raises(ConfigError, match="made for WanTransformer3DModel"):
        handle.method.bind_model(torch.nn.Linear(2, 2))
    handle.remove()


def test_calibrate_rejects_bad_requests(coherent_tiny_wan):
    model, _, _ = coherent_tiny_wan()
    with pytest.raises(ConfigError, match="ending in '\\+skip'"):
        calibrate_skip(model, lambda: None, "full", target_error=0.01)
    with pytest.raises(ConfigError, match="exactly one"):
        calibrate_skip(model, lambda: None, "full+skip")
    with pytest.raises(ConfigError, match="no sparse attention call"):
        calibrate_skip(model, lambda: None, "full+skip", target_skip=0.5)
    assert not hasattr(model, "_dit_sparse_handle")
