"""`dit-sparse generate --model <folder>` for every family: a tiny pipeline saved with `save_pretrained` stands
in for a Hub id (offline), `load_model` loads it through `DiffusionPipeline.from_pretrained`, and the loaded
transformer gets the right adapter.

Per family: the loaded pipeline has the saved pipeline's class and component classes (tokenizers built
offline, guiders and the Cosmos stand-in guardrail included), the transformer carries the saved weights,
`get_adapter` names the expected family, and `dit_sparse.apply` swaps the expected number of processors in
every expert (both of Wan 2.2 A14B's). The pipelines of test_pipeline_runs_new_families.py (which runs them)
are saved as they are; the other families get the same kind of tiny components here (every component real:
a folder with a component saved as None does not load).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from dit_sparse.pipelines.families import get_adapter
from dit_sparse.pipelines.loading import LoadedModel, ModelLoadError, load_model
from test_pipeline_runs_new_families import (
    METHOD,
    SPARSITY,
    WAN_TINY,
    build_chronoedit,
    build_cosmos2_video2world,
    build_flux2_dev,
    build_flux2_klein,
    build_hunyuan_video15,
    build_wan_animate,
    one_cpu_thread,  # noqa: F401 (autouse fixture: one intra-op thread, as in the runs)
    qwen_tokenizer,
    t5_encoder,
    t5_tokenizer,
    unipc_flow,
    wan_vae,
)

import dit_sparse


# ---------------------------------------------------------------------------------------------- other families
# Every required component must be a real (tiny) one: Diffusers saves a None component as `null` and
# `from_pretrained` then refuses the folder ("expected [...] but only {...} were passed").
def _flow_match():
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler()


def _wan_parts() -> dict:
    tokenizer = t5_tokenizer()
    return dict(tokenizer=tokenizer, text_encoder=t5_encoder(tokenizer, umt5=True), vae=wan_vae())


def _t5_parts() -> dict:
    tokenizer = t5_tokenizer()
    return dict(tokenizer=tokenizer, text_encoder=t5_encoder(tokenizer))


def _clip_text():
    """A CLIP text model and a CLIP BPE tokenizer over single characters (no merges)."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in "abcdefghijklmnopqrstuvwxyz":
        vocab[c], vocab[f"{c}</w>"] = len(vocab), len(vocab) + 1
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[])
    torch.manual_seed(0)
    encoder = CLIPTextModel(CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=8, intermediate_size=16,
                                           num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=32,
                                           projection_dim=8, bos_token_id=0, eos_token_id=1, pad_token_id=1)).eval()
    return tokenizer, encoder


def _wan_transformer(seed: int):
    from diffusers import WanTransformer3DModel

    torch.manual_seed(seed)
    return WanTransformer3DModel(in_channels=4, out_channels=4, **WAN_TINY).eval()


def build_wan():
    """WanPipeline (Wan 2.1 / 2.2 T2V): one expert."""
    from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline

    return WanPipeline(scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), transformer=_wan_transformer(0),
                       **_wan_parts())


