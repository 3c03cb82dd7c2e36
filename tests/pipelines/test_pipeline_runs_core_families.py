"""Sparse runs with classifier-free guidance through the real Diffusers pipelines of HunyuanVideo, CogVideoX,
LTX-Video and Flux.1, built from the tiny configs of test_loading_families.py (CPU, float32, random weights,
offline tokenizers, no Hub).

The same run as test_pipeline_runs_new_families.py (its `run_sparse` and `check_cfg_run`): 2 denoising steps
under dit-sparse ("semantic" at sparsity 0.75, no warm-up steps or layers, dit-sparse warnings as errors),
then finite output, every self-attention call sparse (no dense call, no fallback), both CFG branches through
the sparse core at both steps, and the token grid the adapter reports. The pipelines do CFG in two ways:

* separate forwards (HunyuanVideo and Flux.1 with `true_cfg_scale` > 1 and a negative prompt): one forward per
  branch, in cache contexts "cond" and "uncond"; each branch must get its own plans.
* batched (CogVideoX, LTX-Video): one forward per step over the batch [uncond, cond] in cache context
  "cond_uncond", as test_adapters_ltx2.py checks for LTX-2; each sparse call must carry both halves (batch
  2) and plan them separately (`check_batched_cfg_run`).

Prompts are strings, encoded by each pipeline's own text encoders. The builders' tiny CLIP text encoder has 32
positions and its tokenizer no `model_max_length`, while HunyuanVideo pads CLIP prompts to 77 tokens and Flux
to the tokenizer's `model_max_length` (unset: 1e30): the HunyuanVideo test encodes the pooled CLIP embeddings
with the pipeline's own CLIP encoder at as many tokens as it has positions, and the Flux test sets the
pipeline's CLIP length to that. The builders' Flux VAE cannot decode this transformer's latents (4 latent
channels against the transformer's 4 / 4 = 1, and no `shift_factor`), so the Flux run returns latents.
"""

from __future__ import annotations

import torch
from test_loading_families import build_cogvideox, build_flux, build_hunyuan_video, build_ltx_video
from test_pipeline_runs_new_families import (
    STEPS,
    SparseRun,
    check_cfg_run,
    one_cpu_thread,  # noqa: F401 (autouse fixture: one intra-op thread)
    run_sparse,
)

PROMPT, NEGATIVE = "a red cat dances on the beach", "blurry low quality static"
CPU = torch.device("cpu")
TEXT_TOKENS = 8  # T5 sequence length (CogVideoX, LTX-Video, Flux): PROMPT is exactly 7 words + </s>


def _generator() -> torch.Generator:
    return torch.Generator().manual_seed(0)


def _seq_lens(run: SparseRun) -> dict[str | None, set[tuple[int, int]]]:
    """(query, key) lengths of the sparse calls per conditioning: video tokens plus joint text tokens."""
    lens: dict[str | None, set[tuple[int, int]]] = {}
    for _, _, cond, plan in run.plans:
        lens.setdefault(cond, set()).add(plan.seq_lens)
    return lens


def check_batched_cfg_run(run: SparseRun, sparse_layers: int) -> None:
    """Batched CFG: one forward per step, in cache context "cond_uncond", whose text is [uncond, cond].

    Finite output; every call sparse; at every step each layer's one sparse call carries both halves (batch 2)
    with a plan for each. The first layer sees equal video queries in both halves (the same latents and
    timestep; the text has not mixed in yet), so their plans may coincide; from the second layer on each half's
    own conditioning has shaped its tokens and the halves must not share a plan.
    """
    output = run.output
    assert output.size > 0 and torch.isfinite(torch.as_tensor(output)).all()
    assert run.stats["sparse_calls"] == STEPS * sparse_layers
    assert run.stats["dense_calls"] == 0 and run.stats["fallback_calls"] == 0
    assert run.stats["sparsity_in_sparse_calls"] > 0.5
    assert run.conditionings() == {(step, "cond_uncond") for step in range(STEPS)}
    assert run.branch_names() == {"cond_uncond": {"cond_uncond"}}
    assert len(run.plans) == len(run.calls) == STEPS * sparse_layers
    assert all(plan.batch == 2 for *_, plan in run.plans)
    layers = sorted({layer for _, layer, _, _ in run.plans})
    for step, layer, _, plan in run.plans:
        if layer != layers[0]:
            same = torch.equal(plan.q_perm[0], plan.q_perm[1]) and torch.equal(plan.kv_indices[0], plan.kv_indices[1])
            assert not same, f"step {step}, {layer}: the uncond and cond halves got the same plan"


