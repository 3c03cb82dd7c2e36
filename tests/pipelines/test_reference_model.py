"""Reference pipeline: tiny random model end to end on CPU, save/load, loader errors, training script."""

import json
import warnings

import pytest
import torch
from dit_sparse.pipelines import reference_model as rm
from dit_sparse.pipelines import train_reference as tr
from dit_sparse.pipelines import video_data as vd
from dit_sparse.pipelines.reference_eval import concentration
from dit_sparse.pipelines.reference_trainer import Trainer

PROMPTS = ["a red square moves left on a dark striped background", "a blue striped disc grows on a light cloudy background"]


@pytest.fixture(scope="module")
def pipe():
    torch.manual_seed(0)
    p = rm.build_pipeline(tiny=True)
    p.set_progress_bar_config(disable=True)
    return p


def _run(p, **kw):
    args = dict(num_inference_steps=3, generator=torch.Generator().manual_seed(0), height=32, width=48, num_frames=5)
    args.update(kw)
    return p(PROMPTS, **args).frames


def test_tiny_pipeline_end_to_end(pipe):
    out = _run(pipe)
    assert out.shape == (2, 5, 32, 48, 3)
    assert out.min() >= 0.0 and out.max() <= 1.0
    pt = _run(pipe, output_type="pt")
    assert pt.shape == (2, 5, 3, 32, 48)
    assert torch.allclose(pt.permute(0, 1, 3, 4, 2), torch.from_numpy(out), atol=1e-6)
    # Same generator -> same video; guidance changes it.
    assert (_run(pipe) == out).all()
    assert abs(_run(pipe, guidance_scale=1.0) - out).max() > 1e-4


def test_timestep_is_exposed_during_sampling(pipe):
    stamps = []
    h = pipe.transformer.register_forward_pre_hook(lambda m, a: stamps.append(pipe.current_timestep))
    try:
        _run(pipe, guidance_scale=2.0)
    finally:
        h.remove()
    # 3 steps x (cond, uncond): both branches of a step see the same timestep, decreasing over steps.
    assert len(stamps) == 6 and all(s is not None for s in stamps)
    assert stamps[0] == stamps[1] and stamps[0] > stamps[2]
    assert pipe.current_timestep is None


def test_save_load_roundtrip(pipe, tmp_path):
    ref = _run(pipe)
    pipe.save_pretrained(tmp_path)
    index = json.loads((tmp_path / "model_index.json").read_text())
    assert index["text_encoder"] == ["dit_sparse.pipelines.text_encoder", "ReferenceTextEncoder"]
    loaded = rm.load_reference_pipeline(tmp_path, device="cpu", dtype=torch.float32)
    assert abs(_run(loaded) - ref).max() < 1e-4


def test_loader_error_names_the_training_command(tmp_path):
    with pytest.raises(FileNotFoundError, match="train_reference"):
        rm.load_reference_pipeline(tmp_path, device="cpu")


def test_text_encoder_padding_empty_prompt_and_unknown_words():
    te = rm.build_text_encoder(tiny=True)
    ids = te.tokenize(["", PROMPTS[0]])
    assert ids[0, 0] == te.stoi["<bos>"] and (ids[0, 1:] == 0).all()
    emb = te(ids)
    assert emb.shape == (2, te.config.max_length, te.config.dim)
    assert (emb[0, 1:] == 0).all() and emb[0, 0].abs().sum() > 0
    n = len(PROMPTS[0].split()) + 1
    assert (emb[1, n:] == 0).all() and (emb[1, :n].abs().sum(-1) > 0).all()
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        te.tokenize("a purple square")
    assert any("purple" in str(x.message) for x in w)


def test_tokenizer_covers_every_generated_prompt():
    te = rm.build_text_encoder(tiny=True)
    prompts = vd.spec_prompts(vd.sample_specs(200, torch.Generator().manual_seed(1), two_object_prob=0.5, pan_prob=0.5))
    ids = te.tokenize(prompts)
    assert not (ids == te.stoi["<unk>"]).any()


