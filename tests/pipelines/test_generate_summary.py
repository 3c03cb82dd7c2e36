import json

from dit_sparse.pipelines import generate as gen


def test_default_method_is_the_committed_evaluations_best_at_0_9():
    rows = json.loads(gen.EVAL_RESULTS.read_text())["rows"]
    at = {r["method"]: r["psnr"] for r in rows if r.get("sparsity") == 0.9 and r.get("psnr") and "+" not in r["method"]}
    assert max(at, key=at.get) == gen.DEFAULT_METHOD


def test_summary_quotes_the_committed_evaluation_labelled_as_such():
    text = gen.committed_quality("bundled", "window3d", 0.9)
    assert "committed evaluation" in text and "17.78 dB" in text and "not this run" in text
    assert gen.committed_quality("tiny", "window3d", 0.9) is None
    assert gen.committed_quality("bundled", "window3d", 0.8) is None
    assert gen.committed_quality("bundled", "semantic+skip", 0.9) is not None