def _batched_cfg_run(pipe, cond: torch.Tensor, uncond: torch.Tensor, height: int, width: int) -> SparseRun:
    """9 frames at height x width with batched CFG over PROMPT and NEGATIVE (text [uncond, cond]), decoded to
    frames and checked by `check_batched_cfg_run`; the caller checks the grid and sequence lengths."""

    def call():
        return pipe(prompt=PROMPT, negative_prompt=NEGATIVE, guidance_scale=4.0, height=height, width=width,
                    num_frames=9, num_inference_steps=STEPS, max_sequence_length=TEXT_TOKENS, generator=_generator(),
                    output_type="np").frames

    run = run_sparse(pipe, call, {"cond_uncond": torch.cat([uncond, cond])})
    assert run.output.shape == (1, 9, height, width, 3)
    check_batched_cfg_run(run, sparse_layers=2)
    return run


# ---------------------------------------------------------------------------------------------- tests
def test_hunyuan_video_pipeline_runs_sparse_with_true_cfg():
    # HunyuanVideoPipeline (Diffusers 0.42) is guidance-distilled (the guidance scale is embedded) and also does
    # true CFG when true_cfg_scale > 1 and a negative prompt is given: a "cond" and an "uncond" forward per step.
    from diffusers.pipelines.hunyuan_video.pipeline_hunyuan_video import DEFAULT_PROMPT_TEMPLATE

    pipe = build_hunyuan_video()
    prompt, negative = "a red cat", "blurry"
    # The default Llama template, cropped where the byte-level tokenizer (one token per byte) ends its system
    # turn: its crop_start (95) counts Llama tokens.
    template = DEFAULT_PROMPT_TEMPLATE["template"]
    crop = len(pipe.tokenizer(template.split("{}")[0])["input_ids"])
    text = dict(prompt_template={"template": template, "crop_start": crop}, max_sequence_length=24)
    clip_tokens = pipe.text_encoder_2.config.max_position_embeddings
    with torch.no_grad():
        pooled = pipe._get_clip_prompt_embeds(prompt, max_sequence_length=clip_tokens)
        negative_pooled = pipe._get_clip_prompt_embeds(negative, max_sequence_length=clip_tokens)
        cond, _, cond_mask = pipe.encode_prompt(prompt, pooled_prompt_embeds=pooled, device=CPU, **text)
        uncond, _, uncond_mask = pipe.encode_prompt(negative, pooled_prompt_embeds=negative_pooled, device=CPU, **text)
    # Both prompts padded (the prompt plus the template's closing "<|eot_id|>", 10 bytes), to different lengths.
    assert (int(cond_mask.sum()), int(uncond_mask.sum()), cond_mask.shape[1]) == (19, 16, 24)

    def call():
        return pipe(prompt=prompt, negative_prompt=negative, pooled_prompt_embeds=pooled,
                    negative_pooled_prompt_embeds=negative_pooled, true_cfg_scale=4.0, height=64, width=96,
                    num_frames=9, num_inference_steps=STEPS, generator=_generator(), output_type="np", **text).frames

    run = run_sparse(pipe, call, {"cond": cond, "uncond": uncond})
    assert run.output.shape == (1, 9, 64, 96, 3)
    # One dual-stream and one single-stream block.
    check_cfg_run(run, sparse_layers=2, branch_names={"cond": {"cond"}, "uncond": {"uncond"}})
    # 9 frames at 64 x 96: 3 x 8 x 12 latents, patch 2 -> 3 x 4 x 6 = 72 video tokens.
    assert run.grids() == {0: {(3, 4, 6)}, 1: {(3, 4, 6)}}
    # [video, text] with the padded text keys trimmed off (see pipelines/hunyuan_video.py): the core sees the
    # valid text of each branch, and no attention mask.
    assert _seq_lens(run) == {"cond": {(72 + 19, 72 + 19)}, "uncond": {(72 + 16, 72 + 16)}}


