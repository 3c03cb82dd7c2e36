"""CogVideoX 1.0 / 1.5 (T2V, I2V): sparse joint attention over [text, video] in every block (`attn1`)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import CogVideoXAttnProcessor2_0, FusedCogVideoXAttnProcessor2_0
from diffusers.models.embeddings import apply_rotary_emb

from .adapters import LatentVideoAdapter, ModelFacts, register_adapter
from .sparse_processor import SparseProcessorMixin, head_mask, project_out


def mask_for_core(mask: torch.Tensor | None) -> torch.Tensor | None:
    """The mask as the core should judge it: boolean, True where a key is attended unchanged.

    An additive float mask leaves a score untouched only where it is 0, so sparse attention (which
    ignores the mask) is exact only when every entry is 0.
    """
    if mask is None or mask.dtype == torch.bool:
        return mask
    return mask == 0


class CogVideoXSparseAttnProcessor(SparseProcessorMixin, CogVideoXAttnProcessor2_0):
    """Diffusers' CogVideoX processor (plain or fused QKV) with the attention routed through the sparse core.

    CogVideoX calls `F.scaled_dot_product_attention` on [B, H, S, D] directly (no dispatcher, so there is
    no attention backend to carry over); the core gets [B, S, H, D] views of the same tensors.
    """

    keeps_dispatch_settings = False

    def __init__(self, core, layer: int, name: str, original=None) -> None:
        super().__init__(core, layer, name, original)
        self.fused = isinstance(original, FusedCogVideoXAttnProcessor2_0)

    def __call__(self, attn, hidden_states, encoder_hidden_states, attention_mask=None, image_rotary_emb=None):
        text_len = encoder_hidden_states.size(1)
        hidden_states = torch.cat([encoder_hidden_states, hidden_states], dim=1)
        # The fused Diffusers processor reads the batch size (and the mask's target length) from the text, the
        # plain one from the joint input.
        sizes_from = encoder_hidden_states if self.fused else hidden_states
        batch_size = sizes_from.shape[0]

        if attention_mask is not None:
            attention_mask = head_mask(attn, attention_mask, sizes_from)

        if self.fused:
            query, key, value = torch.split(attn.to_qkv(hidden_states), attn.to_qkv.out_features // 3, dim=-1)
        else:
            query = attn.to_q(hidden_states)
            key = attn.to_k(hidden_states)
            value = attn.to_v(hidden_states)

        head_dim = key.shape[-1] // attn.heads
        query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        # RoPE (freqs from the pipeline) on the video tokens only, in place like Diffusers.
        if image_rotary_emb is not None:
            query[:, :, text_len:] = apply_rotary_emb(query[:, :, text_len:], image_rotary_emb)
            if not attn.is_cross_attention:
                key[:, :, text_len:] = apply_rotary_emb(key[:, :, text_len:], image_rotary_emb)

        def dense():
            out = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, dropout_p=0.0,
                                                 is_causal=False)
            return out.transpose(1, 2)

        out = self.core.attend(
            query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2),
            layer=self.layer, layer_name=self.name, dense_fn=dense, text_first=True,
            attention_mask=mask_for_core(attention_mask),
        )
        out = project_out(attn, out.reshape(batch_size, -1, attn.heads * head_dim))
        encoder_out, out = out.split([text_len, out.size(1) - text_len], dim=1)
        return out, encoder_out


@register_adapter
class CogVideoXAdapter(LatentVideoAdapter):
    family = "cogvideox"
    timestep_index = 2  # forward(hidden_states, ..., timestep, ...)
    transformer_classes = ("CogVideoXTransformer3DModel",)
    facts = ModelFacts(
        family="CogVideoX 1.0 (patch_size_t None) and 1.5 (patch_size_t set), T2V and I2V",
        text="joint, text first: [text, video] in every block's attn1",
        rope="3D RoPE (freqs computed by the pipeline) inside the processor after the head split and q/k "
        "LayerNorm, on video tokens only; CogVideoX-2b has no RoPE (sincos embedding at the patch embed)",
        heads="(B, H, S, D) straight into F.scaled_dot_product_attention (no dispatcher); the core gets views",
    )
    text_first = True
    self_attention_paths = (("transformer_blocks", "attn1"),)
    processor_class = CogVideoXSparseAttnProcessor
    frames_dim = 1  # hidden_states [B, F, C, H, W]

    def patch_size(self, model: torch.nn.Module) -> tuple[int, int, int]:
        """CogVideoX 1.0 has no temporal patching (`patch_size_t` None), 1.5 patches frames too."""
        p = model.config.patch_size
        return model.config.patch_size_t or 1, p, p
