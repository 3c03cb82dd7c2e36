"""Wan 2.2 Animate: the Wan backbone (with its own copy of Wan's processor) plus face-adapter blocks."""

from __future__ import annotations

from diffusers.models.transformers.transformer_wan_animate import WanAttnProcessor, _get_qkv_projections

from .adapters import ModelFacts, register_adapter
from .wan import WanAdapter, WanStyleSparseProcessor


class WanAnimateSparseAttnProcessor(WanStyleSparseProcessor, WanAttnProcessor):
    """Diffusers' Wan Animate processor with the self-attention call routed through the sparse core."""

    _qkv_projections = staticmethod(_get_qkv_projections)


@register_adapter
class WanAnimateAdapter(WanAdapter):
    family = "wan_animate"
    transformer_classes = ("WanAnimateTransformer3DModel",)
    facts = ModelFacts(
        family="Wan 2.2 Animate (character animation / replacement)",
        text="cross-attention (attn2, stays dense) to text and CLIP image tokens; the face adapter "
             "(face_adapter.*, per-frame cross-attention to motion features) keeps its processor",
        rope="Wan's 3D RoPE over all latent frames, the reference frame (frame 0) included",
        heads="(B, S, H, D) after unflatten; pose latents are added to frames 1.. before patching, so the "
              "grid is the hidden_states' (F = 1 reference + T frames)",
    )
    processor_class = WanAnimateSparseAttnProcessor
