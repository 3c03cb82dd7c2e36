"""Model adapters for Wan, HunyuanVideo, CogVideoX, LTX-Video and Flux on tiny random models (CPU, float32).

The checks every adapter must pass run here, over these families and those of test_adapters_other_families.py:
sparsity 0 is bitwise Diffusers; `remove` restores the very same processor objects; the "full" plan (every
block, run by the block-sparse reference executor) matches dense attention, which proves the processors hand
the core the right q, k, v; the reported layout accounts for every token. Then this file's families' details.
"""

from __future__ import annotations

from functools import partial

import pytest
import torch
from _tiny import (
    BATCH,
    TEXT,
    Family,
    apply_full,
    assert_close,
    assert_dense_is_bitwise_and_remove_restores,
    assert_equal,
    assert_falls_back_to_dense,
    assert_full_plan_matches_dense,
    assert_layout_accounts_for_every_token,
    assert_padded_inputs_match_in_turn,
    assert_processors_match,
    case_fixture,
    image_ids,
    randn,
    run,
    seeded_model,
    sparse_names,
    sparse_run,
)
from diffusers import (
    CogVideoXTransformer3DModel,
    FluxTransformer2DModel,
    HunyuanVideoTransformer3DModel,
    LTXVideoTransformer3DModel,
    SD3Transformer2DModel,
    WanTransformer3DModel,
)
from diffusers.models.embeddings import get_3d_rotary_pos_embed
from dit_sparse.pipelines.adapters import UnsupportedModelError
from dit_sparse.pipelines.families import get_adapter, supported_models
from dit_sparse.pipelines.flux import FluxAdapter
from dit_sparse.pipelines.padded_text import KeyPaddingTrim
from test_adapters_other_families import FAMILIES as OTHER_FAMILIES
from test_adapters_other_families import MOCHI_WARNING

import dit_sparse

# The Mochi families of the shared table warn on every forward (see test_adapters_other_families.py).
pytestmark = pytest.mark.filterwarnings(f"ignore:{MOCHI_WARNING}")


# ---------------------------------------------------------------------------------------------- Wan
def _wan() -> torch.nn.Module:
    return WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=4, out_channels=4,
        text_dim=16, freq_dim=32, ffn_dim=32, num_layers=2, qk_norm="rms_norm_across_heads", rope_max_seq_len=32,
    )


def _wan_inputs(model, seed):
    g = torch.Generator().manual_seed(seed)
    return dict(
        hidden_states=randn(g, BATCH, 4, 3, 10, 6),
        timestep=torch.rand(BATCH, generator=g) * 1000,
        encoder_hidden_states=randn(g, BATCH, TEXT, 16),
        return_dict=False,
    )


# ---------------------------------------------------------------------------------------------- HunyuanVideo
def _hunyuan() -> torch.nn.Module:
    return HunyuanVideoTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=10, num_layers=1,
        num_single_layers=1, num_refiner_layers=1, patch_size=2, patch_size_t=1, guidance_embeds=True,
        text_embed_dim=16, pooled_projection_dim=8, rope_axes_dim=(2, 4, 4),
    )


def _hunyuan_inputs(model, seed, valid=(TEXT, TEXT)):
    g = torch.Generator().manual_seed(seed)
    mask = torch.arange(TEXT)[None, :] < torch.tensor(valid)[:, None]
    return dict(
        hidden_states=randn(g, BATCH, 4, 3, 10, 6),
        timestep=torch.rand(BATCH, generator=g) * 1000,
        encoder_hidden_states=randn(g, BATCH, TEXT, 16),
        encoder_attention_mask=mask,
        pooled_projections=randn(g, BATCH, 8),
        guidance=torch.full((BATCH,), 3500.0),
        return_dict=False,
    )


# ---------------------------------------------------------------------------------------------- CogVideoX
def _cogvideox(patch_size_t=None) -> torch.nn.Module:
    return CogVideoXTransformer3DModel(
        num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4, time_embed_dim=8,
        text_embed_dim=16, num_layers=2, sample_width=12, sample_height=10, sample_frames=9, patch_size=2,
        patch_size_t=patch_size_t, max_text_seq_length=TEXT, use_rotary_positional_embeddings=True,
    )


