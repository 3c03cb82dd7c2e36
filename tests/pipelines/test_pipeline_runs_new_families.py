"""Sparse runs through the real Diffusers pipelines of Wan 2.2 Animate, ChronoEdit, Flux.2 (Klein and dev),
HunyuanVideo 1.5 and Cosmos Predict2 Video2World, each built from tiny configs with random weights (CPU,
float32, no Hub).

Every pipeline runs 2 denoising steps with classifier-free guidance under dit-sparse ("semantic" at sparsity
0.75, no warm-up steps or layers). A forward pre-hook on the transformer labels each forward by the text
conditioning it receives (the prompt's or the negative prompt's embeddings, as the pipeline computes them);
the sparse core's `attend` and the method's `plan` are wrapped to record, per call, the step, the tracker's
CFG branch, that conditioning, the token grid and the plan. Each test checks: finite output, every
self-attention call sparse (no dense call, no fallback, no dit-sparse warning), both CFG branches at both
steps through the sparse core, and, where the pipeline names its CFG forwards by cache context, the
tracker's branch names and one plan per branch. ChronoEdit and Cosmos call the transformer without a cache
context; the last test checks that their CFG forwards still get their own plans.

Every pipeline is complete (each component a tiny real one, so that it also saves and reloads): tokenizers
are built offline (a T5 unigram vocabulary, a byte-level Qwen2 tokenizer with a minimal ChatML template,
ByT5 needs no files). Cosmos (T5), Flux.2 Klein (Qwen3) and HunyuanVideo 1.5 (Qwen2.5-VL + ByT5) encode
prompt strings. The Wan-family pipelines (Wan Animate, ChronoEdit) clean prompt strings with `ftfy`, which
is not installed (dit-sparse's optional "hub" extra), so they get prompt embeddings; their CLIP image
encoder still runs on the input image. Flux.2 dev gets prompt embeddings too (it has no CFG; see its test).

The builders are shared with test_loading_families.py (which imports this module by name, as pytest's
default import mode allows; a saved Cosmos pipeline names `OfflineGuardrail` by this module).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
import torch
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from PIL import Image

import dit_sparse

METHOD, SPARSITY, STEPS = "semantic", 0.75, 2
TEXT_DIM = 16  # width of every tiny text encoder's output (the transformers' text_dim)
WAN_TINY = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, text_dim=TEXT_DIM, freq_dim=32,
                ffn_dim=32, num_layers=2, rope_max_seq_len=32)
CHAT_TEMPLATE = (  # ChatML; content as a string or as a list of {"type": "text", "text": ...} parts
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% if m['content'] is string %}{{ m['content'] }}"
    "{% else %}{% for part in m['content'] %}{% if part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
T5_WORDS = "a the red cat dances on beach walks into snow blurry low quality static ugly".split()


@pytest.fixture(autouse=True)
def one_cpu_thread():
    """One intra-op thread: fastest for these tiny models, and immune to other processes on the CPU (with
    every core busy, OpenMP's thread barriers made these runs up to ~100x slower on a shared 2-core box)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---------------------------------------------------------------------------------------------- tiny parts
def t5_tokenizer():
    """A T5 (unigram) tokenizer from an in-memory vocabulary: whole words, else single letters."""
    from transformers import T5Tokenizer

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    vocab += [(f"\u2581{w}", -1.0) for w in T5_WORDS] + [(c, -5.0) for c in "\u2581abcdefghijklmnopqrstuvwxyz"]
    return T5Tokenizer(vocab=vocab, extra_ids=0)


def t5_encoder(tokenizer, umt5: bool = False, d_model: int = TEXT_DIM):
    """A one-layer T5 (or UMT5, Wan's) encoder sized for `tokenizer`."""
    from transformers import T5Config, T5EncoderModel, UMT5Config, UMT5EncoderModel

    config = dict(vocab_size=len(tokenizer), d_model=d_model, d_kv=8, d_ff=32, num_layers=1, num_heads=2,
                  relative_attention_num_buckets=8)
    torch.manual_seed(0)
    return (UMT5EncoderModel(UMT5Config(**config)) if umt5 else T5EncoderModel(T5Config(**config))).eval()


def qwen_tokenizer():
    """A byte-level Qwen2 tokenizer (one token per byte, no merges) with a minimal ChatML template."""
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import Qwen2Tokenizer

    vocab = {c: i for i, c in enumerate(sorted(ByteLevel.alphabet()))}
    for special in ("<|endoftext|>", "<|im_start|>", "<|im_end|>"):
        vocab[special] = len(vocab)
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=[])
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def clip_image_encoder():
    """A CLIP vision tower (hidden size 8, 16 x 16 images in 8 x 8 patches) and its PIL image processor."""
    from transformers import CLIPImageProcessorPil, CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(0)
    encoder = CLIPVisionModel(CLIPVisionConfig(hidden_size=8, intermediate_size=16, num_hidden_layers=2,
                                               num_attention_heads=2, image_size=16, patch_size=8)).eval()
    return encoder, CLIPImageProcessorPil(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16})