def test_concentration_metric_on_known_masses():
    eye = torch.eye(20).view(1, 1, 20, 20)
    c = concentration(eye)
    assert c["top5%"] == pytest.approx(1.0) and c["density_for_90%"] == pytest.approx(1 / 20)
    uniform = torch.full((1, 1, 20, 20), 1 / 20)
    c = concentration(uniform)
    assert c["top25%"] == pytest.approx(0.25, abs=1e-5) and c["top5%"] == pytest.approx(0.05, abs=1e-5)


def test_training_script_runs_and_saves_a_loadable_pipeline(tmp_path):
    out = tmp_path / "ref"
    rc = tr.main(["--tiny", "--steps", "2", "--batch", "2", "--compile", "none", "--log-every", "1", "--out", str(out)])
    assert rc == 0
    log = json.loads((out / "train_log.json").read_text())
    assert log["steps"] == 2 and len(log["losses"]) >= 2
    loaded = rm.load_reference_pipeline(out, device="cpu", dtype=torch.float32)
    loaded.set_progress_bar_config(disable=True)
    frames = loaded("a red disc moves up on a dark cloudy background", num_inference_steps=2, height=16, width=16,
                    num_frames=2).frames
    assert frames.shape == (1, 2, 16, 16, 3)


@pytest.mark.skipif(not (rm.DEFAULT_PATH / "transformer" / "diffusion_pytorch_model.safetensors").is_file(),
                    reason="bundled weights not present")
def test_bundled_model_loads_and_runs():
    p = rm.load_reference_pipeline(device="cpu", dtype=torch.float32)
    cfg = p.transformer.config
    assert tuple(cfg.patch_size) == (1, 2, 2) and cfg.attention_head_dim == 64 and cfg.num_layers == 4
    out = p(PROMPTS[0], num_inference_steps=2, generator=torch.Generator().manual_seed(0), num_frames=2).frames
    assert out.shape == (1, 2, 64, 64, 3)
    assert p(PROMPTS[0], num_inference_steps=1, output_type="latent").frames.shape[2] == 8  # its clip length


def test_training_resumed_from_a_checkpoint_continues_exactly(tmp_path):
    """Three steps, a checkpoint, three more in a new process state == six steps in one run (bitwise on CPU):
    weights, EMA, optimizer moments, data stream and noise all continue where they stopped."""
    common = ["--tiny", "--steps", "6", "--batch", "2", "--compile", "none", "--log-every", "1",
              "--max-minutes", "1e6", "--warmup", "2"]
    one = tr._parse(common)
    whole, _ = tr.train(one, torch.device("cpu"))

    ckpt = tmp_path / "state.pt"
    first = tr._parse(common + ["--run-steps", "3", "--checkpoint", str(ckpt)])
    part, log1 = tr.train(first, torch.device("cpu"))
    assert part.step == 3 and ckpt.exists() and log1["run_steps"] == 3
    second = tr._parse(common + ["--checkpoint", str(ckpt), "--resume"])
    resumed, log2 = tr.train(second, torch.device("cpu"))
    assert resumed.step == 6 and log2["run_steps"] == 3 and len(log2["earlier_runs"]) == 1
    for a, b in zip(whole.params, resumed.params):
        assert torch.equal(a, b)
    for a, b in zip(whole.ema, resumed.ema):
        assert torch.equal(a, b)
    # A checkpoint of another model size is refused with what to do.
    other = tr._parse(["--steps", "1", "--batch", "2", "--compile", "none", "--checkpoint", str(ckpt), "--resume"])
    with pytest.raises(ValueError, match="another model size"):
        tr.train(other, torch.device("cpu"))


