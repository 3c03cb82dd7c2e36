"""Prompt-adherence detector: ground-truth clips pass, wrong clips fail."""

import numpy as np
import torch
from dit_sparse.pipelines import adherence
from dit_sparse.pipelines import video_data as vd


def _heldout(n: int = 24):
    spec = vd.heldout_specs().index(list(range(0, 64, 64 // n))[:n])
    frames = ((vd.render(spec) + 1) / 2).permute(0, 2, 3, 4, 1)  # [B, F, H, W, 3]
    return frames, vd.clip_truths(spec)


FRAMES, TRUTHS = _heldout()


def test_ground_truth_clips_pass():
    res = adherence.score_videos(FRAMES, TRUTHS)
    assert res["both"] == 1.0 and res["colour"] == 1.0 and res["motion"] == 1.0


def test_numpy_input_is_accepted():
    r = adherence.check_video(FRAMES[0].numpy().astype(np.float32), TRUTHS[0])
    assert r.ok


def test_time_reversed_clips_fail_motion_except_bounce():
    for frames, truth in zip(FRAMES.flip(1), TRUTHS):
        r = adherence.check_video(frames, truth)
        assert r.colour_ok
        if all(o.path != "bounce" for o in truth.objects):
            assert not r.motion_ok, truth.prompt


def test_static_and_shuffled_clips_fail():
    static = FRAMES[:, :1].expand_as(FRAMES)
    assert adherence.score_videos(static, TRUTHS)["motion"] == 0.0
    shuffled = FRAMES.roll(1, dims=0)
    assert adherence.score_videos(shuffled, TRUTHS)["both"] < 0.2


def test_colour_labels_on_palette_and_grey():
    pal = torch.tensor([vd.COLOURS[c] for c in vd.COLOUR_NAMES]).view(1, 1, 6, 3)
    assert adherence.colour_labels(pal)[0, 0].tolist() == list(range(6))
    dark = pal * 0.55  # the darker texture half keeps its label
    assert adherence.colour_labels(dark)[0, 0].tolist() == list(range(6))
    grey = torch.linspace(0, 1, 7).view(1, 1, 7, 1).expand(1, 1, 7, 3)
    assert (adherence.colour_labels(grey) == -1).all()


def test_bad_shapes_raise():
    try:
        adherence.check_video(torch.rand(16, 64, 64), TRUTHS[0])
    except ValueError as exc:
        assert "[F, H, W, 3]" in str(exc)
    else:
        raise AssertionError("expected ValueError")
