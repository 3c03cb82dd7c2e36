"""Procedural video generator: determinism, prompts, and exact ground truth."""

import pytest
import torch
from dit_sparse.pipelines import adherence
from dit_sparse.pipelines import video_data as vd
from dit_sparse.pipelines.clip_motion import path_vector
from dit_sparse.pipelines.clip_prompts import vocabulary


def _specs(seed: int, n: int = 6, **kw) -> vd.SpecBatch:
    return vd.sample_specs(n, torch.Generator().manual_seed(seed), **kw)


def test_same_seed_same_clips_and_different_seed_differs():
    a, b, c = _specs(3), _specs(3), _specs(4)
    va, vb, vc = vd.render(a), vd.render(b), vd.render(c)
    assert vd.spec_prompts(a) == vd.spec_prompts(b)
    assert torch.equal(va, vb)
    assert not torch.equal(va, vc)
    assert va.shape == (6, 3, 16, 64, 64)
    assert va.min() >= -1.0 and va.max() <= 1.0


def test_make_clip_is_deterministic():
    v1, t1 = vd.make_clip(11)
    v2, t2 = vd.make_clip(11)
    assert torch.equal(v1, v2) and t1.prompt == t2.prompt
    assert torch.equal(t1.objects[0].centres, t2.objects[0].centres)


def test_rendered_object_follows_ground_truth_track():
    # Solid single objects: the colour-mask centroid must sit on the recorded centre in every frame
    # (shapes are symmetric up to the triangle's centroid offset, hence the tolerance).
    spec = _specs(5, n=12, two_object_prob=0.0, pan_prob=0.5)
    spec.texture[:] = 0
    spec.shape[spec.shape == vd.SHAPES.index("triangle")] = vd.SHAPES.index("disc")
    frames = ((vd.render(spec) + 1) / 2).permute(0, 2, 3, 4, 1)
    for clip, truth in zip(frames, vd.clip_truths(spec)):
        obj = truth.objects[0]
        labels = adherence.colour_labels(clip)
        _, centroid = adherence.colour_track(labels, obj.colour)
        err = (centroid - obj.centres).norm(dim=-1)
        assert float(err.max()) < 1.0, (truth.prompt, err)


def test_objects_stay_inside_canvas():
    spec = _specs(7, n=300)
    centres, scales = vd.trajectories(spec, 16)
    r = spec.radius.unsqueeze(-1) * scales
    assert bool(((centres[..., 0] - r) >= 0).all() and ((centres[..., 0] + r) <= 64).all())
    assert bool(((centres[..., 1] - r) >= 0).all() and ((centres[..., 1] + r) <= 64).all())


def test_paths_move_as_described():
    spec = _specs(8, n=200)
    centres, scales = vd.trajectories(spec, 16)
    for i in range(len(spec)):
        path = vd.PATH_NAMES[int(spec.path[i, 0])]
        disp = centres[i, 0, -1] - centres[i, 0, 0]
        want = torch.tensor(path_vector(path))
        if path == "bounce":
            assert torch.allclose(disp, torch.zeros(2), atol=1e-4)
            assert float((centres[i, 0, 8] - centres[i, 0, 0])[0]) > 25
        elif path == "grow":
            assert float(scales[i, 0, -1] / scales[i, 0, 0]) > 2.5
        else:
            assert torch.allclose(disp, want, atol=1e-4)


def test_prompts_describe_the_spec():
    spec = _specs(9, n=40, two_object_prob=0.5, pan_prob=0.5)
    for text, truth in zip(vd.spec_prompts(spec), vd.clip_truths(spec)):
        assert text.startswith(f"a {truth.objects[0].colour} ")
        assert f"{truth.tone} {truth.background} background" in text
        assert ("camera pans" in text) == (truth.pan != "none")
        assert text.count(" and a ") == len(truth.objects) - 1
        if len(truth.objects) == 2:
            assert truth.objects[0].colour != truth.objects[1].colour
        assert set(text.split()) <= set(vocabulary())


def test_heldout_set_is_fixed_distinct_and_excluded_from_training():
    held = vd.heldout_specs()
    prompts = vd.spec_prompts(held)
    assert len(prompts) == 64 and len(set(prompts)) == 64
    assert prompts == vd.spec_prompts(vd.heldout_specs())
    assert int(held.present[:, 1].sum()) == vd.HELDOUT_DOUBLE
    # Exclusion works: re-drawing a batch while excluding its own prompts removes every one of them.
    base = set(vd.spec_prompts(_specs(21, n=50)))
    again = vd.spec_prompts(_specs(21, n=50, exclude_prompts=frozenset(base)))
    assert not (set(again) & base)


def test_paths_and_textures_restrict_the_draw_and_defaults_are_unchanged():
    from dit_sparse.pipelines.clip_spec import PATH_NAMES, TEXTURES

    a = vd.sample_specs(200, torch.Generator().manual_seed(3))
    b = vd.sample_specs(200, torch.Generator().manual_seed(3), paths=None, textures=None)
    assert torch.equal(a.path, b.path) and torch.equal(a.texture, b.texture)  # None: the same stream as before
    easy = vd.sample_specs(200, torch.Generator().manual_seed(3), paths=("left", "up"), textures=("solid",))
    assert {PATH_NAMES[i] for i in easy.path.flatten().tolist()} == {"left", "up"}
    assert {TEXTURES[i] for i in easy.texture.flatten().tolist()} == {"solid"}
    with pytest.raises(ValueError, match="subset"):
        vd.sample_specs(2, torch.Generator().manual_seed(0), paths=("sideways",))
