"""Loading models for the CLI: folders written by train-reference load like the bundled model."""

import json

import numpy as np
import pytest
import torch
from dit_sparse.pipelines import reference_model as rm
from dit_sparse.pipelines.cli import main
from dit_sparse.pipelines.loading import (
    ModelLoadError,
    is_reference_folder,
    load_model,
    pipeline_class_name,
    resolve_device,
)
from dit_sparse.pipelines.reference_model import save_pipeline

PROMPT = "a red square moves left on a dark striped background"


@pytest.fixture(scope="module")
def reference_folder(tmp_path_factory):
    """A pipeline folder in train-reference's layout (same save function), random weights, no training.

    The tiny config with a coarser patch keeps the pipeline's fixed 16 x 64 x 64 video at 512 tokens, so
    a CPU generation takes a fraction of a second.
    """
    torch.manual_seed(0)
    pipe = rm.ReferenceVideoPipeline(rm.build_transformer(tiny=True, patch_size=(2, 8, 8)),
                                     rm.build_text_encoder(tiny=True), rm.build_scheduler())
    folder = tmp_path_factory.mktemp("trained") / "my-reference-dit"
    save_pipeline(pipe, folder)
    return folder


def test_folder_is_recognised_as_ours(reference_folder, tmp_path):
    assert pipeline_class_name(reference_folder) == "ReferenceVideoPipeline"
    assert is_reference_folder(reference_folder)
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "WanPipeline"}))
    assert not is_reference_folder(tmp_path)  # a Diffusers pipeline: Diffusers loads it
    (tmp_path / "model_index.json").write_text("[not an index")
    assert pipeline_class_name(tmp_path) is None and not is_reference_folder(tmp_path)
    assert not is_reference_folder(tmp_path / "missing") and not is_reference_folder("org/some-hub-id")


def test_load_model_gives_the_saved_reference_pipeline(reference_folder):
    loaded = load_model(str(reference_folder), torch.device("cpu"))
    assert isinstance(loaded.pipe, rm.ReferenceVideoPipeline)
    assert loaded.pipe.transformer.dtype == torch.float32  # "auto" dtype on CPU, as for the bundled model
    frames = loaded.call(PROMPT, 2, 0)
    assert frames.shape == (16, 64, 64, 3) and 0.0 <= frames.min() and frames.max() <= 1.0
    # The same weights as the direct loader: same video for the same seed.
    direct = rm.load_reference_pipeline(reference_folder, device="cpu", dtype=torch.float32)
    ref = direct(PROMPT, num_inference_steps=2, generator=torch.Generator().manual_seed(0)).frames[0]
    np.testing.assert_allclose(frames, ref, atol=1e-5)


def test_generate_runs_a_train_reference_folder(reference_folder, tmp_path, capsys):
    out = tmp_path / "v.gif"
    rc = main(["generate", "--model", str(reference_folder), "--method", "semantic", "--sparsity", "0.9",
               "--steps", "2", "--device", "cpu", "--out", str(out)])
    text = capsys.readouterr().out
    assert rc == 0, text
    assert f"reference model (ReferenceVideoPipeline) at {reference_folder}" in text
    assert "achieved sparsity" in text and out.stat().st_size > 0


def test_folder_without_weights_says_how_to_get_them(reference_folder, tmp_path, capsys):
    broken = tmp_path / "half-written"
    broken.mkdir()
    (broken / "model_index.json").write_text((reference_folder / "model_index.json").read_text())
    rc = main(["generate", "--model", str(broken), "--steps", "2", "--out", str(tmp_path / "v.mp4")])
    assert rc == 2
    assert "train_reference" in capsys.readouterr().err
    with pytest.raises(ModelLoadError, match="no reference model weights"):
        load_model(str(broken), torch.device("cpu"))


@pytest.mark.parametrize("name", ["/no/such/model", "./missing", "runs/a/b", "~/nothing-here-12345/"])
def test_a_missing_folder_is_named_before_anything_loads(name, tmp_path, capsys, monkeypatch):
    import diffusers

    monkeypatch.setattr(diffusers.DiffusionPipeline, "from_pretrained",
                        lambda *a, **k: pytest.fail("a missing folder must not reach Diffusers"))
    rc = main(["generate", "--model", name, "--steps", "2", "--out", str(tmp_path / "v.mp4")])
    assert rc == 2
    assert "does not exist" in capsys.readouterr().err


def test_resolve_device_refuses_what_is_not_a_device():
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ModelLoadError, match="not a device; use auto, cpu, cuda or cuda:N"):
        resolve_device("gpu0")


def test_pipelines_that_need_more_than_a_prompt_are_named():
    import diffusers
    from dit_sparse.pipelines.loading import prompt_only_problem

    for name in ("WanPipeline", "FluxPipeline", "CogVideoXPipeline", "HunyuanVideoPipeline", "QwenImagePipeline"):
        assert prompt_only_problem(getattr(diffusers, name)) is None, name
    assert "needs image" in prompt_only_problem(diffusers.WanImageToVideoPipeline)
    assert "needs image" in prompt_only_problem(diffusers.ChronoEditPipeline)
    assert "conditions on an image or a video" in prompt_only_problem(diffusers.Cosmos2VideoToWorldPipeline)
    assert prompt_only_problem(diffusers.CogVideoXVideoToVideoPipeline) is not None


def test_reference_clip_frames_reads_the_folder(reference_folder, tmp_path):
    from dit_sparse.pipelines.loading import reference_clip_frames

    assert reference_clip_frames(str(reference_folder)) == 16
    pipe = rm.ReferenceVideoPipeline(rm.build_transformer(tiny=True, patch_size=(2, 8, 8)),
                                     rm.build_text_encoder(tiny=True), rm.build_scheduler(), num_frames=8)
    save_pipeline(pipe, tmp_path / "eight")
    assert reference_clip_frames(str(tmp_path / "eight")) == 8
    assert reference_clip_frames("tiny") is None and reference_clip_frames(str(tmp_path / "nothing")) is None
    if (rm.DEFAULT_PATH / "model_index.json").is_file():
        assert reference_clip_frames("bundled") == 8  # model v2: 8 frames x 32 x 32 tokens


def test_eval_scores_adherence_on_a_train_reference_folder(reference_folder, tmp_path, capsys):
    out = tmp_path / "report"
    rc = main(["eval", "--model", str(reference_folder), "--methods", "full", "--sparsities", "0.5",
               "--prompts", "1", "--steps", "1", "--out", str(out)])
    assert rc == 0
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert all("adherence" in r for r in rows)