def _cogvideox_inputs(model, seed):
    g = torch.Generator().manual_seed(seed)
    frames, height, width = 4, 10, 12
    p, pt = model.config.patch_size, model.config.patch_size_t or 1
    grid = (height // p, width // p)
    cos, sin = get_3d_rotary_pos_embed(
        embed_dim=model.config.attention_head_dim, crops_coords=((0, 0), grid), grid_size=grid,
        temporal_size=frames // pt,
    )
    return dict(
        hidden_states=randn(g, BATCH, frames, 4, height, width),
        encoder_hidden_states=randn(g, BATCH, TEXT, 16),
        timestep=torch.randint(0, 1000, (BATCH,), generator=g),
        image_rotary_emb=(cos, sin),
        return_dict=False,
    )


# ---------------------------------------------------------------------------------------------- LTX-Video
def _ltx() -> torch.nn.Module:
    return LTXVideoTransformer3DModel(
        in_channels=8, out_channels=8, patch_size=1, patch_size_t=1, num_attention_heads=2, attention_head_dim=8,
        cross_attention_dim=16, num_layers=2, caption_channels=16,
    )


def _ltx_inputs(model, seed):
    g = torch.Generator().manual_seed(seed)
    frames, height, width = 3, 5, 7
    mask = torch.ones(BATCH, TEXT, dtype=torch.long)
    mask[1, 4:] = 0  # padded text in the cross-attention: attn2 keeps the original processor
    return dict(
        hidden_states=randn(g, BATCH, frames * height * width, 8),
        encoder_hidden_states=randn(g, BATCH, TEXT, 16),
        timestep=torch.rand(BATCH, generator=g) * 1000,
        encoder_attention_mask=mask,
        num_frames=frames,
        height=height,
        width=width,
        rope_interpolation_scale=(8 / 25, 32, 32),
        return_dict=False,
    )


# ---------------------------------------------------------------------------------------------- Flux
def _flux() -> torch.nn.Module:
    return FluxTransformer2DModel(
        patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=(4, 4, 8),
    )


_flux_ids = partial(image_ids, axes=3)  # (0, row, col)


def _flux_inputs(model, seed):
    g = torch.Generator().manual_seed(seed)
    rows, cols = 5, 9  # not square: the grid must come from the ids
    return dict(
        hidden_states=randn(g, BATCH, rows * cols, 4),
        encoder_hidden_states=randn(g, BATCH, TEXT, 32),
        pooled_projections=randn(g, BATCH, 32),
        timestep=torch.rand(BATCH, generator=g),
        img_ids=_flux_ids(rows, cols),
        txt_ids=torch.zeros(TEXT, 3),
        return_dict=False,
    )


FAMILIES = [
    Family("wan", _wan, _wan_inputs, (3, 5, 3), 0, None, {"WanSparseAttnProcessor"}),
    Family("hunyuan_video", _hunyuan, _hunyuan_inputs, (3, 5, 3), TEXT, False, {"HunyuanVideoSparseAttnProcessor"}),
    Family("cogvideox", _cogvideox, _cogvideox_inputs, (4, 5, 6), TEXT, True, {"CogVideoXSparseAttnProcessor"}),
    Family("cogvideox_1.5", lambda: _cogvideox(2), _cogvideox_inputs, (2, 5, 6), TEXT, True,
           {"CogVideoXSparseAttnProcessor"}),
    Family("ltx_video", _ltx, _ltx_inputs, (3, 5, 7), 0, None, {"LTXVideoSparseAttnProcessor"}),
    Family("flux", _flux, _flux_inputs, (1, 5, 9), TEXT, True, {"FluxSparseAttnProcessor"}),
]
# Every family that shares these checks: the ones above, then the newer ones.
ALL_FAMILIES = FAMILIES + OTHER_FAMILIES


case = case_fixture(ALL_FAMILIES)


def test_dense_is_bitwise_diffusers_and_remove_restores(case):
    family, model, inputs, reference = case
    sparse = sparse_names(model)
    assert len(sparse) == family.num_sparse
    assert_dense_is_bitwise_and_remove_restores(model, inputs, reference, sparse, family.sparse_classes)


def test_full_plan_through_block_executor_matches_dense(case):
    family, model, inputs, reference = case
    assert_full_plan_matches_dense(model, inputs, reference, family.num_sparse, allowed_warning=family.own_warning)


def test_layout_accounts_for_every_token(case):
    family, model, inputs, _ = case
    calls = assert_layout_accounts_for_every_token(model, inputs, family.grid, text_tokens=family.text_in_attention,
                                                   text_first=family.text_first, allowed_warning=family.own_warning)
    assert len(calls) == family.num_sparse
    assert get_adapter(model).text_first == family.text_first


@pytest.mark.parametrize("name", ["flux", "flux2"])
def test_attention_backend_is_carried_over(name):
    family = next(f for f in ALL_FAMILIES if f.name == name)
    model = seeded_model(family.build)
    inputs = family.inputs(model, seed=2)
    reference = run(model, inputs)
    model.set_attention_backend("native")
    with dit_sparse.sparse_attention(model, "full", 0.0):
        backends = {m.processor._attention_backend for _, m in get_adapter(model).self_attention_modules(model)}
        assert len(backends) == 1 and str(backends.pop().value) == "native"
        assert torch.equal(run(model, inputs), reference)


# ---------------------------------------------------------------------------------------------- per-family details
def test_hunyuan_padded_text_runs_sparse_on_the_valid_prefix():
    model = seeded_model(_hunyuan)
    padded = [_hunyuan_inputs(model, seed=3, valid=v) for v in ((4, 4), (2, 2))]
    references = [run(model, x) for x in padded]
    with dit_sparse.sparse_attention(model, "full", 0.0):
        assert all(torch.equal(run(model, x), r) for x, r in zip(padded, references))
    assert_padded_inputs_match_in_turn(model, padded, references)


def test_hunyuan_processor_matches_on_padded_text_tokens_too():
    # Padded text outputs never reach the model output (their keys are masked downstream), so check the
    # processors directly.
    model = seeded_model(_hunyuan)
    g = torch.Generator().manual_seed(6)
    video, text, dim = 45, TEXT, 20
    mask = (torch.arange(video + text) < video + 3).expand(BATCH, 1, 1, -1)
    freqs = (randn(g, video, 10), randn(g, video, 10))
    args = (randn(g, BATCH, video, dim), randn(g, BATCH, text, dim), mask, freqs)
    assert_processors_match(model, [model.transformer_blocks[0].attn, model.single_transformer_blocks[0].attn], *args)


def test_hunyuan_unequal_padding_falls_back_to_dense_with_a_warning():
    model = seeded_model(_hunyuan)
    assert_falls_back_to_dense(model, _hunyuan_inputs(model, seed=4, valid=(TEXT, 3)))


def test_key_padding_trim():
    trim = KeyPaddingTrim()
    prefix = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 0]], dtype=torch.bool)[:, None, None]
    assert trim.valid_length(prefix, 4) == 3
    assert trim.valid_length(prefix, 4) == 3  # cached for the same tensor
    assert trim.valid_length(torch.ones(2, 1, 1, 4, dtype=torch.bool), 4) == 4
    assert trim.valid_length(torch.tensor([[1, 0, 1, 1]], dtype=torch.bool)[:, None, None], 4) is None
    assert trim.valid_length(torch.tensor([[1, 1, 0], [1, 0, 0]], dtype=torch.bool)[:, None, None], 3) is None
    assert trim.valid_length(torch.zeros(1, 1, 1, 4), 4) is None  # float masks are not key-padding masks


