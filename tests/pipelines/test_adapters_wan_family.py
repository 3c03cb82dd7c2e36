"""Adapters for the transformers that share Wan's self-attention: SkyReels-V2, Wan VACE, Wan Animate and
ChronoEdit, on tiny random models (CPU, float32), plus sparse runs through their real Diffusers pipelines.

Per family, as for the other adapters: sparsity 0 is bitwise Diffusers; `remove` restores the very same
processor objects; the "full" plan (every block through the block-sparse CPU executor) matches dense
attention; the reported layout accounts for every token.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from _tiny import (
    BATCH,
    HEADS,
    TEXT,
    assert_close,
    assert_dense_is_bitwise_and_remove_restores,
    assert_falls_back_to_dense,
    assert_full_plan_matches_dense,
    assert_layout_accounts_for_every_token,
    case_fixture,
    processors,
    randn,
    seeded_model,
    sparse_run,
)
from diffusers import (
    AutoencoderKLWan,
    ChronoEditTransformer3DModel,
    FlowMatchEulerDiscreteScheduler,
    SkyReelsV2Transformer3DModel,
    UniPCMultistepScheduler,
    WanAnimateTransformer3DModel,
    WanVACETransformer3DModel,
)
from dit_sparse.pipelines.families import get_adapter, supported_models

import dit_sparse

FRAMES, HEIGHT, WIDTH = 3, 10, 6  # latent sizes; patch (1, 2, 2) -> grid (3, 5, 3), 45 tokens
GRID = (3, 5, 3)
TINY = dict(patch_size=(1, 2, 2), num_attention_heads=HEADS, attention_head_dim=12, text_dim=16, freq_dim=32,
            ffn_dim=32, num_layers=2, rope_max_seq_len=32)


def _common_inputs(g: torch.Generator, channels: int = 4, frames: int = FRAMES) -> dict:
    return dict(
        hidden_states=randn(g, BATCH, channels, frames, HEIGHT, WIDTH),
        timestep=torch.rand(BATCH, generator=g) * 1000,
        encoder_hidden_states=randn(g, BATCH, TEXT, 16),
        return_dict=False,
    )


@dataclass
class Family:
    """A tiny model of one family, how to feed it, and what the adapter must report."""

    name: str
    build: Callable[[], torch.nn.Module]
    inputs: Callable[..., dict]  # (model, seed) -> forward kwargs
    sparse_modules: list[str]  # in the adapter's layer order
    grid: tuple[int, int, int]
    sparse_class: str


def _skyreels(**extra) -> torch.nn.Module:
    return SkyReelsV2Transformer3DModel(in_channels=4, out_channels=4, **TINY, **extra)


def _skyreels_inputs(model, seed: int, frames: int = FRAMES) -> dict:
    return _common_inputs(torch.Generator().manual_seed(seed), frames=frames)


def _vace() -> torch.nn.Module:
    return WanVACETransformer3DModel(in_channels=4, out_channels=4, vace_layers=[0], vace_in_channels=6, **TINY)


def _vace_inputs(model, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    return dict(**_common_inputs(g), control_hidden_states=randn(g, BATCH, 6, FRAMES, HEIGHT, WIDTH),
                control_hidden_states_scale=torch.tensor([0.7]))


def _animate() -> torch.nn.Module:
    return WanAnimateTransformer3DModel(
        in_channels=None, latent_channels=4, out_channels=4, image_dim=8, motion_encoder_size=16,
        motion_encoder_channel_sizes={"16": 8, "8": 8, "4": 8}, motion_style_dim=8, motion_dim=4,
        motion_encoder_dim=8, face_encoder_hidden_dim=8, face_encoder_num_heads=2, inject_face_latents_blocks=1,
        **TINY,
    )


def _animate_inputs(model, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    # Frame 0 is the reference image; pose latents cover the other FRAMES - 1 frames, and 5 face frames
    # shrink to those 2 in the face encoder's two stride-2 convolutions.
    return dict(**_common_inputs(g, channels=2 * 4 + 4), encoder_hidden_states_image=randn(g, BATCH, 5, 8),
                pose_hidden_states=randn(g, BATCH, 4, FRAMES - 1, HEIGHT, WIDTH),
                face_pixel_values=randn(g, BATCH, 3, 5, 16, 16))


def _chronoedit() -> torch.nn.Module:
    return ChronoEditTransformer3DModel(in_channels=4, out_channels=4, rope_temporal_skip_len=5, **TINY)


def _chronoedit_inputs(model, seed: int) -> dict:
    # Two latent frames: the input and the edited image, with ChronoEdit's skipped temporal RoPE positions.
    return _common_inputs(torch.Generator().manual_seed(seed), frames=2)


WAN_ATTN1 = ["blocks.0.attn1", "blocks.1.attn1"]
FAMILIES = [
    Family("skyreels_v2", _skyreels, _skyreels_inputs, WAN_ATTN1, GRID, "SkyReelsV2SparseAttnProcessor"),
    Family("wan_vace", _vace, _vace_inputs, [*WAN_ATTN1, "vace_blocks.0.attn1"], GRID, "WanSparseAttnProcessor"),
    Family("wan_animate", _animate, _animate_inputs, WAN_ATTN1, GRID, "WanAnimateSparseAttnProcessor"),
    Family("chronoedit", _chronoedit, _chronoedit_inputs, WAN_ATTN1, (2, 5, 3), "ChronoEditSparseAttnProcessor"),
]


case = case_fixture(FAMILIES)


def test_adapter_names_the_self_attention_modules(case):
    family, model, _, _ = case
    adapter = get_adapter(model)
    assert adapter.family == family.name and adapter.text_first is None
    assert [name for name, _ in adapter.self_attention_modules(model)] == family.sparse_modules
    assert type(model).__name__ in supported_models()


def test_dense_is_bitwise_diffusers_and_remove_restores(case):
    family, model, inputs, reference = case
    # The sparse processors stay drop-ins for Diffusers' class; cross-attention and face adapters keep theirs.
    assert_dense_is_bitwise_and_remove_restores(model, inputs, reference, family.sparse_modules,
                                                {family.sparse_class}, subclass_original=True)


def test_full_plan_through_cpu_executor_matches_dense(case):
    family, model, inputs, reference = case
    for backend in ("reference", "cpu"):
        assert_full_plan_matches_dense(model, inputs, reference, len(family.sparse_modules), backend=backend)


def test_layout_accounts_for_every_token(case):
    family, model, inputs, _ = case
    calls = assert_layout_accounts_for_every_token(model, inputs, family.grid)  # video only: no text tokens
    assert sorted(c.layer_name for c in calls) == sorted(family.sparse_modules)


def test_skyreels_block_causal_mask_runs_dense_with_a_warning():
    # Asynchronous diffusion forcing: 2-frame causal blocks give attn1 a boolean mask no block plan expresses.
    model = seeded_model(lambda: _skyreels(num_frame_per_block=2))
    assert_falls_back_to_dense(model, _skyreels_inputs(model, seed=2, frames=4))


# ---------------------------------------------------------------------------------------------- pipelines
def _vae() -> AutoencoderKLWan:
    torch.manual_seed(0)
    return AutoencoderKLWan(base_dim=3, z_dim=4, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                            latents_mean=[0.0] * 4, latents_std=[1.0] * 4).eval()


def _sparse_pipeline_run(pipe, transformer_attrs: tuple[str, ...], num_sparse_modules: int, **call) -> dict:
    """Run `pipe` with CFG, dense then sparse ("full" at 0.5 from step 1), and check what ran where."""
    g = torch.Generator().manual_seed(3)
    embeds = dict(prompt_embeds=randn(g, 1, TEXT, 16), negative_prompt_embeds=randn(g, 1, TEXT, 16))
    kwargs = dict(num_inference_steps=2, guidance_scale=5.0, output_type="latent", **embeds, **call)
    before = {a: processors(getattr(pipe, a)) for a in transformer_attrs}
    dense = pipe(generator=torch.Generator().manual_seed(0), **kwargs).frames
    handle = dit_sparse.apply(pipe, "full", 0.5, warmup_steps=1, warmup_layers=0, block_size=16, backend="cpu")
    # Undone through the pipeline, which must restore every transformer's processors.
    result = sparse_run(handle, lambda: pipe(generator=torch.Generator().manual_seed(0), **kwargs).frames,
                        undo=lambda: dit_sparse.remove(pipe))
    assert all(processors(getattr(pipe, a)) == before[a] for a in transformer_attrs)
    # Step 0 dense (warm-up), step 1 sparse, each for the cond and the uncond branch.
    assert sorted({(c.expert, c.step, c.branch) for c in result.calls}) == [
        (attr, step, branch) for attr in sorted(transformer_attrs) for step in (0, 1) for branch in ("cond", "uncond")]
    stats = result.stats
    assert stats["dense_calls"] == 2 * num_sparse_modules and stats["sparse_calls"] == 2 * num_sparse_modules
    assert_close(result.output, dense)
    return stats


def test_skyreels_v2_pipeline_runs_sparse_with_cfg():
    from diffusers import SkyReelsV2Pipeline

    torch.manual_seed(0)
    pipe = SkyReelsV2Pipeline(tokenizer=None, text_encoder=None, transformer=_skyreels().eval(), vae=_vae(),
                              scheduler=UniPCMultistepScheduler(prediction_type="flow_prediction",
                                                                use_flow_sigmas=True, flow_shift=3.0))
    _sparse_pipeline_run(pipe, ("transformer",), 2, height=32, width=48, num_frames=5)


def test_wan_vace_pipeline_runs_sparse_with_cfg():
    from diffusers import WanVACEPipeline

    torch.manual_seed(0)
    # VACE control input: 4 channels of video latents + 4 of reactive latents + 4 x 4 x 4 mask pixels.
    transformer = WanVACETransformer3DModel(in_channels=4, out_channels=4, vace_layers=[0],
                                            vace_in_channels=4 + 4 + 64, **TINY).eval()
    pipe = WanVACEPipeline(tokenizer=None, text_encoder=None, vae=_vae(), transformer=transformer,
                           scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0))
    _sparse_pipeline_run(pipe, ("transformer",), 3, height=32, width=48, num_frames=5)