def wan_vae():
    """AutoencoderKLWan with 4 latent channels (x8 spatial, x4 temporal), identity latent normalisation."""
    from diffusers import AutoencoderKLWan

    torch.manual_seed(0)
    return AutoencoderKLWan(base_dim=3, z_dim=4, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                            latents_mean=[0.0] * 4, latents_std=[1.0] * 4).eval()


def unipc_flow():
    from diffusers import UniPCMultistepScheduler

    return UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)


class OfflineGuardrail(ModelMixin, ConfigMixin):
    """Stands in for Cosmos' safety checker, which needs the `cosmos_guardrail` package (and its models from
    the Hub); Cosmos pipelines refuse to run without one. Lets every prompt and video through."""

    @register_to_config
    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("passes", torch.ones(1))  # a weight file, so save/from_pretrained round-trips

    def check_text_safety(self, prompt: str) -> bool:
        return True

    def check_video_safety(self, frames: np.ndarray) -> np.ndarray:
        return frames


# ---------------------------------------------------------------------------------------------- pipelines
def build_wan_animate():
    """WanAnimatePipeline: tiny Wan Animate transformer (face adapter, motion encoder), Wan VAE, CLIP image
    encoder, UMT5 text encoder (prompt strings need ftfy: pass prompt embeddings)."""
    from diffusers import WanAnimatePipeline, WanAnimateTransformer3DModel

    torch.manual_seed(0)
    transformer = WanAnimateTransformer3DModel(
        in_channels=None, latent_channels=4, out_channels=4, image_dim=8, motion_encoder_size=16,
        motion_encoder_channel_sizes={"16": 8, "8": 8, "4": 8}, motion_style_dim=8, motion_dim=4,
        motion_encoder_dim=8, face_encoder_hidden_dim=8, face_encoder_num_heads=2, inject_face_latents_blocks=1,
        **WAN_TINY,
    ).eval()
    image_encoder, image_processor = clip_image_encoder()
    tokenizer = t5_tokenizer()
    return WanAnimatePipeline(tokenizer=tokenizer, text_encoder=t5_encoder(tokenizer, umt5=True), vae=wan_vae(),
                              scheduler=unipc_flow(),
                              image_processor=image_processor, image_encoder=image_encoder, transformer=transformer)


def build_chronoedit():
    """ChronoEditPipeline: tiny ChronoEdit transformer (image embeddings from CLIP), Wan VAE, UniPC (its
    temporal reasoning edits UniPC's history), UMT5 text encoder (prompt strings need ftfy: pass prompt
    embeddings)."""
    from diffusers import ChronoEditPipeline, ChronoEditTransformer3DModel

    torch.manual_seed(0)
    # 12 input channels: 4 noisy latents + 4 first-frame mask + 4 image-condition latents.
    transformer = ChronoEditTransformer3DModel(in_channels=12, out_channels=4, image_dim=8, rope_temporal_skip_len=5,
                                               **WAN_TINY).eval()
    image_encoder, image_processor = clip_image_encoder()
    tokenizer = t5_tokenizer()
    return ChronoEditPipeline(tokenizer=tokenizer, text_encoder=t5_encoder(tokenizer, umt5=True),
                              image_encoder=image_encoder,
                              image_processor=image_processor, transformer=transformer, vae=wan_vae(),
                              scheduler=unipc_flow())


