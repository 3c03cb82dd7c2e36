"""Adapters for Qwen-Image, Flux.2, HunyuanVideo 1.5, Mochi and Cosmos on tiny random models (CPU, float32).

The checks every adapter must pass (sparsity 0 is bitwise Diffusers; `remove` restores the very same processor
objects; the "full" plan, every block through the block-sparse reference executor, matches dense attention;
the reported layout accounts for every token) run over this file's table in test_adapters.py. Here: each
family's padded-text handling, and sparse runs through the real tiny Diffusers pipelines with CFG.
"""

from __future__ import annotations

from functools import partial

import pytest
import torch
from _tiny import (
    BATCH,
    HEADS,
    TEXT,
    Family,
    apply_full,
    assert_close,
    assert_falls_back_to_dense,
    assert_full_plan_matches_dense,
    assert_padded_inputs_match_in_turn,
    assert_processors_match,
    image_ids,
    randn,
    run,
    seeded_model,
    sparse_run,
)
from diffusers import (
    CosmosTransformer3DModel,
    Flux2Transformer2DModel,
    HunyuanVideo15Transformer3DModel,
    MochiTransformer3DModel,
    QwenImageTransformer2DModel,
)
from dit_sparse.pipelines.families import supported_models
from dit_sparse.pipelines.flux2 import Flux2Adapter
from dit_sparse.pipelines.qwen_image import QwenImageAdapter

import dit_sparse

# Mochi's RoPE asks for float32 CPU autocast on every forward, which torch declines with a warning.
MOCHI_WARNING = "In CPU autocast"
pytestmark = pytest.mark.filterwarnings(f"ignore:{MOCHI_WARNING}")


# ---------------------------------------------------------------------------------------------- Qwen-Image
def _qwen() -> torch.nn.Module:
    return QwenImageTransformer2DModel(
        patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=16,
        num_attention_heads=HEADS, joint_attention_dim=16, axes_dims_rope=(4, 6, 6),
    )


def _qwen_inputs(model, seed, valid=None, shapes=((1, 5, 9),)):
    g = torch.Generator().manual_seed(seed)
    tokens = sum(f * h * w for f, h, w in shapes)
    inputs = dict(
        hidden_states=randn(g, BATCH, tokens, 16),
        encoder_hidden_states=randn(g, BATCH, TEXT, 16),
        timestep=torch.rand(BATCH, generator=g),
        img_shapes=[list(shapes)] * BATCH,
        return_dict=False,
    )
    if valid is not None:
        inputs["encoder_hidden_states_mask"] = torch.arange(TEXT)[None, :] < torch.tensor(valid)[:, None]
    return inputs


# ---------------------------------------------------------------------------------------------- Flux.2
def _flux2() -> torch.nn.Module:
    return Flux2Transformer2DModel(
        patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=HEADS, joint_attention_dim=16, timestep_guidance_channels=16,
        axes_dims_rope=(4, 4, 4, 4), guidance_embeds=True,
    )


_flux2_ids = partial(image_ids, axes=4)  # (t, row, col, 0)


def _flux2_inputs(model, seed):
    g = torch.Generator().manual_seed(seed)
    rows, cols = 5, 9  # not square: the grid must come from the ids
    txt_ids = torch.zeros(TEXT, 4)
    txt_ids[:, 3] = torch.arange(TEXT)
    return dict(
        hidden_states=randn(g, BATCH, rows * cols, 4),
        encoder_hidden_states=randn(g, BATCH, TEXT, 16),
        timestep=torch.rand(BATCH, generator=g),
        img_ids=_flux2_ids(rows, cols)[None].expand(BATCH, -1, -1),
        txt_ids=txt_ids[None].expand(BATCH, -1, -1),
        guidance=torch.full((BATCH,), 4.0),
        return_dict=False,
    )


# ---------------------------------------------------------------------------------------------- HunyuanVideo 1.5
HV15_TEXT, HV15_GLYPH, HV15_IMAGE = 5, 3, 4  # prompt, ByT5 glyph and image tokens (joint text = 12)


def _hv15() -> torch.nn.Module:
    return HunyuanVideo15Transformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=HEADS, attention_head_dim=12, num_layers=2,
        num_refiner_layers=1, patch_size=2, patch_size_t=1, text_embed_dim=16, text_embed_2_dim=8,
        image_embed_dim=8, rope_axes_dim=(4, 4, 4),
    )


