"""ChronoEdit: image editing as a short video on Wan's architecture (its own copy of Wan's processor)."""

from __future__ import annotations

from diffusers.models.transformers.transformer_chronoedit import WanAttnProcessor, _get_qkv_projections

from .adapters import ModelFacts, register_adapter
from .wan import WanAdapter, WanStyleSparseProcessor


class ChronoEditSparseAttnProcessor(WanStyleSparseProcessor, WanAttnProcessor):
    """Diffusers' ChronoEdit processor with the self-attention call routed through the sparse core."""

    _qkv_projections = staticmethod(_get_qkv_projections)


@register_adapter
class ChronoEditAdapter(WanAdapter):
    family = "chronoedit"
    transformer_classes = ("ChronoEditTransformer3DModel",)
    facts = ModelFacts(
        family="ChronoEdit (image editing through temporal reasoning frames)",
        text="cross-attention (attn2, stays dense) to text and CLIP image tokens",
        rope="3D RoPE applied like Wan's; with 2 latent frames (no reasoning frames) their temporal "
             "positions are 0 and rope_temporal_skip_len - 1, so the grid stays frame-major but the two "
             "frames sit far apart in RoPE time",
        heads="(B, S, H, D) after unflatten; dispatched through dispatch_attention_fn",
    )
    processor_class = ChronoEditSparseAttnProcessor
