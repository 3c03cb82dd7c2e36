"""Tiny models built from configs (random weights, no Hub): for tests and offline smoke runs."""

from __future__ import annotations

import torch


def tiny_wan_transformer(num_layers: int = 2, heads: int = 2, head_dim: int = 64, in_channels: int = 16,
                         text_dim: int = 32, seed: int = 0):
    """A `WanTransformer3DModel` small enough for CPU tests (patch 1x2x2)."""
    from diffusers import WanTransformer3DModel

    torch.manual_seed(seed)
    return WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=heads, attention_head_dim=head_dim,
        in_channels=in_channels, out_channels=in_channels, text_dim=text_dim, freq_dim=256, ffn_dim=64,
        num_layers=num_layers, qk_norm="rms_norm_across_heads", rope_max_seq_len=32,
    ).eval()


def tiny_wan_pipeline(num_layers: int = 2, seed: int = 0):
    """A `WanPipeline` with a tiny transformer and VAE and no text encoder (pass prompt_embeds)."""
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanPipeline

    transformer = tiny_wan_transformer(num_layers=num_layers, seed=seed)
    torch.manual_seed(seed)
    vae = AutoencoderKLWan(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1).eval()
    return WanPipeline(tokenizer=None, text_encoder=None, vae=vae, transformer=transformer,
                       scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0))