def _hv15_inputs(model, seed, valid=(HV15_TEXT, HV15_TEXT), glyph_valid=(2, 2), image=False):
    g = torch.Generator().manual_seed(seed)
    mask = torch.arange(HV15_TEXT)[None, :] < torch.tensor(valid)[:, None]
    mask_2 = torch.arange(HV15_GLYPH)[None, :] < torch.tensor(glyph_valid)[:, None]
    return dict(
        hidden_states=randn(g, BATCH, 4, 3, 10, 6),
        timestep=torch.rand(BATCH, generator=g) * 1000,
        encoder_hidden_states=randn(g, BATCH, HV15_TEXT, 16),
        encoder_attention_mask=mask.long(),
        encoder_hidden_states_2=randn(g, BATCH, HV15_GLYPH, 8),
        encoder_attention_mask_2=mask_2.long(),
        # T2V passes zero image embeddings, which the model marks as padding.
        image_embeds=randn(g, BATCH, HV15_IMAGE, 8) if image else torch.zeros(BATCH, HV15_IMAGE, 8),
        return_dict=False,
    )


# ---------------------------------------------------------------------------------------------- Mochi
def _mochi() -> torch.nn.Module:
    return MochiTransformer3DModel(
        patch_size=2, num_attention_heads=HEADS, attention_head_dim=8, num_layers=2, pooled_projection_dim=16,
        in_channels=4, text_embed_dim=16, time_embed_dim=4, max_sequence_length=16,
    )


def _mochi_inputs(model, seed, valid=(TEXT, TEXT)):
    g = torch.Generator().manual_seed(seed)
    return dict(
        hidden_states=randn(g, BATCH, 4, 3, 10, 6),
        encoder_hidden_states=randn(g, BATCH, TEXT, 16),
        timestep=torch.rand(BATCH, generator=g) * 1000,
        encoder_attention_mask=(torch.arange(TEXT)[None, :] < torch.tensor(valid)[:, None]).long(),
        return_dict=False,
    )


# ---------------------------------------------------------------------------------------------- Cosmos
def _cosmos() -> torch.nn.Module:
    # No padding-mask channel: that path resizes with torchvision, which the project does not install.
    return CosmosTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=HEADS, attention_head_dim=12, num_layers=2,
        text_embed_dim=16, adaln_lora_dim=4, max_size=(8, 16, 16), patch_size=(1, 2, 2),
        concat_padding_mask=False, extra_pos_embed_type="learnable",
    )


def _cosmos_inputs(model, seed):
    g = torch.Generator().manual_seed(seed)
    return dict(
        hidden_states=randn(g, BATCH, 4, 3, 10, 6),
        timestep=torch.rand(BATCH, generator=g),
        encoder_hidden_states=randn(g, BATCH, TEXT, 16),
        fps=24,
        return_dict=False,
    )


FAMILIES = [
    Family("qwen_image", _qwen, _qwen_inputs, (1, 5, 9), TEXT, True, {"QwenImageSparseAttnProcessor"}),
    # Padded text of equal length in both rows: the padded tokens are cut out of the sparse sequence.
    Family("qwen_image_padded", _qwen, lambda m, seed: _qwen_inputs(m, seed, valid=(4, 4)), (1, 5, 9), 4, True,
           {"QwenImageSparseAttnProcessor"}),
    # Two same-sized images (edit pipelines' reference image) stack as two frames.
    Family("qwen_image_edit", _qwen, lambda m, seed: _qwen_inputs(m, seed, shapes=((1, 3, 5), (1, 3, 5))),
           (2, 3, 5), TEXT, True, {"QwenImageSparseAttnProcessor"}),
    Family("flux2", _flux2, _flux2_inputs, (1, 5, 9), TEXT, True,
           {"Flux2SparseAttnProcessor", "Flux2SparseParallelSelfAttnProcessor"}),
    # T2V: 5 prompt + 2 glyph tokens valid, 1 glyph and 4 image tokens padded (cut from the sparse sequence).
    Family("hunyuan_video15", _hv15, _hv15_inputs, (3, 5, 3), 7, False, {"HunyuanVideo15SparseAttnProcessor"}),
    Family("mochi", _mochi, _mochi_inputs, (3, 5, 3), TEXT, False, {"MochiSparseAttnProcessor"},
           own_warning=MOCHI_WARNING),
    Family("mochi_padded", _mochi, lambda m, seed: _mochi_inputs(m, seed, valid=(3, 3)), (3, 5, 3), 3, False,
           {"MochiSparseAttnProcessor"}, own_warning=MOCHI_WARNING),
    Family("cosmos", _cosmos, _cosmos_inputs, (3, 5, 3), 0, None, {"CosmosSparseAttnProcessor"}),
]


def test_the_new_families_are_registered():
    for name in ("QwenImageTransformer2DModel", "Flux2Transformer2DModel", "HunyuanVideo15Transformer3DModel",
                 "MochiTransformer3DModel", "CosmosTransformer3DModel"):
        assert name in supported_models()


