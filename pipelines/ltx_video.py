"""LTX-Video (0.9.x): sparse self-attention (`attn1`); text cross-attention (`attn2`) keeps its processor."""

from __future__ import annotations

from diffusers.models.transformers.transformer_ltx import LTXVideoAttnProcessor, apply_rotary_emb

from dit_sparse.layout import VideoLayout
from dit_sparse.parallel import root_split_factor

from .adapters import ModelAdapter, ModelFacts, arg, register_adapter
from .sparse_processor import SparseProcessorMixin, head_mask, project_out, split_heads


class LTXVideoSparseAttnProcessor(SparseProcessorMixin, LTXVideoAttnProcessor):
    """Diffusers' LTX-Video processor with the self-attention call routed through the sparse core."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        if encoder_hidden_states is not None:  # never reached for attn1; keeps the class a drop-in
            return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)
        if attention_mask is not None:
            attention_mask = head_mask(attn, attention_mask, hidden_states)

        # LTX normalises across heads and applies RoPE before the head split.
        query = attn.norm_q(attn.to_q(hidden_states))
        key = attn.norm_k(attn.to_k(hidden_states))
        value = attn.to_v(hidden_states)
        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb)
            key = apply_rotary_emb(key, image_rotary_emb)
        query, key, value = split_heads(attn, query, key, value)

        out = self._attend(query, key, value, attention_mask)
        return project_out(attn, out.flatten(2, 3).to(query.dtype))


@register_adapter
class LTXVideoAdapter(ModelAdapter):
    family = "ltx_video"
    timestep_index = 2  # forward(hidden_states, ..., timestep, ...)
    transformer_classes = ("LTXVideoTransformer3DModel",)
    facts = ModelFacts(
        family="LTX-Video 0.9.x (T2V, I2V)",
        text="cross-attention (attn2, stays dense); self-attention attn1 is video only",
        rope="3D RoPE inside the processor before the head split (after RMSNorm across heads), on q and k",
        heads="(B, S, H, D) after unflatten; dispatched through dispatch_attention_fn",
    )
    text_first = None
    self_attention_paths = (("transformer_blocks", "attn1"),)
    processor_class = LTXVideoSparseAttnProcessor

    def layout(self, model, args, kwargs) -> VideoLayout | None:
        """Grid from the `num_frames`/`height`/`width` kwargs (latent sizes; LTX ships with patch 1x1x1).

        hidden_states arrive already packed as [B, S, C]. The condition pipeline passes `video_coords`
        instead (and appends conditioning tokens), so no grid is reported there.
        """
        x = arg(args, kwargs, "hidden_states", 0)
        sizes = [arg(args, kwargs, name, i) for name, i in (("num_frames", 4), ("height", 5), ("width", 6))]
        if x is None or x.dim() != 3 or any(s is None for s in sizes):
            return None
        f, h, w = (int(s) for s in sizes)
        seq_len = x.shape[1] * root_split_factor(model)  # context parallelism may have split x already
        if f * h * w != seq_len:  # sizes given before patching
            pt, p = model.config.patch_size_t, model.config.patch_size
            f, h, w = f // pt, h // p, w // p
            if f * h * w != seq_len:
                return None
        return VideoLayout(f, h, w)
