"""Adapters for Qwen-Image, Flux.2, HunyuanVideo 1.5, Mochi and Cosmos on tiny random models (CPU, float32).

The same checks as test_adapters.py for every family: sparsity 0 is bitwise Diffusers; `remove` restores
the very same processor objects; the "full" plan (every block through the block-sparse reference
executor) matches dense attention; the reported layout accounts for every token. Then each family's
padded-text handling, and sparse runs through the real tiny Diffusers pipelines with CFG.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from _tiny import apply_full, fail_on_fallback, processors, randn, run, seeded_model, sparse_names
from diffusers import (
    CosmosTransformer3DModel,
    Flux2Transformer2DModel,
    HunyuanVideo15Transformer3DModel,
    MochiTransformer3DModel,
    QwenImageTransformer2DModel,
)
from dit_sparse.pipelines.families import get_adapter, supported_models
from dit_sparse.pipelines.flux2 import Flux2Adapter
from dit_sparse.pipelines.qwen_image import QwenImageAdapter

import dit_sparse

# Mochi's RoPE asks for float32 CPU autocast on every forward, which torch declines with a warning.
pytestmark = pytest.mark.filterwarnings("ignore:In CPU autocast")

BATCH = 2
TEXT = 7  # odd on purpose
HEADS = 2




@dataclass
class Family:
    """A tiny model of one family, how to feed it, and the token grid it should report."""

    name: str
    build: Callable[[], torch.nn.Module]
    inputs: Callable[..., dict]
    grid: tuple[int, int, int]  # (frames, rows, cols) after patching
    text_in_attention: int  # text tokens in the self/joint attention sequence (0: cross-attention model)
    text_first: bool | None
    sparse_classes: set[str]
    num_sparse: int = 2  # attention modules made sparse (= core calls per forward)


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


def _flux2_ids(rows: int, cols: int, t: int = 0) -> torch.Tensor:
    ids = torch.zeros(rows, cols, 4)
    ids[..., 0] = t
    ids[..., 1] = torch.arange(rows)[:, None]
    ids[..., 2] = torch.arange(cols)[None, :]
    return ids.reshape(rows * cols, 4)


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
    Family("mochi", _mochi, _mochi_inputs, (3, 5, 3), TEXT, False, {"MochiSparseAttnProcessor"}),
    Family("mochi_padded", _mochi, lambda m, seed: _mochi_inputs(m, seed, valid=(3, 3)), (3, 5, 3), 3, False,
           {"MochiSparseAttnProcessor"}),
    Family("cosmos", _cosmos, _cosmos_inputs, (3, 5, 3), 0, None, {"CosmosSparseAttnProcessor"}),
]
IDS = [f.name for f in FAMILIES]














@pytest.fixture(scope="module", params=FAMILIES, ids=IDS)
def case(request):
    family = request.param
    model = seeded_model(family.build)
    inputs = family.inputs(model, seed=1)
    return family, model, inputs, run(model, inputs)


def test_dense_is_bitwise_diffusers_and_remove_restores(case):
    family, model, inputs, reference = case
    before = processors(model)
    sparse = sparse_names(model)
    assert len(sparse) == family.num_sparse
    for method in ("dense", "full"):
        handle = dit_sparse.apply(model, method, 0.0)
        now = processors(model)
        for name, proc in now.items():
            if name in sparse:
                assert type(proc).__name__ in family.sparse_classes
            else:  # cross-attention / text refiner keep their processor object
                assert proc is before[name]
        assert torch.equal(run(model, inputs), reference)
        dit_sparse.remove(model)
        assert not handle.active
        after = processors(model)
        assert after.keys() == before.keys()
        assert all(after[n] is before[n] for n in before)
        assert torch.equal(run(model, inputs), reference)


def test_full_plan_through_block_executor_matches_dense(case):
    family, model, inputs, reference = case
    handle = apply_full(model)
    try:
        with warnings.catch_warnings():
            fail_on_fallback()
            out = run(model, inputs)
        stats = handle.stats()
    finally:
        handle.remove()
    assert stats["sparse_calls"] == family.num_sparse and stats["dense_calls"] == 0
    torch.testing.assert_close(out, reference, atol=1e-4, rtol=1e-4)


def test_layout_accounts_for_every_token(case):
    family, model, inputs, _ = case
    handle = apply_full(model)
    seen = []
    attend = handle.core.attend

    def recording_attend(query, key, value, **kw):
        seen.append((query.shape, key.shape, kw.get("text_first"), handle.tracker.layout))
        return attend(query, key, value, **kw)

    handle.core.attend = recording_attend
    try:
        run(model, inputs)
    finally:
        handle.remove()
    assert len(seen) == family.num_sparse
    for q_shape, k_shape, text_first, layout in seen:
        assert q_shape[0] == BATCH and q_shape[2] == HEADS and q_shape == k_shape  # [B, S, H, D]
        assert (layout.frames, layout.rows, layout.cols) == family.grid
        joint = layout.with_text(q_shape[1], text_first)
        assert joint.video_tokens + family.text_in_attention == q_shape[1]
        assert joint.text_tokens == family.text_in_attention
        assert text_first == family.text_first
    assert get_adapter(model).text_first == family.text_first


def test_the_new_families_are_registered():
    for name in ("QwenImageTransformer2DModel", "Flux2Transformer2DModel", "HunyuanVideo15Transformer3DModel",
                 "MochiTransformer3DModel", "CosmosTransformer3DModel"):
        assert name in supported_models()


# ---------------------------------------------------------------------------------------------- padded text
def _family(name: str) -> Family:
    return FAMILIES[IDS.index(name)]


def _sparse_matches(model, inputs, reference, warmup_layers: int = 0) -> dict:
    handle = apply_full(model, warmup_layers)
    try:
        with warnings.catch_warnings():
            fail_on_fallback()
            out = run(model, inputs)
        stats = handle.stats()
    finally:
        handle.remove()
    torch.testing.assert_close(out, reference, atol=1e-4, rtol=1e-4)
    return stats


def test_qwen_padded_text_masks_in_turn_and_after_dense_warmup():
    model = seeded_model(_family("qwen_image").build)
    padded = [_qwen_inputs(model, seed=3, valid=v) for v in ((4, 4), (2, 2), (TEXT, TEXT))]
    references = [run(model, x) for x in padded]
    # warmup_layers=1: the first layer runs the original masked call, the second the trimmed sparse path.
    for warmup_layers in (0, 1):
        handle = apply_full(model, warmup_layers)
        try:
            for inputs, reference in zip(padded, references):  # three masks in turn: no stale cache
                with warnings.catch_warnings():
                    fail_on_fallback()
                    torch.testing.assert_close(run(model, inputs), reference, atol=1e-4, rtol=1e-4)
            stats = handle.stats()
        finally:
            handle.remove()
        assert stats["sparse_calls"] == 3 * (2 - warmup_layers) and stats["fallback_calls"] == 0


def test_qwen_processor_matches_on_padded_text_tokens_too():
    # The last block's padded text outputs never reach the model output, so check the processor directly.
    model = seeded_model(_family("qwen_image").build)
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
    with torch.no_grad():
        expected = attn.processor(attn, **captured)
        with dit_sparse.sparse_attention(model, "full", 0.5, warmup_steps=0, warmup_layers=0, block_size=16) as h:
            got = attn.processor(attn, **captured)
            assert h.stats()["sparse_calls"] == 1
    assert captured["encoder_hidden_states_mask"] is not None
    for out, ref in zip(got, expected):
        torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)


def test_qwen_unequal_or_gapped_padding_falls_back_to_dense_with_a_warning():
    model = seeded_model(_family("qwen_image").build)
    unequal = _qwen_inputs(model, seed=4, valid=(TEXT, 3))
    gapped = _qwen_inputs(model, seed=4)
    gapped["encoder_hidden_states_mask"] = torch.ones(BATCH, TEXT, dtype=torch.bool)
    gapped["encoder_hidden_states_mask"][:, 2] = False  # not a prefix
    for inputs in (unequal, gapped):
        reference = run(model, inputs)
        handle = apply_full(model)
        try:
            with pytest.warns(UserWarning, match="attention mask"):
                out = run(model, inputs)
            stats = handle.stats()
        finally:
            handle.remove()
        assert torch.equal(out, reference)
        assert stats["fallback_calls"] == 2 and stats["sparse_calls"] == 0


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
    model = seeded_model(_family("hunyuan_video15").build)
    variants = [
        _hv15_inputs(model, seed=3, valid=(2, 2), glyph_valid=(0, 0)),
        _hv15_inputs(model, seed=3, valid=(HV15_TEXT, HV15_TEXT), glyph_valid=(HV15_GLYPH, HV15_GLYPH), image=True),
    ]
    for inputs in variants:
        stats = _sparse_matches(model, inputs, run(model, inputs))
        assert stats["sparse_calls"] == 2 and stats["fallback_calls"] == 0
    stats = _sparse_matches(model, variants[0], run(model, variants[0]), warmup_layers=1)
    assert stats["sparse_calls"] == 1 and stats["fallback_calls"] == 0


def test_hv15_processor_matches_on_padded_text_tokens_too():
    model = seeded_model(_family("hunyuan_video15").build)
    g = torch.Generator().manual_seed(6)
    video, text, dim = 45, 9, 24
    mask = (torch.arange(text) < 4).expand(BATCH, -1)
    freqs = (randn(g, video, 12), randn(g, video, 12))
    args = (randn(g, BATCH, video, dim), randn(g, BATCH, text, dim), mask, freqs)
    attn = model.transformer_blocks[0].attn
    with torch.no_grad():
        ref_out, ref_enc = attn.processor(attn, *args)
        with dit_sparse.sparse_attention(model, "full", 0.5, warmup_steps=0, warmup_layers=0, block_size=16) as h:
            out, enc = attn.processor(attn, *args)
            assert h.stats()["sparse_calls"] == 1
    torch.testing.assert_close(out, ref_out, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(enc, ref_enc, atol=1e-4, rtol=1e-4)


def test_hv15_unequal_padding_falls_back_to_dense_with_a_warning():
    model = seeded_model(_family("hunyuan_video15").build)
    inputs = _hv15_inputs(model, seed=4, valid=(HV15_TEXT, 3))
    reference = run(model, inputs)
    handle = apply_full(model)
    try:
        with pytest.warns(UserWarning, match="attention mask"):
            out = run(model, inputs)
        stats = handle.stats()
    finally:
        handle.remove()
    assert torch.equal(out, reference)
    assert stats["fallback_calls"] == 2 and stats["sparse_calls"] == 0


def test_mochi_unequal_prompt_lengths_run_sparse_per_sample():
    model = seeded_model(_family("mochi").build)
    inputs = _mochi_inputs(model, seed=4, valid=(TEXT, 2))  # batched CFG with a short negative prompt
    reference = run(model, inputs)
    handle = apply_full(model)
    names = []
    attend = handle.core.attend

    def recording_attend(query, key, value, **kw):
        names.append((kw["layer_name"], query.shape[:2]))
        return attend(query, key, value, **kw)

    handle.core.attend = recording_attend
    try:
        with warnings.catch_warnings():
            fail_on_fallback()
            out = run(model, inputs)
        stats = handle.stats()
    finally:
        handle.remove()
    torch.testing.assert_close(out, reference, atol=1e-4, rtol=1e-4)
    assert stats["sparse_calls"] == 4 and stats["fallback_calls"] == 0
    assert names[:2] == [("transformer_blocks.0.attn1[0]", (1, 45 + TEXT)),
                         ("transformer_blocks.0.attn1[1]", (1, 45 + 2))]


def test_mochi_processor_zero_pads_dropped_prompt_tokens():
    model = seeded_model(_family("mochi").build)
    g = torch.Generator().manual_seed(7)
    attn = model.transformer_blocks[0].attn1
    video, dim = 45, 16
    mask = torch.tensor([[1, 1, 0, 1, 0, 0, 1], [1, 0, 1, 1, 0, 1, 0]])  # not prefixes: Mochi gathers
    freqs = (randn(g, video, HEADS, 4), randn(g, video, HEADS, 4))
    args = (randn(g, BATCH, video, dim), randn(g, BATCH, TEXT, 16), mask, freqs)
    with torch.no_grad():
        ref_out, ref_enc = attn.processor(attn, *args)
        with dit_sparse.sparse_attention(model, "full", 0.5, warmup_steps=0, warmup_layers=0, block_size=16) as h:
            out, enc = attn.processor(attn, *args)
            assert h.stats()["sparse_calls"] == 1  # equal counts: one batched call
    torch.testing.assert_close(out, ref_out, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(enc, ref_enc, atol=1e-4, rtol=1e-4)


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


def test_flux2_attention_backend_is_carried_over():
    model = seeded_model(_family("flux2").build)
    inputs = _flux2_inputs(model, seed=2)
    reference = run(model, inputs)
    model.set_attention_backend("native")
    with dit_sparse.sparse_attention(model, "full", 0.0):
        backends = {m.processor._attention_backend for _, m in get_adapter(model).self_attention_modules(model)}
        assert len(backends) == 1 and str(backends.pop().value) == "native"
        assert torch.equal(run(model, inputs), reference)


# ---------------------------------------------------------------------------------------------- real pipelines
def _dense_and_sparse(pipe, call: Callable[[], torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, dict, list]:
    """The pipeline's latents dense, then with every block through the sparse core (no warm-up)."""
    dense = call()
    handle = apply_full(pipe.transformer)
    branches = set()
    attend = handle.core.attend

    def recording_attend(query, key, value, **kw):
        branches.add(handle.core.tracker.branch)
        return attend(query, key, value, **kw)

    handle.core.attend = recording_attend
    try:
        with warnings.catch_warnings():
            fail_on_fallback()
            sparse = call()
        stats = handle.stats()
    finally:
        handle.remove()
    return dense, sparse, stats, sorted(branches)


