"""The `dit-sparse` command line: subcommands, clear errors, nothing partial left behind."""

import os

import pytest
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
    (["generate", "--model", "/definitely/not/here"], "could not load"),
    (["eval", "--sparsities", "0.5,1.2"], "[0, 1)"),
])
def test_bad_input_exits_2_with_a_clear_message(argv, message, capsys, tmp_path):
    rc = main(argv + ["--out", str(tmp_path / "v.mp4")] if argv[0] == "generate" else argv)
    assert rc == 2
    assert message in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


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


def test_bench_needs_a_gpu_or_says_so(capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the benchmark would run for minutes")
    assert main(["bench", "e2e", "--models", "wan1.3b-480p"]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().out