def flux2_vae():
    from diffusers import AutoencoderKLFlux2

    torch.manual_seed(0)
    # x2 spatial, 4 latent channels, patchified 2 x 2 into the transformer's 16 channels.
    return AutoencoderKLFlux2(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                              up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, latent_channels=4,
                              norm_num_groups=4, sample_size=32).eval()


def flux2_transformer(guidance_embeds: bool):
    from diffusers import Flux2Transformer2DModel

    torch.manual_seed(0)
    # Text: 3 stacked hidden-state layers of the text encoder (3 x 16 = 48).
    return Flux2Transformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=3 * TEXT_DIM, timestep_guidance_channels=16,
        axes_dims_rope=(4, 4, 4, 4), guidance_embeds=guidance_embeds,
    ).eval()


FLUX2_TEXT = dict(max_sequence_length=16, text_encoder_out_layers=(1, 2, 3))


def build_flux2_klein():
    """Flux2KleinPipeline (true CFG): tiny Flux.2 transformer without guidance embedding, Flux.2 VAE, a
    3-layer Qwen3 text encoder and the byte-level tokenizer."""
    from diffusers import FlowMatchEulerDiscreteScheduler, Flux2KleinPipeline
    from transformers import Qwen3Config, Qwen3ForCausalLM

    tokenizer = qwen_tokenizer()
    torch.manual_seed(0)
    text_encoder = Qwen3ForCausalLM(Qwen3Config(
        vocab_size=len(tokenizer), hidden_size=TEXT_DIM, intermediate_size=32, num_hidden_layers=3,
        num_attention_heads=2, num_key_value_heads=1, head_dim=8, max_position_embeddings=64,
        bos_token_id=None, eos_token_id=None, pad_token_id=None,
    )).eval()
    return Flux2KleinPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=flux2_vae(), text_encoder=text_encoder,
                              tokenizer=tokenizer, transformer=flux2_transformer(guidance_embeds=False))


def build_flux2_dev():
    """Flux2Pipeline (FLUX.2 dev, guidance-distilled): tiny Flux.2 transformer with guidance embedding, the
    Flux.2 VAE and a 3-layer Mistral-3 text encoder. Its real tokenizer is a PixtralProcessor, which needs
    torchvision; the pipeline only calls the processor's chat template, so the byte-level tokenizer (whose
    template takes Pixtral's list-of-parts content) stands in."""
    from diffusers import FlowMatchEulerDiscreteScheduler, Flux2Pipeline
    from transformers import (
        Mistral3Config,
        Mistral3ForConditionalGeneration,
        MistralConfig,
        PixtralVisionConfig,
    )

    tokenizer = qwen_tokenizer()
    torch.manual_seed(0)
    text_encoder = Mistral3ForConditionalGeneration(Mistral3Config(
        text_config=MistralConfig(vocab_size=len(tokenizer) + 1, hidden_size=TEXT_DIM, intermediate_size=32,
                                  num_hidden_layers=3, num_attention_heads=2, num_key_value_heads=1, head_dim=8),
        vision_config=PixtralVisionConfig(hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                                          num_attention_heads=2, head_dim=4, image_size=32, patch_size=8),
        image_token_index=len(tokenizer), spatial_merge_size=1,
    )).eval()
    return Flux2Pipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=flux2_vae(), text_encoder=text_encoder,
                         tokenizer=tokenizer, transformer=flux2_transformer(guidance_embeds=True))