def test_clip_geometry_options_train_and_save_the_native_clip_size(tmp_path):
    """`--frames` and `--patch` set the training clips and the transformer's patch; the saved pipeline makes
    clips of that size by default, and the concentration probe renders clips of its length."""
    out = tmp_path / "ref"
    rc = tr.main(["--tiny", "--steps", "1", "--batch", "2", "--compile", "none", "--out", str(out),
                  "--frames", "4", "--patch", "8"])
    assert rc == 0
    loaded = rm.load_reference_pipeline(out, device="cpu", dtype=torch.float32)
    loaded.set_progress_bar_config(disable=True)
    assert tuple(loaded.transformer.config.patch_size) == (1, 8, 8)
    assert (loaded.config.num_frames, loaded.config.height, loaded.config.width) == (4, 64, 64)
    frames = loaded("a red disc moves up on a dark cloudy background", num_inference_steps=1).frames
    assert frames.shape == (1, 4, 64, 64, 3)
    from dit_sparse.pipelines.reference_eval import attention_concentration

    conc = attention_concentration(loaded, n=1)  # 4 frames x 8 x 8 tokens = 4 blocks of 64
    assert len(conc) == 2 and all(0.0 < c["density_for_90%"] <= 1.0 for c in conc.values())


def test_resume_refuses_another_clip_geometry(tmp_path):
    ckpt = tmp_path / "state.pt"
    common = ["--tiny", "--batch", "2", "--compile", "none", "--checkpoint", str(ckpt)]
    tr.train(tr._parse(common + ["--steps", "1", "--frames", "4"]), torch.device("cpu"))
    with pytest.raises(ValueError, match="--frames 4 --patch 4"):
        tr.train(tr._parse(common + ["--steps", "2", "--resume", "--frames", "8"]), torch.device("cpu"))
    with pytest.raises(ValueError, match="another model size"):
        tr.train(tr._parse(common + ["--steps", "2", "--resume", "--frames", "4", "--patch", "8"]), torch.device("cpu"))


def test_frames_below_two_are_refused(capsys):
    with pytest.raises(SystemExit):
        tr._parse(["--frames", "1"])
    assert "--frames must be at least 2" in capsys.readouterr().err


