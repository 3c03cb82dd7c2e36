"""HunyuanVideo 1.5 (T2V, I2V): sparse joint attention over [video, text] in every dual-stream block.

The token refiner (self-attention over text only) keeps its original processor.

Text and masks: the model joins three conditioning streams (SigLIP image tokens, ByT5 glyph tokens, the
MLLM prompt) into one text sequence, reordered so that every valid token comes first and every padded
one after (T2V marks all image tokens invalid), and hands every block the same boolean [B, T] mask. The
processor pads it on the left for the video tokens and builds a [B, 1, S, S] mask that is True only
where both query and key are valid. When every row has the same number L of valid text tokens, the
padded tail is cut off: [video, valid text] attends to itself through the core (exactly the masked
attention of those queries), and the padded queries get Diffusers' own masked call on their rows (every
key masked for them). Otherwise the mask goes to the core, which runs dense with a warning.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.models.embeddings import apply_rotary_emb
from diffusers.models.transformers.transformer_hunyuan_video15 import HunyuanVideo15AttnProcessor2_0

from .adapters import ModelFacts, register_adapter
from .hunyuan_video import HunyuanVideoAdapter
from .padded_text import PaddedTextSparseProcessor
from .sparse_processor import RotaryEmb, Tensor, video_qkv, with_text_last


class HunyuanVideo15SparseAttnProcessor(PaddedTextSparseProcessor, HunyuanVideo15AttnProcessor2_0):
    """Diffusers' HunyuanVideo 1.5 processor with the joint attention routed through the sparse core."""

    def __call__(self, attn, hidden_states: Tensor, encoder_hidden_states: Tensor | None = None,
                 attention_mask: Tensor | None = None,
                 image_rotary_emb: RotaryEmb | None = None) -> tuple[Tensor, Tensor | None]:
        if encoder_hidden_states is None or attention_mask is None:  # never made by the blocks we replace
            return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)
        query, key, value = video_qkv(attn, hidden_states)
        # RoPE on the video tokens only, before the text is appended.
        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
            key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)

        query, key, value = with_text_last(attn, (query, key, value), encoder_hidden_states)

        out = self._attend_joint(query, key, value, attention_mask)
        return self._text_last_outputs(attn, out.flatten(2, 3).to(query.dtype), encoder_hidden_states.shape[1])

    def _attend_joint(self, query, key, value, text_mask: torch.Tensor) -> torch.Tensor:
        batch_size, seq_len = query.shape[:2]
        text_len = text_mask.shape[1]
        # Diffusers' joint mask: video tokens valid, then the text mask; a pair attends if both are valid.
        valid_tokens = F.pad(text_mask, (seq_len - text_len, 0), value=True).bool()
        rows = valid_tokens.view(batch_size, 1, 1, seq_len).repeat(1, 1, seq_len, 1)
        mask = rows & rows.transpose(2, 3)
        dense = self._dense_attention(query, key, value, mask)

        valid = self._valid_length(text_mask.bool() if text_mask.dtype != torch.bool else text_mask, text_len)
        if valid is None:
            return self._attend_core(query, key, value, dense, text_first=False, mask=mask)
        keep = seq_len - text_len + valid
        if keep == seq_len:  # nothing padded
            return self._attend_core(query, key, value, dense, text_first=False)
        # Padded queries: Diffusers' masked call restricted to their rows (every key is masked for them).
        return self._attend_text_last_prefix(query, key, value, keep, dense, tail_mask=mask[:, :, keep:])


@register_adapter
class HunyuanVideo15Adapter(HunyuanVideoAdapter):
    """HunyuanVideo's latent patching and [video, text] joint attention, in dual-stream blocks only."""

    family = "hunyuan_video15"
    transformer_classes = ("HunyuanVideo15Transformer3DModel",)
    facts = ModelFacts(
        family="HunyuanVideo 1.5 (T2V, I2V; 480p/720p, step-distilled and meanflow variants)",
        text="joint, text last: [video, text] in every dual-stream block; text = [valid image, ByT5, MLLM tokens, "
        "then padding], padded tokens masked as queries and keys",
        rope="3D RoPE inside the processor after the head split and q/k RMSNorm, on video tokens only",
        heads="(B, S, H, D) after unflatten; dispatched through dispatch_attention_fn",
    )
    self_attention_paths = (("transformer_blocks", "attn"),)
    processor_class = HunyuanVideo15SparseAttnProcessor