def build_hunyuan_video15():
    """HunyuanVideo15Pipeline (T2V): tiny transformer and VAE, a Qwen2.5-VL text model with the byte-level
    tokenizer, a T5 encoder with the (file-less) ByT5 tokenizer for quoted glyph text, CFG guider at 4."""
    from diffusers import (
        AutoencoderKLHunyuanVideo15,
        FlowMatchEulerDiscreteScheduler,
        HunyuanVideo15Pipeline,
        HunyuanVideo15Transformer3DModel,
    )
    from diffusers.guiders import ClassifierFreeGuidance
    from transformers import ByT5Tokenizer, Qwen2_5_VLTextConfig, Qwen2_5_VLTextModel

    tokenizer, tokenizer_2 = qwen_tokenizer(), ByT5Tokenizer()
    torch.manual_seed(0)
    text_encoder = Qwen2_5_VLTextModel(Qwen2_5_VLTextConfig(
        vocab_size=len(tokenizer), hidden_size=TEXT_DIM, intermediate_size=16, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=2, bos_token_id=None, eos_token_id=None,
        rope_scaling={"mrope_section": [1, 1, 2], "rope_type": "default", "type": "default"},
    )).eval()
    text_encoder_2 = t5_encoder(tokenizer_2, d_model=8)
    # 9 input channels: 4 noisy latents + 4 condition latents + 1 mask (zeros for T2V).
    transformer = HunyuanVideo15Transformer3DModel(
        in_channels=9, out_channels=4, num_attention_heads=2, attention_head_dim=12, num_layers=2,
        num_refiner_layers=1, patch_size=1, patch_size_t=1, text_embed_dim=TEXT_DIM, text_embed_2_dim=8,
        image_embed_dim=8, rope_axes_dim=(4, 4, 4), target_size=16, task_type="t2v",
    ).eval()
    vae = AutoencoderKLHunyuanVideo15(latent_channels=4, block_out_channels=(8, 8), layers_per_block=1,
                                      spatial_compression_ratio=4, temporal_compression_ratio=2,
                                      downsample_match_channel=False, upsample_match_channel=False).eval()
    pipe = HunyuanVideo15Pipeline(text_encoder=text_encoder, tokenizer=tokenizer, transformer=transformer, vae=vae,
                                  scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0), text_encoder_2=text_encoder_2,
                                  tokenizer_2=tokenizer_2, guider=ClassifierFreeGuidance(guidance_scale=4.0))
    # The pipeline crops the system turn off the encoded chat: 108 tokens with Qwen2.5-VL's own tokenizer.
    # This byte-level tokenizer spends one token per byte, so crop its own system-turn length instead.
    system_turn = [{"role": "system", "content": pipe.system_message}]
    pipe.prompt_template_encode_start_idx = len(tokenizer.apply_chat_template(system_turn, tokenize=True,
                                                                              return_dict=True)["input_ids"])
    return pipe


def build_cosmos2_video2world():
    """Cosmos2VideoToWorldPipeline (Cosmos Predict2): tiny CosmosTransformer3DModel, Wan VAE, a T5 encoder
    with the unigram tokenizer, the stand-in guardrail. No padding-mask channel: resizing it needs
    torchvision, which the project does not install."""
    from diffusers import (
        Cosmos2VideoToWorldPipeline,
        CosmosTransformer3DModel,
        FlowMatchEulerDiscreteScheduler,
    )

    tokenizer = t5_tokenizer()
    text_encoder = t5_encoder(tokenizer)
    # 5 input channels: 4 latents + the conditioning-frame mask the pipeline passes as `condition_mask`.
    transformer = CosmosTransformer3DModel(
        in_channels=5, out_channels=4, num_attention_heads=2, attention_head_dim=12, num_layers=2, mlp_ratio=2.0,
        text_embed_dim=TEXT_DIM, adaln_lora_dim=4, max_size=(8, 16, 16), patch_size=(1, 2, 2),
        concat_padding_mask=False, extra_pos_embed_type="learnable",
    ).eval()
    return Cosmos2VideoToWorldPipeline(text_encoder=text_encoder, tokenizer=tokenizer, transformer=transformer,
                                       vae=wan_vae(), scheduler=FlowMatchEulerDiscreteScheduler(use_karras_sigmas=True),
                                       safety_checker=OfflineGuardrail())


# ---------------------------------------------------------------------------------------------- the sparse run
@dataclass
class SparseRun:
    output: Any
    stats: dict
    calls: list[tuple[int, str, str | None, tuple[int, int, int] | None]]  # step, branch, conditioning, grid
    plans: list[tuple[int, str, str | None, Any]]  # step, layer, conditioning, the plan the method returned

    def conditionings(self) -> set[tuple[int, str | None]]:
        return {(step, cond) for step, _, cond, _ in self.calls}

    def branch_names(self) -> dict[str | None, set[str]]:
        names: dict[str | None, set[str]] = {}
        for _, branch, cond, _ in self.calls:
            names.setdefault(cond, set()).add(branch)
        return names

    def grids(self) -> dict[int, set[tuple[int, int, int] | None]]:
        grids: dict[int, set[tuple[int, int, int] | None]] = {}
        for step, _, _, grid in self.calls:
            grids.setdefault(step, set()).add(grid)
        return grids

    def plans_shared_by_cond_and_uncond(self) -> int:
        """(step, layer) pairs whose cond and uncond calls ran the very same plan object."""
        by_call: dict[tuple[int, str], dict[str | None, Any]] = {}
        for step, layer, cond, plan in self.plans:
            by_call.setdefault((step, layer), {})[cond] = plan
        return sum(1 for p in by_call.values() if p.get("cond") is not None and p.get("cond") is p.get("uncond"))