def test_cogvideox_pipeline_runs_sparse_with_batched_cfg():
    pipe = build_cogvideox()
    with torch.no_grad():
        cond, uncond = pipe.encode_prompt(PROMPT, NEGATIVE, do_classifier_free_guidance=True,
                                          max_sequence_length=TEXT_TOKENS, device=CPU)
    run = _batched_cfg_run(pipe, cond, uncond, height=80, width=96)
    # 9 frames at 80 x 96: 3 x 10 x 12 latents, patch 2 -> 3 x 5 x 6 = 90 video tokens after the text.
    assert run.grids() == {0: {(3, 5, 6)}, 1: {(3, 5, 6)}}
    assert _seq_lens(run) == {"cond_uncond": {(TEXT_TOKENS + 90, TEXT_TOKENS + 90)}}


def test_ltx_video_pipeline_runs_sparse_with_batched_cfg():
    pipe = build_ltx_video()
    with torch.no_grad():
        cond, cond_mask, uncond, uncond_mask = pipe.encode_prompt(
            PROMPT, NEGATIVE, do_classifier_free_guidance=True, max_sequence_length=TEXT_TOKENS, device=CPU)
    assert int(cond_mask.sum()) == TEXT_TOKENS > int(uncond_mask.sum())  # the text mask is cross-attention's
    run = _batched_cfg_run(pipe, cond, uncond, height=32, width=64)
    # 9 frames at 32 x 64 through the tiny VAE (x4 spatial, x4 temporal), patch 1: 3 x 8 x 16 video tokens; the
    # self-attention (attn1) holds no text.
    assert run.grids() == {0: {(3, 8, 16)}, 1: {(3, 8, 16)}}
    assert _seq_lens(run) == {"cond_uncond": {(384, 384)}}


def test_flux_pipeline_runs_sparse_with_true_cfg():
    pipe = build_flux()
    # FluxPipeline pads CLIP prompts to the tokenizer's model_max_length, which the tiny one does not set.
    pipe.tokenizer_max_length = pipe.text_encoder.config.max_position_embeddings
    with torch.no_grad():
        cond = pipe.encode_prompt(PROMPT, None, device=CPU, max_sequence_length=TEXT_TOKENS)[0]
        uncond = pipe.encode_prompt(NEGATIVE, None, device=CPU, max_sequence_length=TEXT_TOKENS)[0]

    def call():
        return pipe(prompt=PROMPT, negative_prompt=NEGATIVE, true_cfg_scale=4.0, height=16, width=24,
                    num_inference_steps=STEPS, max_sequence_length=TEXT_TOKENS, generator=_generator(),
                    output_type="latent").images

    run = run_sparse(pipe, call, {"cond": cond, "uncond": uncond})
    assert run.output.shape == (1, 8 * 12, 4)  # packed latents: 8 x 12 tokens of 2 x 2 x 1 channels
    # One double-stream and one single-stream block.
    check_cfg_run(run, sparse_layers=2, branch_names={"cond": {"cond"}, "uncond": {"uncond"}})
    # 16 x 24 pixels, VAE x1 (one block), 2 x 2 packing: an 8 x 12 image grid after the text.
    assert run.grids() == {0: {(1, 8, 12)}, 1: {(1, 8, 12)}}
    assert _seq_lens(run) == {"cond": {(TEXT_TOKENS + 96, TEXT_TOKENS + 96)},
                              "uncond": {(TEXT_TOKENS + 96, TEXT_TOKENS + 96)}}