def test_cogvideox_fused_qkv():
    model = seeded_model(_cogvideox)
    model.fuse_qkv_projections()
    inputs = _cogvideox_inputs(model, seed=5)
    reference = run(model, inputs)
    assert_equal(sparse_run(apply_full(model, sparsity=0.0), partial(run, model, inputs)).output, reference)
    assert_close(sparse_run(apply_full(model), partial(run, model, inputs)).output, reference)


def test_ltx_layout_needs_the_grid_kwargs():
    model = seeded_model(_ltx)
    adapter = get_adapter(model)
    x = torch.randn(1, 3 * 5 * 7, 8)
    assert adapter.layout(model, (x,), {"num_frames": 3, "height": 5, "width": 7}) == dit_sparse.VideoLayout(3, 5, 7)
    assert adapter.layout(model, (x,), {}) is None  # condition pipeline: video_coords only
    assert adapter.layout(model, (x,), {"num_frames": 3, "height": 5, "width": 8}) is None


def test_flux_grid_from_ids():
    adapter = FluxAdapter()
    x = torch.randn(1, 45, 4)
    assert adapter.layout(None, (x,), {"img_ids": _flux_ids(5, 9)}) == dit_sparse.VideoLayout(1, 5, 9)
    assert adapter.layout(None, (x,), {"img_ids": _flux_ids(9, 5)}) == dit_sparse.VideoLayout(1, 9, 5)
    kontext = torch.cat([_flux_ids(3, 5), _flux_ids(3, 5) + torch.tensor([1.0, 0, 0])])[:30]
    assert adapter.layout(None, (torch.randn(1, 30, 4),), {"img_ids": kontext}) is None
    assert adapter.layout(None, (torch.randn(1, 36, 4),), {}) == dit_sparse.VideoLayout(1, 6, 6)
    assert adapter.layout(None, (x,), {}) is None


def test_flux_keeps_processors_it_does_not_know():
    class IPAdapterLike:
        pass

    original = IPAdapterLike()
    with pytest.warns(UserWarning, match="stays dense"):
        assert FluxAdapter().make_processor(original, None, 0, "transformer_blocks.0.attn") is original


def test_unsupported_models_are_named():
    tiny_sd3 = SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, num_layers=1, attention_head_dim=8, num_attention_heads=2,
        caption_projection_dim=16, joint_attention_dim=16, pooled_projection_dim=16, out_channels=4,
    )
    for model in (torch.nn.Linear(4, 4), tiny_sd3):
        with pytest.raises(UnsupportedModelError) as info:
            dit_sparse.apply(model, "full", 0.5)
        message = str(info.value)
        assert type(model).__name__ in message
        for name in ("WanTransformer3DModel", "HunyuanVideoTransformer3DModel", "CogVideoXTransformer3DModel",
                     "LTXVideoTransformer3DModel", "FluxTransformer2DModel"):
            assert name in message and name in supported_models()
        assert getattr(model, "_dit_sparse_handle", None) is None