def test_attention_only_probe_prints_the_concentration(tmp_path, capsys):
    out = tmp_path / "ref"
    assert tr.main(["--tiny", "--steps", "1", "--batch", "2", "--compile", "none", "--out", str(out),
                    "--frames", "4", "--patch", "8"]) == 0
    capsys.readouterr()
    assert tr.main(["--eval-only", str(out), "--attention-only"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert set(res) == {"attention"} and len(res["attention"]) == 2


def test_t_mean_moves_training_noise_levels_up(monkeypatch):
    """`--t-mean` shifts the logit-normal noise levels: the mean t of many draws rises above 0.5."""
    seen = []
    real = torch.sigmoid

    def spy(x):
        out = real(x)
        seen.append(out.detach().clone())
        return out

    for t_mean, lo, hi in ((0.0, 0.4, 0.6), (1.0, 0.62, 0.85)):
        seen.clear()
        args = tr._parse(["--tiny", "--batch", "64", "--compile", "none", "--t-mean", str(t_mean)])
        trainer = Trainer(args, torch.device("cpu"))
        monkeypatch.setattr(torch, "sigmoid", spy)
        trainer.train_step()
        monkeypatch.setattr(torch, "sigmoid", real)
        t = seen[0]
        assert t.shape == (64,) and lo < float(t.mean()) < hi, (t_mean, float(t.mean()))


def test_model_size_options_reach_the_saved_transformer(tmp_path):
    out = tmp_path / "ref"
    assert tr.main(["--tiny", "--steps", "1", "--batch", "2", "--compile", "none", "--out", str(out),
                    "--heads", "3", "--head-dim", "8", "--ffn", "24", "--layers", "1"]) == 0
    cfg = rm.load_reference_pipeline(out, device="cpu", dtype=torch.float32).transformer.config
    assert (cfg.num_attention_heads, cfg.attention_head_dim, cfg.ffn_dim, cfg.num_layers) == (3, 8, 24, 1)
    with pytest.raises(SystemExit):
        tr._parse(["--heads", "0"])


def test_model_card_reads_every_figure_from_the_folder(tmp_path):
    out = tmp_path / "ref"
    assert tr.main(["--tiny", "--steps", "2", "--batch", "2", "--compile", "none", "--out", str(out),
                    "--frames", "4", "--patch", "8", "--t-mean", "0.5"]) == 0
    card = (out / "MODEL_CARD.md")
    assert tr.main(["--card", str(out)]) == 0
    text = card.read_text()
    assert "4 frames x 64 x 64 RGB -> 4 x 8 x 8 = 256 video tokens" in text
    assert "--frames 4 --patch 8" in text and "--t-mean 0.5" in text and "--out" not in text
    assert "2 optimizer steps" in text and "eval.json is missing" in text
    ev = tmp_path / "eval"
    ev.mkdir()
    held = {"videos": 64, "colour": 0.9, "motion": 0.75, "both": 0.7, "by_path": {"left": 0.5},
            "by_objects": {"1_object": 0.8, "2_object": 0.4}}
    dens = {"blocks.0.attn1": 0.3, "blocks.1.attn1": 0.5, "blocks.2.attn1": 0.35}
    (ev / "eval.json").write_text(json.dumps({
        "sweep": [{"weights": "ema", "guidance": 3.0, "shift": 3.0, "val_both": 0.6, "heldout": held}],
        "chosen": {"weights": "ema", "guidance": 3.0, "shift": 3.0, "val_both": 0.6, "heldout": held},
        "attention": {k: {"top5%": 0.2, "top10%": 0.3, "top25%": 0.6, "density_for_90%": v} for k, v in dens.items()},
    }))
    assert tr.main(["--card", str(out), "--eval-out", str(ev)]) == 0
    text = card.read_text()
    assert "| **ema** | **3.0** | **3.0** | **60.0%** | **90.0%** | **75.0%** | **70.0%** |" in text
    assert "Median share of blocks for 90% of the mass: 35.0% (meets the target of 40.0%)" in text
    assert "Per path: left 50.0%" in text
    assert "samples.png" not in text  # no samples.npz: no picture promised


def test_model_card_lists_resumed_runs_and_renders_samples(tmp_path):
    import imageio.v3 as iio
    import numpy as np

    out, ckpt = tmp_path / "ref", tmp_path / "state.pt"
    common = ["--tiny", "--batch", "2", "--compile", "none", "--out", str(out), "--checkpoint", str(ckpt),
              "--resume", "--frames", "3", "--patch", "8", "--total-minutes", "1e6"]
    assert tr.main([*common, "--run-steps", "2"]) == 0
    assert tr.main([*common, "--run-steps", "3"]) == 0
    ev = tmp_path / "eval"
    ev.mkdir()
    rng = np.random.default_rng(0)
    videos = rng.integers(0, 256, size=(10, 3, 64, 64, 3), dtype=np.uint8)
    np.savez_compressed(ev / "samples.npz", videos=videos, prompts=np.array([f"prompt {i}" for i in range(10)]))
    assert tr.main(["--card", str(out), "--eval-out", str(ev)]) == 0
    text = (out / "MODEL_CARD.md").read_text()
    assert "5 optimizer steps in 2 run(s)" in text
    assert "| 1 | 2 |" in text and "| 2 | 3 |" in text
    assert "--max-minutes" not in text and "--run-steps" in text
    grid = iio.imread(out / "samples.png")
    assert grid.shape == (8 * 66, 3 * 66, 3)  # 8 prompts x 3 frames, 2-pixel gutters
    assert (grid[66:130, 132:196] == videos[1, 2]).all()
    assert "8. prompt 7" in text and "9. prompt 8" not in text


def test_curriculum_draws_easy_clips_first():
    from dit_sparse.pipelines import reference_trainer as rt
    from dit_sparse.pipelines.clip_spec import PATH_NAMES, TEXTURES

    drawn = []
    real = rt.sample_specs

    def spy(*a, **k):
        spec = real(*a, **k)
        drawn.append(spec)
        return spec

    args = tr._parse(["--tiny", "--batch", "16", "--compile", "none", "--curriculum", "0.3"])
    trainer = rt.Trainer(args, torch.device("cpu"))
    rt.sample_specs = spy
    try:
        trainer.batch(progress=0.1)
        trainer.batch(progress=0.5)
    finally:
        rt.sample_specs = real
    easy, full = drawn
    assert not easy.present[:, 1].any() and not easy.pan.any()
    assert {PATH_NAMES[i] for i in easy.path[:, 0].tolist()} <= set(rt.EASY_PATHS)
    assert {TEXTURES[i] for i in easy.texture[:, 0].tolist()} == {"solid"}
    assert full.present[:, 1].any() or full.pan.any() or len(set(full.path[:, 0].tolist())) > 4
    with pytest.raises(SystemExit):
        tr._parse(["--curriculum", "1.5"])


def test_init_from_a_saved_pipeline_starts_from_its_weights_with_a_fresh_optimizer(tmp_path):
    """`--init-from FOLDER` (e.g. the bundled model) fine-tunes: weights and EMA from the folder, step and
    optimizer fresh; a checkpoint that --resume finds wins; another size or geometry is refused."""
    out = tmp_path / "ref"
    assert tr.main(["--tiny", "--steps", "3", "--batch", "2", "--compile", "none", "--out", str(out)]) == 0
    saved = rm.load_reference_pipeline(out, device="cpu", dtype=torch.float32)
    want = [p for m in (saved.transformer, saved.text_encoder) for p in m.parameters()]
    common = ["--tiny", "--batch", "2", "--compile", "none", "--max-minutes", "1e6"]
    started, log = tr.train(tr._parse(common + ["--steps", "0", "--init-from", str(out)]), torch.device("cpu"))
    assert started.step == 0 and log["args"]["init_from"] == str(out)
    fresh = Trainer(tr._parse(common + ["--steps", "0"]), torch.device("cpu"))
    assert any(not torch.equal(a, b) for a, b in zip(fresh.params, want))  # a random start differs...
    for a, b, e in zip(started.params, want, started.ema):
        assert torch.equal(a, b) and torch.equal(e, b)  # ...the folder's start is its weights, EMA included
    assert not started.opt.state  # no optimizer moments carried over
    trained, _ = tr.train(tr._parse(common + ["--steps", "1", "--init-from", str(out)]), torch.device("cpu"))
    assert trained.step == 1 and any(not torch.equal(a, b) for a, b in zip(trained.params, want))
    # A checkpoint found by --resume takes precedence over --init-from.
    ckpt = tmp_path / "state.pt"
    tr.train(tr._parse(common + ["--steps", "2", "--checkpoint", str(ckpt)]), torch.device("cpu"))
    resumed, _ = tr.train(tr._parse(common + ["--steps", "2", "--checkpoint", str(ckpt), "--resume",
                                              "--init-from", str(out)]), torch.device("cpu"))
    assert resumed.step == 2
    with pytest.raises(ValueError, match="--frames 16 --patch 4"):
        tr.train(tr._parse(common + ["--steps", "0", "--frames", "8", "--init-from", str(out)]), torch.device("cpu"))
    with pytest.raises(ValueError, match="another model size"):
        tr.train(tr._parse(["--batch", "2", "--compile", "none", "--steps", "0", "--init-from", str(out)]),
                 torch.device("cpu"))
    with pytest.raises(SystemExit):
        tr._parse(common + ["--init-from", str(tmp_path / "missing")])
    # The card of a model fine-tuned this way says where it started.
    tuned = tmp_path / "tuned"
    assert tr.main(common + ["--steps", "1", "--init-from", str(out), "--out", str(tuned)]) == 0
    assert tr.main(["--card", str(tuned)]) == 0
    text = (tuned / "MODEL_CARD.md").read_text()
    assert f"Started from the weights of `{out}`" in text and f"--init-from {out}" in text