# ---------------------------------------------------------------------------------------------- padded text
def test_qwen_padded_text_masks_in_turn_and_after_dense_warmup():
    model = seeded_model(_qwen)
    padded = [_qwen_inputs(model, seed=3, valid=v) for v in ((4, 4), (2, 2), (TEXT, TEXT))]
    assert_padded_inputs_match_in_turn(model, padded, [run(model, x) for x in padded])


def test_qwen_processor_matches_on_padded_text_tokens_too():
    # The last block's padded text outputs never reach the model output, so check the processor directly.
    model = seeded_model(_qwen)
    inputs = _qwen_inputs(model, seed=6, valid=(3, 3))
    captured = {}
    attn = model.transformer_blocks[1].attn

    def capture(module, args, kwargs):
        captured.update(kwargs)

    hook = attn.register_forward_pre_hook(capture, with_kwargs=True)
    try:
        run(model, inputs)
    finally:
        hook.remove()
    assert captured["encoder_hidden_states_mask"] is not None
    assert_processors_match(model, [attn], **captured)


def test_qwen_unequal_or_gapped_padding_falls_back_to_dense_with_a_warning():
    model = seeded_model(_qwen)
    unequal = _qwen_inputs(model, seed=4, valid=(TEXT, 3))
    gapped = _qwen_inputs(model, seed=4)
    gapped["encoder_hidden_states_mask"] = torch.ones(BATCH, TEXT, dtype=torch.bool)
    gapped["encoder_hidden_states_mask"][:, 2] = False  # not a prefix
    for inputs in (unequal, gapped):
        assert_falls_back_to_dense(model, inputs)


def test_qwen_layout_from_img_shapes():
    adapter = QwenImageAdapter()
    x = torch.randn(1, 45, 16)
    assert adapter.layout(None, (x,), {"img_shapes": [[(1, 5, 9)]]}) == dit_sparse.VideoLayout(1, 5, 9)
    assert adapter.layout(None, (x,), {"img_shapes": [(1, 5, 9)]}) == dit_sparse.VideoLayout(1, 5, 9)
    two = torch.randn(1, 90, 16)
    assert adapter.layout(None, (two,), {"img_shapes": [[(1, 5, 9), (1, 5, 9)]]}) == dit_sparse.VideoLayout(2, 5, 9)
    # A reference image of another size, or shapes that do not account for the tokens: no single grid.
    assert adapter.layout(None, (torch.randn(1, 60, 16),), {"img_shapes": [[(1, 5, 9), (1, 3, 5)]]}) is None
    assert adapter.layout(None, (x,), {"img_shapes": [[(1, 9, 9)]]}) is None
    assert adapter.layout(None, (x,), {}) is None


def test_hv15_padded_text_variants():
    model = seeded_model(_hv15)
    variants = [
        _hv15_inputs(model, seed=3, valid=(2, 2), glyph_valid=(0, 0)),
        _hv15_inputs(model, seed=3, valid=(HV15_TEXT, HV15_TEXT), glyph_valid=(HV15_GLYPH, HV15_GLYPH), image=True),
    ]
    for inputs in variants:
        assert_full_plan_matches_dense(model, inputs, run(model, inputs), 2)
    # warmup_layers=1: the first layer runs the original masked call, the second the trimmed sparse path.
    reference = run(model, variants[0])
    result = sparse_run(apply_full(model, warmup_layers=1), partial(run, model, variants[0]))
    assert_close(result.output, reference)
    assert result.stats["sparse_calls"] == 1 and result.stats["fallback_calls"] == 0


def test_hv15_processor_matches_on_padded_text_tokens_too():
    model = seeded_model(_hv15)
    g = torch.Generator().manual_seed(6)
    video, text, dim = 45, 9, 24
    mask = (torch.arange(text) < 4).expand(BATCH, -1)
    freqs = (randn(g, video, 12), randn(g, video, 12))
    args = (randn(g, BATCH, video, dim), randn(g, BATCH, text, dim), mask, freqs)
    assert_processors_match(model, [model.transformer_blocks[0].attn], *args)


def test_hv15_unequal_padding_falls_back_to_dense_with_a_warning():
    model = seeded_model(_hv15)
    assert_falls_back_to_dense(model, _hv15_inputs(model, seed=4, valid=(HV15_TEXT, 3)))


def test_mochi_unequal_prompt_lengths_run_sparse_per_sample():
    model = seeded_model(_mochi)
    inputs = _mochi_inputs(model, seed=4, valid=(TEXT, 2))  # batched CFG with a short negative prompt
    reference = run(model, inputs)
    result = sparse_run(apply_full(model), partial(run, model, inputs), allowed_warning=MOCHI_WARNING)
    assert_close(result.output, reference)
    assert result.stats["sparse_calls"] == 4 and result.stats["fallback_calls"] == 0
    assert [(c.layer_name, c.q[:2]) for c in result.calls[:2]] == [("transformer_blocks.0.attn1[0]", (1, 45 + TEXT)),
                                                                   ("transformer_blocks.0.attn1[1]", (1, 45 + 2))]


