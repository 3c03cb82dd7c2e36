"""Cosmos (1.0 / Predict 2 / 2.5 / Transfer 2.5): sparse self-attention (`attn1`); text stays in `attn2`.

Every block attends over the video tokens alone in `attn1` and to the text (and, in 2.5, image context)
by cross-attention in `attn2`, which keeps its processor.
"""

from __future__ import annotations

import torch
from diffusers.models.attention_dispatch import dispatch_attention_fn
from diffusers.models.embeddings import apply_rotary_emb
from diffusers.models.transformers.transformer_cosmos import CosmosAttnProcessor2_0

from .adapters import LatentVideoAdapter, ModelFacts, register_adapter
from .sparse_processor import RotaryEmb, SparseProcessorMixin, Tensor, project_out


class CosmosSparseAttnProcessor(SparseProcessorMixin, CosmosAttnProcessor2_0):
    """Diffusers' Cosmos processor with the self-attention call routed through the sparse core.

    Cosmos dispatches without an attention backend or parallel config (the default backend, always), so
    the dense fallback makes that same call rather than the mixin's.
    """

    keeps_dispatch_settings = False
    _attention_backend = None
    _parallel_config = None

    def __call__(self, attn, hidden_states: Tensor, encoder_hidden_states: Tensor | None = None,
                 attention_mask: Tensor | None = None, image_rotary_emb: RotaryEmb | None = None) -> Tensor:
        if encoder_hidden_states is not None:  # never reached for attn1; keeps the class a drop-in
            return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)
        # Diffusers normalises and rotates in (B, H, S, D); the core gets (B, S, H, D) views.
        query = attn.to_q(hidden_states).unflatten(2, (attn.heads, -1)).transpose(1, 2)
        key = attn.to_k(hidden_states).unflatten(2, (attn.heads, -1)).transpose(1, 2)
        value = attn.to_v(hidden_states).unflatten(2, (attn.heads, -1)).transpose(1, 2)
        query = attn.norm_q(query)
        key = attn.norm_k(key)
        # RoPE with halves (not pairs) rotated, on every token (all are video).
        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb, use_real=True, use_real_unbind_dim=-2)
            key = apply_rotary_emb(key, image_rotary_emb, use_real=True, use_real_unbind_dim=-2)
        # Grouped-query attention, expanded the way Diffusers does (a no-op for the released models).
        key = key.repeat_interleave(query.size(3) // key.size(3), dim=3)
        value = value.repeat_interleave(query.size(3) // value.size(3), dim=3)
        query, key, value = query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)

        def dense() -> torch.Tensor:
            return dispatch_attention_fn(query, key, value, attn_mask=attention_mask, dropout_p=0.0, is_causal=False)

        out = self.core.attend(query, key, value, layer=self.layer, layer_name=self.name, dense_fn=dense,
                               attention_mask=attention_mask)
        return project_out(attn, out.flatten(2, 3).type_as(query))


@register_adapter
class CosmosAdapter(LatentVideoAdapter):
    family = "cosmos"
    transformer_classes = ("CosmosTransformer3DModel",)
    facts = ModelFacts(
        family="Cosmos 1.0 diffusion, Predict 2 / 2.5, Transfer 2.5 (T2V, V2W, T2I)",
        text="cross-attention (attn2, stays dense); self-attention attn1 is video only",
        rope="3D RoPE (rotate-half layout) inside the processor after the head split and q/k RMSNorm, on q and "
        "k; plus an optional learnable absolute position embedding added before each block",
        heads="(B, H, S, D) for norm and RoPE, then (B, S, H, D) into dispatch_attention_fn (default backend)",
    )
    text_first = None
    self_attention_paths = (("transformer_blocks", "attn1"),)
    processor_class = CosmosSparseAttnProcessor
