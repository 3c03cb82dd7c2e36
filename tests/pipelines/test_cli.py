"""The `dit-sparse` command line: subcommands, clear errors, nothing partial left behind."""

import os

import pytest
from dit_sparse.pipelines import evaluate, generate
from dit_sparse.pipelines.cli import main


def test_help_lists_subcommands(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for sub in ("generate", "eval", "bench", "train-reference"):
        assert sub in out


@pytest.mark.parametrize("argv, message", [
    (["generate", "--sparsity", "1.0"], "[0, 1)"),
    (["generate", "--method", "nope"], "unknown method 'nope'"),
    (["generate", "--method", "semantic", "--opt", "colour=red"], "unknown option"),
    (["generate", "--model", "/definitely/not/here"], "does not exist"),
    (["eval", "--sparsities", "0.5,1.2"], "[0, 1)"),
])
def test_bad_input_exits_2_with_a_clear_message(argv, message, capsys, tmp_path):
    rc = main(argv + ["--out", str(tmp_path / "v.mp4")] if argv[0] == "generate" else argv)
    assert rc == 2
    assert message in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


@pytest.fixture
def no_model_load(monkeypatch):
    """Loading a model fails the test: bad arguments must be refused before it."""
    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the arguments were checked")

    monkeypatch.setattr(generate, "load_model", refuse)
    monkeypatch.setattr(evaluate, "load_model", refuse)


def _refusal(argv: list[str], args: list[str], out_name: str, tmp_path, capsys) -> str:
    """`dit-sparse` with `argv` then `args` (`{tmp}` is tmp_path; --out defaults to tmp_path / out_name): exit
    code 2 and a one-line usage error of the subcommand, which is returned."""
    args = [a.format(tmp=tmp_path) for a in args]
    out = [] if "--out" in args else ["--out", str(tmp_path / out_name)]
    rc = main([*argv, *args, *out])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.startswith(f"dit-sparse {argv[0]}: error:") and err.count("\n") == 1
    return err


@pytest.mark.parametrize("args, message", [
    (["--out", "{tmp}/video.txt"], "has extension '.txt'; use a name ending in .mp4 or .gif"),
    (["--out", "{tmp}/video"], "has no extension; use a name ending in .mp4 or .gif"),
    (["--out", "{tmp}"], "is a folder"),
    (["--steps", "0"], "--steps must be >= 1"),
    (["--warmup", "-1"], "--warmup"),
    (["--warmup-layers", "-1"], "--warmup-layers"),
    (["--backend", "nope"], "unknown backend 'nope'"),
    (["--backend", "flex", "--device", "cpu"], "backend 'flex'"),  # GPU only (or unknown without triton)
    (["--device", "foo"], "--device 'foo' is not a device"),
    (["--opt", "colour"], "--opt expects KEY=VALUE"),
    (["--cp", "0"], "--cp must be >= 1"),
])
def test_generate_checks_every_argument_before_loading(args, message, tmp_path, capsys, no_model_load):
    assert message in _refusal(["generate", "--model", "tiny"], args, "v.mp4", tmp_path, capsys)
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("args, message", [
    (["--out", "{tmp}/blocker"], "--out: cannot create the report folder"),
    (["--steps", "0"], "--steps must be >= 1"),
    (["--warmup", "2.5", "--warmup-layers", "-2"], "--warmup"),
    (["--backend", "nope"], "unknown backend 'nope'"),
    (["--seeds", "one"], "--seeds must be a comma list of integers"),
    (["--prompts", "0"], "--prompts must be >= 1"),
    (["--sparsities", ","], "--sparsities needs at least one value"),
    (["--methods", "full,nope"], "unknown method 'nope'"),
    (["--opt", "colour=red"], "unknown option"),
    (["--lpips-weights", "{tmp}/no-such-weights.pth"], "--lpips-weights: LPIPS backbone weights not found"),
])
def test_eval_checks_every_argument_before_loading(args, message, tmp_path, capsys, no_model_load):
    (tmp_path / "blocker").write_text("a file where the report folder should go")
    argv = ["eval", "--model", "tiny", "--methods", "full", "--sparsities", "0.5"]
    assert message in _refusal(argv, args, "report", tmp_path, capsys)
    assert not (tmp_path / "report").exists()


def test_model_dependent_checks_run_before_any_generation(tmp_path, capsys, monkeypatch):
    from dit_sparse.methods.skip.calibration import SkipCalibration

    # A calibration made for another model is only detectable once the model is loaded, but it must
    # still fail before the dense comparison run, not after it.
    cal = tmp_path / "flux-skip.json"
    SkipCalibration(model_class="FluxTransformer2DModel", method="full", tolerances=[0.01], layers={}).save(cal)
    monkeypatch.setattr(generate, "timed_generation",
                        lambda *a, **k: pytest.fail("a generation ran before the method was checked on the model"))
    rc = main(["generate", "--model", "tiny", "--method", "full+skip", "--opt", f"calibration={cal}",
               "--compare-dense", "--steps", "2", "--out", str(tmp_path / "v.mp4")])
    assert rc == 2
    assert "made for FluxTransformer2DModel" in capsys.readouterr().err
    assert not (tmp_path / "v.mp4").exists()


def test_unwritable_output_path_fails_before_any_work(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    rc = main(["generate", "--model", "tiny", "--out", str(blocker / "sub" / "v.mp4")])
    assert rc == 2
    assert "cannot create the folder" in capsys.readouterr().err


def test_generate_tiny_writes_a_video_and_reports(tmp_path, capsys):
    out = tmp_path / "v.mp4"
    rc = main(["generate", "--model", "tiny", "--method", "full", "--sparsity", "0.5", "--steps", "2",
               "--compare-dense", "--out", str(out)])
    assert rc == 0
    text = capsys.readouterr().out
    assert "RANDOM weights" in text and "achieved sparsity" in text and "PSNR" in text
    written = [p for p in tmp_path.iterdir()]
    assert len(written) == 1 and written[0].suffix in (".mp4", ".gif") and written[0].stat().st_size > 0
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".partial")]


def test_eval_tiny_writes_report(tmp_path):
    rc = main(["eval", "--model", "tiny", "--methods", "full[block_size=16]", "--sparsities", "0.5",
               "--steps", "2", "--out", str(tmp_path)])
    assert rc == 0
    for name in ("results.json", "report.md", "report.html", "pareto.png"):
        assert (tmp_path / name).stat().st_size > 0
    import datetime
    import json

    meta = json.loads((tmp_path / "results.json").read_text())["meta"]
    assert datetime.date.fromisoformat(meta["date"])  # the summary quotes it with the figures


def test_bench_needs_a_gpu_or_says_so(capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the benchmark would run for minutes")
    assert main(["bench", "e2e", "--models", "wan1.3b-480p"]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().out