def test_qwen_image_pipeline_with_true_cfg_and_padded_prompts():
    from diffusers import AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImagePipeline

    torch.manual_seed(0)
    vae = AutoencoderKLQwenImage(base_dim=8, z_dim=4, dim_mult=[1, 2], num_res_blocks=1,
                                 temperal_downsample=[False, True], latents_mean=[0.0] * 4, latents_std=[1.0] * 4)
    pipe = QwenImagePipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=None, tokenizer=None,
                             transformer=seeded_model(_family("qwen_image").build))
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

    dense, sparse, stats, branches = _dense_and_sparse(pipe, call)
    assert stats["sparse_calls"] == 2 * 2 * 2 and stats["fallback_calls"] == 0  # steps x branches x layers
    assert branches == ["cond", "uncond"]
    torch.testing.assert_close(sparse, dense, atol=1e-4, rtol=1e-4)


def test_mochi_pipeline_with_batched_cfg_and_a_short_negative_prompt():
    from diffusers import FlowMatchEulerDiscreteScheduler, MochiPipeline

    # Latent output only, so no VAE; prompt embeddings are passed directly, so no text encoder.
    pipe = MochiPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=None, text_encoder=None, tokenizer=None,
                         transformer=seeded_model(_family("mochi").build))
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

    dense, sparse, stats, _ = _dense_and_sparse(pipe, call)
    assert dense.shape[2:] == (3, 10, 6)
    # cond and uncond in one batch with different prompt lengths: one call per sample, steps x layers x 2.
    assert stats["sparse_calls"] == 2 * 2 * 2 and stats["fallback_calls"] == 0
    torch.testing.assert_close(sparse, dense, atol=1e-4, rtol=1e-4)