def run_sparse(pipe, call: Callable[[], Any], conditionings: dict[str, torch.Tensor]) -> SparseRun:
    """`call()` with dit-sparse applied to `pipe`, recording what the sparse core sees per attention call.

    `conditionings` maps a label ("cond", "uncond") to the text embeddings that reach the transformer as
    `encoder_hidden_states` in that CFG branch (equal up to float rounding: the test encodes the prompts
    outside the pipeline's own call).
    """
    pipe.set_progress_bar_config(disable=True)
    handle = dit_sparse.apply(pipe, METHOD, SPARSITY, warmup_steps=0, warmup_layers=0)
    current: dict[str, str | None] = {}

    def label_forward(module, args, kwargs):
        text = kwargs.get("encoder_hidden_states")
        current["cond"] = next((name for name, emb in conditionings.items()
                                if isinstance(text, torch.Tensor) and text.shape == emb.shape
                                and torch.allclose(text, emb, rtol=1e-5, atol=1e-5)), None)

    calls, plans = [], []
    attend, plan = handle.core.attend, handle.method.plan

    def recording_attend(query, key, value, **kw):
        layout = handle.tracker.layout
        grid = None if layout is None else (layout.frames, layout.rows, layout.cols)
        calls.append((handle.tracker.step, handle.tracker.branch, current.get("cond"), grid))
        return attend(query, key, value, **kw)

    def recording_plan(q, k, v, ctx):
        result = plan(q, k, v, ctx)
        plans.append((ctx.step, ctx.layer_name, current.get("cond"), result))
        return result

    handle.core.attend, handle.method.plan = recording_attend, recording_plan
    hook = pipe.transformer.register_forward_pre_hook(label_forward, with_kwargs=True)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("error", message="dit-sparse")  # a dense fallback fails the test
            output = call()
        stats = handle.stats()
    finally:
        hook.remove()
        handle.remove()
    return SparseRun(output, stats, calls, plans)


def check_cfg_run(run: SparseRun, sparse_layers: int, branch_names: dict[str, set[str]] | None) -> None:
    """Finite output; every call sparse; cond and uncond through the core at every step. With `branch_names`
    (pipelines that name their CFG forwards by cache context): the tracker's names, and a plan per branch."""
    output = run.output.numpy() if isinstance(run.output, torch.Tensor) else np.asarray(run.output)
    assert output.size > 0 and np.isfinite(output).all()
    assert run.stats["sparse_calls"] == STEPS * 2 * sparse_layers
    assert run.stats["dense_calls"] == 0 and run.stats["fallback_calls"] == 0
    assert run.stats["sparsity_in_sparse_calls"] > 0.5
    assert run.conditionings() == {(step, cond) for step in range(STEPS) for cond in ("cond", "uncond")}
    assert len(run.plans) == len(run.calls)
    if branch_names is not None:
        assert run.branch_names() == branch_names
        assert run.plans_shared_by_cond_and_uncond() == 0


