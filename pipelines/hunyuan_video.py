"""HunyuanVideo (T2V, I2V): sparse joint attention over [video, text] in the dual- and single-stream blocks.

The text token refiner (self-attention over text only) keeps its original processor.

Padded text: the pipeline pads prompts to a fixed length and the model masks the padded keys with a
boolean [B, 1, 1, S] key mask that keeps a prefix of the joint sequence. A block plan cannot express that
mask, so the processor drops the padded tail before the core sees the sequence: the valid part
[video, valid text] attends to itself through the core, and the few padded text queries attend to the
valid keys densely. Both equal the masked attention exactly. When the valid length differs across the
batch (or the mask has another form), the mask goes to the core, which then runs dense with a warning.
"""

from __future__ import annotations

import torch
from diffusers.models.embeddings import apply_rotary_emb
from diffusers.models.transformers.transformer_hunyuan_video import HunyuanVideoAttnProcessor2_0

from .adapters import DOUBLE_AND_SINGLE_STREAM, LatentVideoAdapter, ModelFacts, register_adapter
from .padded_text import PaddedTextAdapter, PaddedTextSparseProcessor
from .sparse_processor import RotaryEmb, Tensor, video_qkv, with_text_last


class HunyuanVideoSparseAttnProcessor(PaddedTextSparseProcessor, HunyuanVideoAttnProcessor2_0):
    """Diffusers' HunyuanVideo processor with the joint attention routed through the sparse core."""

    def __call__(self, attn, hidden_states: Tensor, encoder_hidden_states: Tensor | None = None,
                 attention_mask: Tensor | None = None,
                 image_rotary_emb: RotaryEmb | None = None) -> tuple[Tensor, Tensor]:
        if encoder_hidden_states is None:  # not a joint call (never made by the blocks we replace)
            return super().__call__(attn, hidden_states, None, attention_mask, image_rotary_emb)
        text_len = encoder_hidden_states.shape[1]
        single_stream = attn.add_q_proj is None
        if single_stream:
            hidden_states = torch.cat([hidden_states, encoder_hidden_states], dim=1)

        query, key, value = video_qkv(attn, hidden_states)

        # RoPE on the video tokens only (the text tail is left as is), exactly as Diffusers does.
        if image_rotary_emb is not None:
            if single_stream:
                query = torch.cat(
                    [apply_rotary_emb(query[:, :-text_len], image_rotary_emb, sequence_dim=1), query[:, -text_len:]],
                    dim=1,
                )
                key = torch.cat(
                    [apply_rotary_emb(key[:, :-text_len], image_rotary_emb, sequence_dim=1), key[:, -text_len:]],
                    dim=1,
                )
            else:
                query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
                key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)

        if not single_stream:
            query, key, value = with_text_last(attn, (query, key, value), encoder_hidden_states)

        out = self._attend(query, key, value, attention_mask)
        return self._text_last_outputs(attn, out.flatten(2, 3).to(query.dtype), text_len)

    def _attend(self, query, key, value, attention_mask=None, text_first=False):
        dense = self._dense_attention(query, key, value, attention_mask)
        valid = self._valid_length(attention_mask, query.shape[1])
        if valid is None or valid == query.shape[1]:
            return self._attend_core(query, key, value, dense, text_first=False, mask=attention_mask)
        # Padded text queries still attend to every valid key in the original model.
        return self._attend_text_last_prefix(query, key, value, valid, dense)


@register_adapter
class HunyuanVideoAdapter(PaddedTextAdapter, LatentVideoAdapter):
    family = "hunyuan_video"
    transformer_classes = ("HunyuanVideoTransformer3DModel",)
    facts = ModelFacts(
        family="HunyuanVideo (T2V; I2V latent-concat and token-replace variants)",
        text="joint, text last: [video, text] in dual- and single-stream blocks; padded text keys masked",
        rope="3D RoPE inside the processor after the head split and q/k norm, on video tokens only",
        heads="(B, S, H, D) after unflatten; dispatched through dispatch_attention_fn",
    )
    text_first = False
    self_attention_paths = DOUBLE_AND_SINGLE_STREAM
    processor_class = HunyuanVideoSparseAttnProcessor

    def patch_size(self, model: torch.nn.Module) -> tuple[int, int, int]:
        """The config gives the spatial patch (`patch_size`) and the temporal one (`patch_size_t`) apart."""
        p = model.config.patch_size
        return model.config.patch_size_t, p, p
