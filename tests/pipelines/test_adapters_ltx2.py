"""The LTX-2 adapter on tiny random audio-video transformers (CPU, float32), and a tiny LTX2Pipeline run.

Two variants of the model: LTX-2.0 (interleaved RoPE, prompt projections, plain processors) and LTX-2.3/2.5
(split RoPE, gated attention, prompt modulation, STG processors, spatial patch 2). As for every adapter:
sparsity 0 is bitwise Diffusers; `remove` restores the very same processor objects; the "full" plan (every
block through the block-sparse reference executor) matches dense attention; sparse methods run; the layout
accounts for every video token. Only the video self-attention (`attn1`) may reach the sparse core: the audio
self-attention, both prompt cross-attentions and the audio<->video cross-attentions keep their processors.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import pytest
import torch
from _tiny import (
    BATCH,
    HEADS,
    TEXT,
    apply_full,
    assert_close,
    assert_dense_is_bitwise_and_remove_restores,
    assert_equal,
    assert_falls_back_to_dense,
    assert_full_plan_matches_dense,
    assert_layout_accounts_for_every_token,
    case_fixture,
    processors,
    randn,
    seeded_model,
    sparse_run,
)
from diffusers import LTX2VideoTransformer3DModel
from diffusers.models.transformers.transformer_ltx2 import LTX2AudioVideoAttnProcessor
from dit_sparse.pipelines.families import get_adapter, supported_models
from dit_sparse.pipelines.ltx2 import LTX2Adapter, _frame_major_grid

import dit_sparse

AUDIO_FRAMES = 6
LAYERS = 2
# Every attention module of an LTX-2 block; only the first is video self-attention.
BLOCK_ATTENTIONS = ("attn1", "audio_attn1", "attn2", "audio_attn2", "audio_to_video_attn", "video_to_audio_attn")
VIDEO_SELF_ATTENTION = [f"transformer_blocks.{i}.attn1" for i in range(LAYERS)]
TINY = dict(
    out_channels=4, num_attention_heads=HEADS, attention_head_dim=12, cross_attention_dim=24, audio_in_channels=4,
    audio_out_channels=4, audio_num_attention_heads=HEADS, audio_attention_head_dim=8, audio_cross_attention_dim=16,
    num_layers=LAYERS, caption_channels=16,
)


@dataclass
class Variant:
    """A tiny LTX-2 model, how to feed it, and what the adapter must report."""

    name: str
    build: Callable[[], torch.nn.Module]
    inputs: Callable[..., dict]
    grid: tuple[int, int, int]  # (frames, rows, cols) after patching
    sparse_class: str


def _ltx20() -> torch.nn.Module:
    return LTX2VideoTransformer3DModel(in_channels=4, **TINY)


def _ltx20_inputs(model, seed: int, frames: int = 3, height: int = 5, width: int = 4) -> dict:
    # The T2V pipeline's call without video_coords: the model builds them from the latent sizes.
    g = torch.Generator().manual_seed(seed)
    return dict(
        hidden_states=randn(g, BATCH, frames * height * width, 4),
        audio_hidden_states=randn(g, BATCH, AUDIO_FRAMES, 4),
        encoder_hidden_states=randn(g, BATCH, TEXT, 16),
        audio_encoder_hidden_states=randn(g, BATCH, TEXT, 16),
        timestep=torch.rand(BATCH, generator=g) * 1000,
        num_frames=frames, height=height, width=width, audio_num_frames=AUDIO_FRAMES,
        return_dict=False,
    )


def _ltx23() -> torch.nn.Module:
    return LTX2VideoTransformer3DModel(
        in_channels=16, patch_size=2, rope_type="split", gated_attn=True, audio_gated_attn=True, cross_attn_mod=True,
        audio_cross_attn_mod=True, perturbed_attn=True, use_prompt_embeddings=False, **TINY,
    )


def _ltx23_coords(model, frames: int = 3, height: int = 10, width: int = 6) -> torch.Tensor:
    return model.rope.prepare_video_coords(BATCH, frames, height, width, torch.device("cpu"), fps=24.0)


def _ltx23_inputs(model, seed: int, **kwargs) -> dict:
    # The DFR pipelines' call: only video_coords (latent 3 x 10 x 6 with spatial patch 2), no latent sizes.
    g = torch.Generator().manual_seed(seed)
    t = torch.rand(BATCH, generator=g) * 1000
    return dict(
        hidden_states=randn(g, BATCH, 3 * 5 * 3, 16),
        audio_hidden_states=randn(g, BATCH, AUDIO_FRAMES, 4),
        encoder_hidden_states=randn(g, BATCH, TEXT, 24),  # no prompt projection: text arrives at model width
        audio_encoder_hidden_states=randn(g, BATCH, TEXT, 16),
        timestep=t, sigma=t / 1000, video_coords=_ltx23_coords(model), audio_num_frames=AUDIO_FRAMES,
        return_dict=False, **kwargs,
    )


VARIANTS = [
    Variant("ltx2.0", _ltx20, _ltx20_inputs, (3, 5, 4), "LTX2SparseAttnProcessor"),
    Variant("ltx2.3", _ltx23, _ltx23_inputs, (3, 5, 3), "LTX2SparsePerturbedAttnProcessor"),
]


def _run(model, inputs) -> tuple[torch.Tensor, torch.Tensor]:
    """(video, audio) outputs: sparse video attention reaches the audio through video_to_audio_attn."""
    with torch.no_grad():
        video, audio = model(**inputs)
    return video, audio


case = case_fixture(VARIANTS, forward=_run)


def test_only_video_self_attention_is_listed(case):
    _, model, _, _ = case
    names = [name for name, _ in get_adapter(model).self_attention_modules(model)]
    assert names == VIDEO_SELF_ATTENTION
    assert isinstance(get_adapter(model), LTX2Adapter)
    assert "LTX2VideoTransformer3DModel" in supported_models()


def test_sparsity_zero_is_bitwise_diffusers_and_remove_restores(case):
    variant, model, inputs, reference = case
    assert len(processors(model)) == LAYERS * len(BLOCK_ATTENTIONS)
    # Audio self-attention and every cross-attention keep their processor object.
    assert_dense_is_bitwise_and_remove_restores(model, inputs, reference, VIDEO_SELF_ATTENTION, {variant.sparse_class},
                                                methods=("window3d", "dense", "full"), forward=_run)


def test_full_plan_through_block_executor_matches_dense(case):
    _, model, inputs, reference = case
    assert_full_plan_matches_dense(model, inputs, reference, LAYERS, forward=_run)


# Blocks of 16 tokens: the default block is larger than these tiny sequences, which would leave nothing to skip.
@pytest.mark.parametrize("method,options", [("pooled", {"block_size": 16}), ("window3d", {})], ids=["pooled", "window3d"])
def test_sparse_methods_run_on_video_self_attention_only(case, method, options):
    _, model, inputs, reference = case
    handle = dit_sparse.apply(model, method, 0.75, warmup_steps=0, warmup_layers=0, num_steps=2, **options)
    result = sparse_run(handle, partial(_run, model, inputs))
    assert result.stats["sparse_calls"] == LAYERS and result.stats["fallback_calls"] == 0
    assert result.stats["sparsity_in_sparse_calls"] > 0.5
    assert [c.layer_name for c in result.calls] == VIDEO_SELF_ATTENTION
    for got, ref in zip(result.output, reference, strict=True):
        assert got.shape == ref.shape and torch.isfinite(got).all()
        assert not torch.equal(got, ref)  # attention really was skipped


def test_layout_accounts_for_every_video_token(case):
    variant, model, inputs, _ = case
    # Text is cross-attention: the sequence is video only.
    calls = assert_layout_accounts_for_every_token(model, inputs, variant.grid, forward=_run)
    assert len(calls) == LAYERS
    assert all(c.q[3] == 12 for c in calls)  # head dim


# ---------------------------------------------------------------------------------------------- layout details
def test_layout_from_sizes_with_patching_and_from_coords():
    adapter = LTX2Adapter()
    model = seeded_model(VARIANTS[1].build)  # patch_size 2, patch_size_t 1
    x = torch.randn(1, 45, 16)
    # Latent sizes are given before patching; odd sizes round up as prepare_video_coords does.
    assert adapter.layout(model, (x,), {"num_frames": 3, "height": 10, "width": 6}) == dit_sparse.VideoLayout(3, 5, 3)
    assert adapter.layout(model, (x,), {"num_frames": 3, "height": 9, "width": 5}) == dit_sparse.VideoLayout(3, 5, 3)
    # Keyframe / reference tokens appended (condition, IC-LoRA pipelines): not one grid.
    assert adapter.layout(model, (torch.randn(1, 50, 16),), {"num_frames": 3, "height": 10, "width": 6}) is None
    # Positional arguments, as the forward signature orders them.
    args = (x, None, None, None, None, None, None, None, None, None, 3, 10, 6)
    assert adapter.layout(model, args, {}) == dit_sparse.VideoLayout(3, 5, 3)
    assert adapter.layout(model, (x,), {}) is None

    coords = _ltx23_coords(model)
    assert adapter.layout(model, (x,), {"video_coords": coords}) == dit_sparse.VideoLayout(3, 5, 3)
    assert adapter.layout(model, (x,), {"video_coords": coords.mean(-1)}) == dit_sparse.VideoLayout(3, 5, 3)
    # A temporal window of a longer canvas (the DFR pipelines' tiles) is a grid of its own.
    long = model.rope.prepare_video_coords(BATCH, 5, 10, 6, torch.device("cpu"))
    window = long[:, :, 15:60]
    assert adapter.layout(model, (x,), {"video_coords": window}) == dit_sparse.VideoLayout(3, 5, 3)


def test_coords_that_are_not_one_frame_major_grid_give_no_layout():
    model = seeded_model(VARIANTS[1].build)
    coords = _ltx23_coords(model)
    assert _frame_major_grid(coords) == (3, 5, 3)
    assert _frame_major_grid(coords[:, :, torch.randperm(45, generator=torch.Generator().manual_seed(0))]) is None
    assert _frame_major_grid(coords[:, :, :44]) is None  # a ragged last frame
    assert _frame_major_grid(torch.cat([coords, coords[:, :, :5]], dim=2)) is None  # a repeated keyframe row
    other = coords.clone()
    other[1] = other[1].flip(1)  # batch rows in different token orders
    assert _frame_major_grid(other) is None


def test_coords_grid_is_computed_once_per_coords_tensor(monkeypatch):
    import dit_sparse.pipelines.ltx2 as ltx2

    model = seeded_model(VARIANTS[1].build)
    coords = _ltx23_coords(model)
    calls = []
    monkeypatch.setattr(ltx2, "_frame_major_grid", lambda c: calls.append(c) or (3, 5, 3))
    adapter = LTX2Adapter()
    x = torch.randn(1, 45, 16)
    for _ in range(3):  # the pipelines pass the same coords tensor at every step
        assert adapter.layout(model, (x,), {"video_coords": coords}) == dit_sparse.VideoLayout(3, 5, 3)
    assert len(calls) == 1
    coords.add_(0.0)  # changed in place: looked at again
    adapter.layout(model, (x,), {"video_coords": coords})
    assert len(calls) == 2


# ---------------------------------------------------------------------------------------------- STG and masks
@pytest.mark.parametrize("perturbation_mask", [None, torch.tensor([0.0, 1.0])], ids=["all-rows", "first-row"])
def test_spatio_temporal_guidance_blocks(perturbation_mask):
    # STG in block 1. All rows perturbed: that block's attention is skipped (value projection only), so the core
    # runs block 0 alone. One row perturbed: both run through the core and the values are blended in after.
    model = seeded_model(VARIANTS[1].build)
    inputs = _ltx23_inputs(model, seed=2, spatio_temporal_guidance_blocks=[1], perturbation_mask=perturbation_mask)
    reference = _run(model, inputs)
    with dit_sparse.sparse_attention(model, "window3d", 0.0):
        assert_equal(_run(model, inputs), reference)
    result = sparse_run(apply_full(model), partial(_run, model, inputs))
    expected = ["transformer_blocks.0.attn1"] + (["transformer_blocks.1.attn1"] if perturbation_mask is not None else [])
    assert [c.layer_name for c in result.calls] == expected
    assert_close(result.output, reference)


def test_video_self_attention_mask_falls_back_to_dense():
    # IC-LoRA's multiplicative video mask: partly masked pairs cannot be a block plan, the core runs dense.
    model = seeded_model(VARIANTS[0].build)
    inputs = _ltx20_inputs(model, seed=3)
    tokens = inputs["hidden_states"].shape[1]
    mask = torch.ones(BATCH, tokens, tokens)
    mask[:, :, -10:] = 0.5
    inputs["video_self_attention_mask"] = mask
    assert_falls_back_to_dense(model, inputs, fallback_calls=LAYERS, forward=_run)

    inputs["video_self_attention_mask"] = torch.ones(BATCH, tokens, tokens)  # nothing masked: sparse is exact
    assert_full_plan_matches_dense(model, inputs, _run(model, inputs), LAYERS, forward=_run)


def test_unknown_processors_are_kept_with_a_warning():
    class CustomProcessor(LTX2AudioVideoAttnProcessor):
        pass

    original = CustomProcessor()
    with pytest.warns(UserWarning, match="stays dense"):
        assert LTX2Adapter().make_processor(original, None, 0, "transformer_blocks.0.attn1") is original


# ---------------------------------------------------------------------------------------------- real pipeline
def _tiny_pipeline():
    """LTX2Pipeline from tiny random components, built offline.

    No text encoder or tokenizer: prompt embeddings (stacked per-layer hidden states, as Gemma's would be) are
    passed in and go through the real text connectors. The VAEs only lend their latent statistics and
    compression ratios (latent output: nothing is decoded, so no vocoder either).
    """
    from diffusers import (
        AutoencoderKLLTX2Audio,
        AutoencoderKLLTX2Video,
        FlowMatchEulerDiscreteScheduler,
        LTX2Pipeline,
    )
    from diffusers.pipelines.ltx2.connectors import LTX2TextConnectors

    torch.manual_seed(0)
    vae = AutoencoderKLLTX2Video(
        latent_channels=4, block_out_channels=(8,), down_block_types=("LTX2VideoDownBlock3D",),
        decoder_block_out_channels=(8,), layers_per_block=(1, 1), decoder_layers_per_block=(1, 1),
        spatio_temporal_scaling=(True,), decoder_spatio_temporal_scaling=(True,), decoder_inject_noise=(False, False),
        downsample_type=("spatiotemporal",), upsample_type=("spatiotemporal",), upsample_residual=(True,),
        upsample_factor=(2,), patch_size=1, spatial_compression_ratio=32, temporal_compression_ratio=8,
    )
    # Packed audio latents are [B, L, channels * mel bins / 4] = [B, L, 4]: the transformer's audio_in_channels.
    audio_vae = AutoencoderKLLTX2Audio(base_channels=4, ch_mult=(1,), num_res_blocks=1, latent_channels=2, mel_bins=8)
    connectors = LTX2TextConnectors(
        caption_channels=16, text_proj_in_factor=2, video_connector_num_attention_heads=2,
        video_connector_attention_head_dim=8, video_connector_num_layers=1,
        video_connector_num_learnable_registers=None, audio_connector_num_attention_heads=2,
        audio_connector_attention_head_dim=8, audio_connector_num_layers=1,
        audio_connector_num_learnable_registers=None, connector_rope_base_seq_len=32,
    )
    transformer = LTX2VideoTransformer3DModel(in_channels=4, perturbed_attn=True, **TINY).eval()
    return LTX2Pipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, audio_vae=audio_vae, text_encoder=None,
                        tokenizer=None, connectors=connectors, transformer=transformer, vocoder=None)


def test_ltx2_pipeline_with_cfg_stg_and_modality_guidance():
    pipe = _tiny_pipeline()
    g = torch.Generator().manual_seed(5)
    prompt, negative = randn(g, 1, TEXT, 32), randn(g, 1, TEXT, 32)
    prompt_mask = (torch.arange(TEXT) >= 2)[None].long()  # Gemma pads on the left
    negative_mask = (torch.arange(TEXT) >= 4)[None].long()

    def call() -> torch.Tensor:
        video, _ = pipe(
            prompt_embeds=prompt, prompt_attention_mask=prompt_mask, negative_prompt_embeds=negative,
            negative_prompt_attention_mask=negative_mask, height=128, width=160, num_frames=17,
            num_inference_steps=2, guidance_scale=4.0, stg_scale=1.0, modality_scale=2.0,
            spatio_temporal_guidance_blocks=[1], generator=torch.Generator().manual_seed(0), output_type="latent",
            return_dict=False,
        )
        return video

    dense = call()
    result = sparse_run(apply_full(pipe.transformer), call)
    assert dense.shape == (1, 4, 3, 4, 5)  # 17 frames at 128 x 160 -> a 3 x 4 x 5 latent grid
    assert_close(result.output, dense)
    # Per step: CFG batched (both layers), STG (block 1 skips attention: block 0 only), modality isolation.
    assert sorted({c.branch for c in result.calls}) == ["cond_uncond", "uncond_modality", "uncond_stg"]
    assert result.stats["sparse_calls"] == 2 * (LAYERS + 1 + LAYERS) and result.stats["fallback_calls"] == 0

    # A real sparse method through dit_sparse.apply(pipe, ...): both CFG halves in the one batched call.
    result = sparse_run(dit_sparse.apply(pipe, "pooled", 0.75, warmup_steps=0, warmup_layers=0, block_size=16), call)
    assert torch.isfinite(result.output).all()
    stats = result.stats
    assert stats["sparse_calls"] == 2 * (LAYERS + 1 + LAYERS) and stats["sparsity_in_sparse_calls"] > 0.5
    cfg_calls = [c for c in result.calls if c.branch == "cond_uncond"]
    assert len(cfg_calls) == 2 * LAYERS and all(c.q[0] == 2 for c in cfg_calls)  # [uncond, cond] batch
    assert {(c.layout.frames, c.layout.rows, c.layout.cols) for c in result.calls} == {(3, 4, 5)}