def _randn(seed: int, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _image(width: int, height: int, color: tuple[int, int, int]) -> Image.Image:
    pixels = np.zeros((height, width, 3), dtype=np.uint8)
    pixels[...] = color
    pixels[height // 4: height // 2, width // 3: 2 * width // 3] = 255 - np.array(color, dtype=np.uint8)
    return Image.fromarray(pixels)


# ---------------------------------------------------------------------------------------------- tests
def test_wan_animate_pipeline_runs_sparse_with_cfg():
    pipe = build_wan_animate()
    height, width, frames = 80, 48, 5  # one 5-frame segment: reference + 2 latent frames, grid 3 x 5 x 3
    prompt, negative = _randn(1, 1, 12, TEXT_DIM), _randn(2, 1, 12, TEXT_DIM)

    def call():
        return pipe(
            image=_image(width, height, (200, 40, 40)),
            pose_video=[_image(width, height, (20 * i, 90, 30)) for i in range(frames)],
            face_video=[_image(16, 16, (30, 20 * i, 90)) for i in range(frames)],
            prompt_embeds=prompt, negative_prompt_embeds=negative, height=height, width=width,
            segment_frame_length=frames, num_inference_steps=STEPS, guidance_scale=4.0,
            generator=torch.Generator().manual_seed(0), output_type="np",
        ).frames

    run = run_sparse(pipe, call, {"cond": prompt, "uncond": negative})
    assert run.output.shape == (1, frames, height, width, 3)
    check_cfg_run(run, sparse_layers=2, branch_names={"cond": {"cond"}, "uncond": {"uncond"}})
    assert run.grids() == {0: {(3, 5, 3)}, 1: {(3, 5, 3)}}


def chronoedit_run(reasoning: bool = False) -> SparseRun:
    pipe = build_chronoedit()
    height, width = 80, 48
    prompt, negative = _randn(1, 1, 12, TEXT_DIM), _randn(2, 1, 12, TEXT_DIM)
    # Temporal reasoning denoises 9 frames (3 latent frames) for the first step, then only the input and the
    # edited frame: the grid changes between steps.
    extra = dict(enable_temporal_reasoning=True, num_frames=9, num_temporal_reasoning_steps=1) if reasoning else {}

    def call():
        return pipe(
            image=_image(width, height, (40, 160, 200)), prompt_embeds=prompt, negative_prompt_embeds=negative,
            height=height, width=width, num_inference_steps=STEPS, guidance_scale=4.0,
            generator=torch.Generator().manual_seed(0), output_type="latent" if reasoning else "np", **extra,
        ).frames

    return run_sparse(pipe, call, {"cond": prompt, "uncond": negative})


@pytest.mark.parametrize("reasoning", [False, True], ids=["edit", "temporal_reasoning"])
def test_chronoedit_pipeline_runs_sparse_with_cfg(reasoning):
    run = chronoedit_run(reasoning)
    # ChronoEditPipeline calls the transformer outside any cache_context: the tracker cannot name the CFG
    # forwards (branch names and per-branch plans: test_cfg_forwards_without_a_cache_context_get_their_own_plans).
    check_cfg_run(run, sparse_layers=2, branch_names=None)
    assert run.grids() == ({0: {(3, 5, 3)}, 1: {(2, 5, 3)}} if reasoning else {0: {(2, 5, 3)}, 1: {(2, 5, 3)}})


def test_flux2_klein_pipeline_runs_sparse_with_cfg():
    # Flux.2 with true CFG: Flux2Pipeline (dev) is guidance-distilled (see the next test); Klein runs a
    # conditional and an unconditional forward per step through the same Flux2Transformer2DModel.
    pipe = build_flux2_klein()
    with torch.no_grad():
        prompt = pipe.encode_prompt("a red cat walks into the snow", **FLUX2_TEXT)[0]
        negative = pipe.encode_prompt("blurry, low quality", **FLUX2_TEXT)[0]

    def call():
        return pipe(
            prompt="a red cat walks into the snow", negative_prompt_embeds=negative, height=32, width=48,
            num_inference_steps=STEPS, guidance_scale=4.0, generator=torch.Generator().manual_seed(0),
            output_type="np", **FLUX2_TEXT,
        ).images

    run = run_sparse(pipe, call, {"cond": prompt, "uncond": negative})
    assert run.output.shape == (1, 32, 48, 3)
    # One double-stream and one single-stream block; the image is 8 x 12 latent tokens after packing.
    check_cfg_run(run, sparse_layers=2, branch_names={"cond": {"cond"}, "uncond": {"uncond"}})
    assert run.grids() == {0: {(1, 8, 12)}, 1: {(1, 8, 12)}}


def test_flux2_dev_pipeline_is_guidance_distilled_and_runs_sparse():
    # Flux2Pipeline has no negative prompt: guidance_scale is embedded (one forward per step), so there is
    # no uncond branch to see. The CFG run of the Flux.2 transformer is the Klein test above.
    pipe = build_flux2_dev()
    prompt = _randn(1, 1, 8, 3 * TEXT_DIM)

    def call():
        return pipe(prompt_embeds=prompt, height=32, width=48, num_inference_steps=STEPS, guidance_scale=4.0,
                    generator=torch.Generator().manual_seed(0), output_type="np").images

    run = run_sparse(pipe, call, {"cond": prompt})
    assert np.isfinite(run.output).all()
    assert run.stats["sparse_calls"] == STEPS * 2 and run.stats["fallback_calls"] == 0
    assert run.conditionings() == {(0, "cond"), (1, "cond")}
    assert run.branch_names() == {"cond": {"default"}}


def test_hunyuan_video15_pipeline_runs_sparse_with_cfg():
    pipe = build_hunyuan_video15()
    prompt, negative = 'a shop sign that reads "OPEN"', "blurry, low quality"  # quoted text: ByT5 glyph tokens
    text = dict(device=torch.device("cpu"), dtype=torch.float32)
    with torch.no_grad():
        cond, cond_mask = pipe.encode_prompt(prompt, **text)[:2]
        uncond, uncond_mask = pipe.encode_prompt(negative, **text)[:2]
    assert 0 < cond_mask.sum() < cond_mask.numel() and 0 < uncond_mask.sum() < cond_mask.sum()  # padded prompts

    def call():
        return pipe(prompt=prompt, negative_prompt=negative, height=32, width=24, num_frames=5,
                    num_inference_steps=STEPS, generator=torch.Generator().manual_seed(0), output_type="np").frames

    run = run_sparse(pipe, call, {"cond": cond, "uncond": uncond})
    assert run.output.shape == (1, 5, 32, 24, 3)
    # The guider runs one forward per condition, in a cache context named by its identifier.
    check_cfg_run(run, sparse_layers=2, branch_names={"cond": {"pred_cond"}, "uncond": {"pred_uncond"}})
    assert run.grids() == {0: {(3, 8, 6)}, 1: {(3, 8, 6)}}


def cosmos2_run() -> SparseRun:
    pipe = build_cosmos2_video2world()
    prompt, negative = "a red cat dances on the beach", "blurry low quality static"
    with torch.no_grad():
        cond, uncond = pipe.encode_prompt(prompt, negative, do_classifier_free_guidance=True, max_sequence_length=12,
                                          device=torch.device("cpu"))
    height, width = 80, 48

    def call():
        return pipe(image=_image(width, height, (30, 200, 60)), prompt=prompt, negative_prompt=negative,
                    height=height, width=width, num_frames=9, num_inference_steps=STEPS, guidance_scale=4.0,
                    max_sequence_length=12, generator=torch.Generator().manual_seed(0), output_type="np").frames

    return run_sparse(pipe, call, {"cond": cond, "uncond": uncond})


KARRAS_NUMPY_WARNING = "ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning"


@pytest.mark.filterwarnings(KARRAS_NUMPY_WARNING)  # Diffusers' Karras sigmas under NumPy 2
def test_cosmos2_video2world_pipeline_runs_sparse_with_cfg():
    run = cosmos2_run()
    assert run.output.shape == (1, 9, 80, 48, 3)
    # Like ChronoEdit, the Cosmos pipelines call the transformer outside any cache_context (see the next test).
    check_cfg_run(run, sparse_layers=2, branch_names=None)
    assert run.grids() == {0: {(3, 5, 3)}, 1: {(3, 5, 3)}}


# Without a cache_context (ChronoEdit, the Cosmos pipelines, ...) both CFG forwards used to be branch
# "default": they shared per-layer method state and the uncond forward reused the cond forward's plan.
# StepTracker.begin_forward now numbers the unnamed forwards of a step.
@pytest.mark.filterwarnings(KARRAS_NUMPY_WARNING)
@pytest.mark.parametrize("run", [chronoedit_run, cosmos2_run], ids=["chronoedit", "cosmos2_video2world"])
def test_cfg_forwards_without_a_cache_context_get_their_own_plans(run):
    result = run()
    assert result.plans_shared_by_cond_and_uncond() == 0
    assert result.branch_names()["cond"].isdisjoint(result.branch_names()["uncond"])