def build_wan22_a14b():
    """WanPipeline with two experts (Wan 2.2 A14B: high-noise `transformer`, low-noise `transformer_2`)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline

    return WanPipeline(scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), transformer=_wan_transformer(0),
                       transformer_2=_wan_transformer(1), boundary_ratio=0.875, **_wan_parts())


def build_wan_vace():
    from diffusers import FlowMatchEulerDiscreteScheduler, WanVACEPipeline, WanVACETransformer3DModel

    torch.manual_seed(0)
    transformer = WanVACETransformer3DModel(in_channels=4, out_channels=4, vace_layers=[0], vace_in_channels=72,
                                            **WAN_TINY).eval()
    return WanVACEPipeline(scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), transformer=transformer,
                           **_wan_parts())


def build_skyreels_v2():
    from diffusers import SkyReelsV2Pipeline, SkyReelsV2Transformer3DModel

    torch.manual_seed(0)
    transformer = SkyReelsV2Transformer3DModel(in_channels=4, out_channels=4, **WAN_TINY).eval()
    return SkyReelsV2Pipeline(scheduler=unipc_flow(), transformer=transformer, **_wan_parts())


def build_qwen_image():
    from diffusers import AutoencoderKLQwenImage, QwenImagePipeline, QwenImageTransformer2DModel
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    tokenizer = qwen_tokenizer()
    torch.manual_seed(0)
    text_encoder = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=16, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, bos_token_id=None, eos_token_id=None,
                         rope_scaling={"mrope_section": [1, 1, 2], "rope_type": "default", "type": "default"}),
        vision_config=dict(depth=1, hidden_size=8, intermediate_size=16, num_heads=2, out_hidden_size=16,
                           patch_size=4, spatial_merge_size=1, temporal_patch_size=1),
    )).eval()
    transformer = QwenImageTransformer2DModel(patch_size=2, in_channels=16, out_channels=4, num_layers=2,
                                              attention_head_dim=16, num_attention_heads=2, joint_attention_dim=16,
                                              axes_dims_rope=(4, 6, 6)).eval()
    vae = AutoencoderKLQwenImage(base_dim=8, z_dim=4, dim_mult=[1, 2], num_res_blocks=1,
                                 temperal_downsample=[False, True], latents_mean=[0.0] * 4, latents_std=[1.0] * 4)
    return QwenImagePipeline(scheduler=_flow_match(), vae=vae.eval(), text_encoder=text_encoder, tokenizer=tokenizer,
                             transformer=transformer)


def build_mochi():
    from diffusers import AutoencoderKLMochi, MochiPipeline, MochiTransformer3DModel

    torch.manual_seed(0)
    transformer = MochiTransformer3DModel(patch_size=2, num_attention_heads=2, attention_head_dim=8, num_layers=2,
                                          pooled_projection_dim=16, in_channels=4, text_embed_dim=16, time_embed_dim=4,
                                          max_sequence_length=16).eval()
    vae = AutoencoderKLMochi(encoder_block_out_channels=(32,) * 4, decoder_block_out_channels=(32,) * 4,
                             latent_channels=4, layers_per_block=(1,) * 5, add_attention_block=(False,) * 5,
                             latents_mean=(0.0,) * 4, latents_std=(1.0,) * 4)
    return MochiPipeline(scheduler=_flow_match(), vae=vae.eval(), transformer=transformer, **_t5_parts())


def build_hunyuan_video():
    from diffusers import AutoencoderKLHunyuanVideo, HunyuanVideoPipeline, HunyuanVideoTransformer3DModel
    from transformers import LlamaConfig, LlamaModel

    tokenizer = qwen_tokenizer()
    torch.manual_seed(0)
    text_encoder = LlamaModel(LlamaConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32,
                                          num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                                          head_dim=8, bos_token_id=None, eos_token_id=None)).eval()
    tokenizer_2, text_encoder_2 = _clip_text()
    transformer = HunyuanVideoTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=10, num_layers=1,
        num_single_layers=1, num_refiner_layers=1, patch_size=2, patch_size_t=1, guidance_embeds=True,
        text_embed_dim=16, pooled_projection_dim=8, rope_axes_dim=(2, 4, 4),
    ).eval()
    vae = AutoencoderKLHunyuanVideo(latent_channels=4, down_block_types=("HunyuanVideoDownBlock3D",) * 4,
                                    up_block_types=("HunyuanVideoUpBlock3D",) * 4, block_out_channels=(8,) * 4,
                                    layers_per_block=1, norm_num_groups=4)
    return HunyuanVideoPipeline(text_encoder=text_encoder, tokenizer=tokenizer, transformer=transformer,
                                vae=vae.eval(), scheduler=_flow_match(), text_encoder_2=text_encoder_2,
                                tokenizer_2=tokenizer_2)


def build_cogvideox():
    from diffusers import (
        AutoencoderKLCogVideoX,
        CogVideoXDDIMScheduler,
        CogVideoXPipeline,
        CogVideoXTransformer3DModel,
    )

    torch.manual_seed(0)
    transformer = CogVideoXTransformer3DModel(
        num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4, time_embed_dim=8,
        text_embed_dim=16, num_layers=2, sample_width=12, sample_height=10, sample_frames=9, patch_size=2,
        max_text_seq_length=8, use_rotary_positional_embeddings=True,
    ).eval()
    vae = AutoencoderKLCogVideoX(block_out_channels=(8,) * 4, latent_channels=4, layers_per_block=1,
                                 norm_num_groups=2)
    return CogVideoXPipeline(vae=vae.eval(), transformer=transformer, scheduler=CogVideoXDDIMScheduler(),
                             **_t5_parts())


def build_ltx_video():
    from diffusers import AutoencoderKLLTXVideo, LTXPipeline, LTXVideoTransformer3DModel

    torch.manual_seed(0)
    transformer = LTXVideoTransformer3DModel(in_channels=8, out_channels=8, patch_size=1, patch_size_t=1,
                                             num_attention_heads=2, attention_head_dim=8, cross_attention_dim=16,
                                             num_layers=2, caption_channels=16).eval()
    vae = AutoencoderKLLTXVideo(latent_channels=8, block_out_channels=(8,) * 4, decoder_block_out_channels=(8,) * 4,
                                layers_per_block=(1,) * 5, decoder_layers_per_block=(1,) * 5,
                                spatio_temporal_scaling=(True, True, False, False),
                                decoder_spatio_temporal_scaling=(True, True, False, False),
                                decoder_inject_noise=(False,) * 5, upsample_residual=(False,) * 4,
                                upsample_factor=(1,) * 4, patch_size=1)
    return LTXPipeline(scheduler=_flow_match(), vae=vae.eval(), transformer=transformer, **_t5_parts())


def build_flux():
    from diffusers import AutoencoderKL, FluxPipeline, FluxTransformer2DModel

    tokenizer, text_encoder = _clip_text()
    t5 = _t5_parts()
    torch.manual_seed(0)
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1,
                                         attention_head_dim=16, num_attention_heads=2, joint_attention_dim=16,
                                         pooled_projection_dim=8, axes_dims_rope=(4, 6, 6)).eval()
    vae = AutoencoderKL(block_out_channels=(8,), latent_channels=4, norm_num_groups=4)
    return FluxPipeline(scheduler=_flow_match(), vae=vae.eval(), text_encoder=text_encoder, tokenizer=tokenizer,
                        text_encoder_2=t5["text_encoder"], tokenizer_2=t5["tokenizer"], transformer=transformer)


# ---------------------------------------------------------------------------------------------- cases
@dataclass(frozen=True)
class Case:
    name: str
    build: Callable[[], Any]
    transformer: str  # class of pipe.transformer
    family: str  # adapter family get_adapter must find
    sparse_layers: dict[str, int]  # expert attribute -> processors dit-sparse swaps in it
    conditioned: bool = False  # needs an image or a video: `generate` refuses it, the Python API loads it


CASES = [
    Case("wan", build_wan, "WanTransformer3DModel", "wan", {"transformer": 2}),
    Case("wan22_a14b", build_wan22_a14b, "WanTransformer3DModel", "wan", {"transformer": 2, "transformer_2": 2}),
    Case("wan_animate", build_wan_animate, "WanAnimateTransformer3DModel", "wan_animate", {"transformer": 2}, conditioned=True),
    Case("chronoedit", build_chronoedit, "ChronoEditTransformer3DModel", "chronoedit", {"transformer": 2}, conditioned=True),
    Case("flux2_klein", build_flux2_klein, "Flux2Transformer2DModel", "flux2", {"transformer": 2}),
    Case("flux2_dev", build_flux2_dev, "Flux2Transformer2DModel", "flux2", {"transformer": 2}),
    Case("hunyuan_video15", build_hunyuan_video15, "HunyuanVideo15Transformer3DModel", "hunyuan_video15",
         {"transformer": 2}),
    Case("cosmos2_video2world", build_cosmos2_video2world, "CosmosTransformer3DModel", "cosmos", {"transformer": 2}, conditioned=True),
    Case("wan_vace", build_wan_vace, "WanVACETransformer3DModel", "wan_vace", {"transformer": 3}),
    Case("skyreels_v2", build_skyreels_v2, "SkyReelsV2Transformer3DModel", "skyreels_v2", {"transformer": 2}),
    Case("qwen_image", build_qwen_image, "QwenImageTransformer2DModel", "qwen_image", {"transformer": 2}),
    Case("mochi", build_mochi, "MochiTransformer3DModel", "mochi", {"transformer": 2}),
    Case("hunyuan_video", build_hunyuan_video, "HunyuanVideoTransformer3DModel", "hunyuan_video", {"transformer": 2}),
    Case("cogvideox", build_cogvideox, "CogVideoXTransformer3DModel", "cogvideox", {"transformer": 2}),
    Case("ltx_video", build_ltx_video, "LTXVideoTransformer3DModel", "ltx_video", {"transformer": 2}),
    Case("flux", build_flux, "FluxTransformer2DModel", "flux", {"transformer": 2}),
]


def _component_classes(pipe) -> dict[str, str | None]:
    return {name: None if c is None else type(c).__name__ for name, c in pipe.components.items()}


def _pipeline_settings(pipe) -> dict[str, Any]:
    """The pipeline's own config values (e.g. Wan 2.2's boundary_ratio, Klein's is_distilled)."""
    return {k: v for k, v in pipe.config.items() if not k.startswith("_") and k not in pipe.components}


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_saved_pipeline_loads_with_its_adapter(case, tmp_path):
    pipe = case.build()
    folder = tmp_path / case.name
    pipe.save_pretrained(folder)

    if case.conditioned:  # refused before any weight loads, with what to do instead
        with pytest.raises(ModelLoadError, match=r"besides a prompt.*Python API"):
            load_model(str(folder), torch.device("cpu"))
        from diffusers import DiffusionPipeline

        loaded = LoadedModel(DiffusionPipeline.from_pretrained(folder), case.name, "", None)
    else:
        loaded = load_model(str(folder), torch.device("cpu"))
        assert loaded.description == f"Diffusers pipeline {type(pipe).__name__} from {folder}"
    assert type(loaded.pipe) is type(pipe)
    assert _component_classes(loaded.pipe) == _component_classes(pipe)
    assert _pipeline_settings(loaded.pipe) == _pipeline_settings(pipe)
    assert type(loaded.pipe.transformer).__name__ == case.transformer
    assert get_adapter(loaded.pipe.transformer).family == case.family
    for attr in case.sparse_layers:  # the saved weights, not a fresh initialisation
        saved, got = getattr(pipe, attr).state_dict(), getattr(loaded.pipe, attr).state_dict()
        assert saved.keys() == got.keys() and all(torch.equal(saved[k], got[k]) for k in saved)
        assert getattr(loaded.pipe, attr).dtype == torch.float32

    with dit_sparse.sparse_attention(loaded.pipe, METHOD, SPARSITY, warmup_steps=0, warmup_layers=0) as handle:
        assert {name: len(expert.originals) for name, expert in handle.experts.items()} == case.sparse_layers
        assert all(expert.adapter.family == case.family for expert in handle.experts.values())


def test_load_model_passes_the_dtype_to_from_pretrained(tmp_path):
    build_wan().save_pretrained(tmp_path / "wan")
    loaded = load_model(str(tmp_path / "wan"), torch.device("cpu"), torch.bfloat16)
    assert loaded.pipe.transformer.dtype == torch.bfloat16
    assert get_adapter(loaded.pipe.transformer).family == "wan"