def test_mochi_processor_zero_pads_dropped_prompt_tokens():
    model = seeded_model(_mochi)
    g = torch.Generator().manual_seed(7)
    attn = model.transformer_blocks[0].attn1
    video, dim = 45, 16
    mask = torch.tensor([[1, 1, 0, 1, 0, 0, 1], [1, 0, 1, 1, 0, 1, 0]])  # not prefixes: Mochi gathers
    freqs = (randn(g, video, HEADS, 4), randn(g, video, HEADS, 4))
    args = (randn(g, BATCH, video, dim), randn(g, BATCH, TEXT, 16), mask, freqs)
    assert_processors_match(model, [attn], *args)  # equal counts: one batched call


# ---------------------------------------------------------------------------------------------- Flux.2 details
def test_flux2_layout_and_kv_processors():
    adapter = Flux2Adapter()
    x = torch.randn(1, 45, 4)
    assert adapter.layout(None, (x,), {"img_ids": _flux2_ids(5, 9)}) == dit_sparse.VideoLayout(1, 5, 9)
    # A reference image (t = 10) appended to the image tokens: no single grid.
    with_ref = torch.cat([_flux2_ids(5, 9), _flux2_ids(5, 9, t=10)])
    assert adapter.layout(None, (torch.randn(1, 90, 4),), {"img_ids": with_ref}) is None

    from diffusers.models.transformers.transformer_flux2 import Flux2KVAttnProcessor

    original = Flux2KVAttnProcessor()
    with pytest.warns(UserWarning, match="stays dense"):
        assert adapter.make_processor(original, None, 0, "transformer_blocks.0.attn") is original


# ---------------------------------------------------------------------------------------------- real pipelines
def test_qwen_image_pipeline_with_true_cfg_and_padded_prompts():
    from diffusers import AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImagePipeline

    torch.manual_seed(0)
    vae = AutoencoderKLQwenImage(base_dim=8, z_dim=4, dim_mult=[1, 2], num_res_blocks=1,
                                 temperal_downsample=[False, True], latents_mean=[0.0] * 4, latents_std=[1.0] * 4)
    pipe = QwenImagePipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=None, tokenizer=None,
                             transformer=seeded_model(_qwen))
    g = torch.Generator().manual_seed(5)
    # Padded prompts of different lengths: CFG runs cond and uncond as separate forwards, each trimmed.
    prompt, negative = randn(g, 1, TEXT, 16), randn(g, 1, TEXT - 2, 16)
    prompt_mask = (torch.arange(TEXT) < 5)[None].long()
    negative_mask = (torch.arange(TEXT - 2) < 2)[None].long()

    def call() -> torch.Tensor:
        return pipe(
            prompt_embeds=prompt, prompt_embeds_mask=prompt_mask, negative_prompt_embeds=negative,
            negative_prompt_embeds_mask=negative_mask, true_cfg_scale=4.0, height=40, width=72,
            num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="latent",
        ).images

    dense = call()
    result = sparse_run(apply_full(pipe.transformer), call)
    assert result.stats["sparse_calls"] == 2 * 2 * 2 and result.stats["fallback_calls"] == 0  # steps x branches x layers
    assert sorted({c.branch for c in result.calls}) == ["cond", "uncond"]
    assert_close(result.output, dense)


def test_mochi_pipeline_with_batched_cfg_and_a_short_negative_prompt():
    from diffusers import FlowMatchEulerDiscreteScheduler, MochiPipeline

    # Latent output only, so no VAE; prompt embeddings are passed directly, so no text encoder.
    pipe = MochiPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=None, text_encoder=None, tokenizer=None,
                         transformer=seeded_model(_mochi))
    g = torch.Generator().manual_seed(5)
    prompt, negative = randn(g, 1, TEXT, 16), randn(g, 1, TEXT, 16)
    prompt_mask = (torch.arange(TEXT) < 6)[None]
    negative_mask = (torch.arange(TEXT) < 2)[None]

    def call() -> torch.Tensor:
        return pipe(
            prompt_embeds=prompt, prompt_attention_mask=prompt_mask, negative_prompt_embeds=negative,
            negative_prompt_attention_mask=negative_mask, guidance_scale=4.0, height=80, width=48, num_frames=13,
            num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="latent",
        ).frames

    dense = call()
    result = sparse_run(apply_full(pipe.transformer), call, allowed_warning=MOCHI_WARNING)
    assert dense.shape[2:] == (3, 10, 6)
    # cond and uncond in one batch with different prompt lengths: one call per sample, steps x layers x 2.
    assert result.stats["sparse_calls"] == 2 * 2 * 2 and result.stats["fallback_calls"] == 0
    assert_close(result.output, dense)
