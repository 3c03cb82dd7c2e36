import json

from dit_sparse.pipelines import generate as gen


def test_default_method_is_the_committed_evaluations_best_at_0_9():
    rows = json.loads(gen.EVAL_RESULTS.read_text())["rows"]
    at = {r["method"]: r["psnr"] for r in rows if r.get("sparsity") == 0.9 and r.get("psnr") and "+" not in r["method"]}
    assert max(at, key=at.get) == gen.DEFAULT_METHOD


def test_summary_quotes_the_committed_evaluation_labelled_as_such():
    text = gen.committed_quality("bundled", "window3d", 0.9)
    assert "committed evaluation" in text and "21.53 dB" in text and "not this run" in text
    assert "8 held-out prompts" in text and "first 30% of steps dense" in text  # the protocol, with the figure
    assert "NVIDIA H200" in text
    assert "20.30 dB" in gen.committed_quality("bundled", "pooled", 0.9)
    assert "22.45 dB" in gen.committed_quality("bundled", gen.DEFAULT_METHOD, 0.9)
    assert gen.committed_quality("tiny", "window3d", 0.9) is None
    assert gen.committed_quality("bundled", "window3d", 0.8) is None
    assert gen.committed_quality("bundled", "semantic+skip", 0.9) is None  # not in the committed evaluation


def test_summary_quotes_committed_times_for_this_device_labelled_as_such(tmp_path, monkeypatch):
    times = tmp_path / "main-command.json"
    times.write_text(json.dumps({"runs": [
        {"device": "cpu", "machine": "2-core CPU", "date": "2026-12-01", "method": "window3d", "sparsity": 0.9, "steps": 30,
         "sparse_s": 40.0, "dense_s": 64.0},
        {"device": "cuda", "machine": "one H200", "date": "2026-12-01", "method": "window3d", "sparsity": 0.9, "steps": 30,
         "sparse_s": 0.8, "dense_s": 0.56},
    ]}))
    monkeypatch.setattr(gen, "MAIN_COMMAND_TIMES", times)
    cpu = gen.committed_speed("bundled", "window3d", 0.9, "cpu")
    assert "committed measurement, 2-core CPU" in cpu and "1.60x faster than dense" in cpu and "not this run" in cpu
    assert "1.43x slower than dense" in gen.committed_speed("bundled", "window3d", 0.9, "cuda")
    assert gen.committed_speed("bundled", "pooled", 0.9, "cpu") is None
    assert gen.committed_speed("tiny", "window3d", 0.9, "cpu") is None
    assert gen.committed_speed("bundled", "window3d", 0.9, "cpu", steps=2) is None  # another command


def test_the_committed_main_command_times_cover_the_default_on_both_devices():
    data = json.loads(gen.MAIN_COMMAND_TIMES.read_text())
    for device in ("cpu", "cuda"):
        assert gen.committed_speed("bundled", gen.DEFAULT_METHOD, 0.9, device) is not None, device
    assert all(r["sparse_s"] > 0 and r["dense_s"] > 0 and r["command"] and r["model"] for r in data["runs"])
    assert all("v2" in r["model"] for r in data["runs"])  # rows of model v1 live under earlier_models, unquoted
