"""SkyReels-V2 (T2V, I2V, diffusion forcing): Wan's attention under SkyReels' own processor class."""

from __future__ import annotations

from diffusers.models.transformers.transformer_skyreels_v2 import (
    SkyReelsV2AttnProcessor,
    _get_qkv_projections,
)

from .adapters import ModelFacts, register_adapter
from .wan import WanAdapter, WanStyleSparseProcessor


class SkyReelsV2SparseAttnProcessor(WanStyleSparseProcessor, SkyReelsV2AttnProcessor):
    """Diffusers' SkyReels-V2 processor with the self-attention call routed through the sparse core."""

    _qkv_projections = staticmethod(_get_qkv_projections)


@register_adapter
class SkyReelsV2Adapter(WanAdapter):
    family = "skyreels_v2"
    transformer_classes = ("SkyReelsV2Transformer3DModel",)
    facts = ModelFacts(
        family="SkyReels-V2 (T2V, I2V, diffusion forcing DF)",
        text="cross-attention (attn2, stays dense); I2V image tokens also go through attn2",
        rope="Wan's 3D RoPE inside the processor after the head split, on q and k",
        heads="(B, S, H, D) after unflatten; dispatched through dispatch_attention_fn. With "
              "num_frame_per_block > 1 (asynchronous diffusion forcing) attn1 gets a block-causal boolean "
              "mask: those calls run the model's dense attention (counted as fallback). DF passes per-frame "
              "timesteps [B, F]; steps are tracked from the largest one",
    )
    processor_class = SkyReelsV2SparseAttnProcessor
