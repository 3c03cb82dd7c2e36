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

import weakref
from collections.abc import Iterator
from typing import Any

import torch
from diffusers.models.attention_dispatch import dispatch_attention_fn
from diffusers.models.embeddings import apply_rotary_emb
from diffusers.models.transformers.transformer_hunyuan_video import HunyuanVideoAttnProcessor2_0

from dit_sparse.layout import VideoLayout

from .adapters import ModelAdapter, ModelFacts, SparseProcessorMixin, arg, register_adapter, text_qkv


class KeyPaddingTrim:
    """Length of the valid prefix of HunyuanVideo's key mask, computed once per forward for all layers.

    The model builds one mask tensor per forward and hands the same object to every block, so the answer
    is cached against that object (a weak reference: a new forward's mask never hits a stale entry).
    """

    def __init__(self) -> None:
        self._mask_ref: weakref.ref | None = None
        self._length: int | None = None

    def valid_length(self, mask: torch.Tensor, seq_len: int) -> int | None:
        """L such that every batch row keeps exactly keys [0, L); None if the mask is not of that form.

        `mask` is a boolean key mask, [B, 1, 1, S] or [B, S] (other models hand the processors a per-token
        text mask of that shape).
        """
        if self._mask_ref is not None and self._mask_ref() is mask:
            return self._length
        self._length = _prefix_length(mask, seq_len)
        self._mask_ref = weakref.ref(mask)
        return self._length


def _prefix_length(mask: torch.Tensor, seq_len: int) -> int | None:
    if mask.dtype != torch.bool or mask.shape[-1] != seq_len:
        return None
    if not (mask.dim() == 2 or (mask.dim() == 4 and mask.shape[1:3] == (1, 1))):
        return None
    rows = mask.reshape(mask.shape[0], seq_len)
    counts = rows.sum(dim=1)
    prefix = torch.arange(seq_len, device=mask.device)[None, :] < counts[:, None]
    # One host sync for all three facts.
    lo, hi, is_prefix = torch.stack([counts.min(), counts.max(), (prefix == rows).all().long()]).tolist()
    if lo != hi or not is_prefix:
        return None
    return int(lo)


class PaddedTextSparseProcessor(SparseProcessorMixin):
    """A sparse processor for joint attention with padded text: it carries a `KeyPaddingTrim`, shared by
    every layer of a model (given by the adapter) so the mask is analysed once per forward."""

    def __init__(self, core, layer: int, name: str, original: Any = None, trim: KeyPaddingTrim | None = None) -> None:
        super().__init__()
        self._bind(core, layer, name, original)
        self.trim = trim if trim is not None else KeyPaddingTrim()

    def _padded_queries(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                        mask: torch.Tensor | None = None) -> torch.Tensor:
        """Attention of the padded text queries (cut out of the sparse call) by the model's own dense
        attention, as the original masked call computes their rows."""
        return dispatch_attention_fn(
            query, key, value, attn_mask=mask, dropout_p=0.0, is_causal=False,
            backend=self._attention_backend, parallel_config=self._parallel_config,
        )

    def _attend_text_last_prefix(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, keep: int,
                                 dense, tail_mask: torch.Tensor | None = None) -> torch.Tensor:
        """[video, text] with the text padded after `keep` tokens: the sparse core on the first `keep` tokens,
        the padded queries against the kept keys (`tail_mask` None) or against every key under their rows of
        the joint mask."""
        q, k, v = query[:, :keep], key[:, :keep], value[:, :keep]
        out = self.core.attend(q, k, v, layer=self.layer, layer_name=self.name, dense_fn=dense, text_first=False)
        if out.shape[1] == query.shape[1]:  # the core ran `dense` on the full, masked sequence
            return out
        tail = (self._padded_queries(query[:, keep:], k, v) if tail_mask is None
                else self._padded_queries(query[:, keep:], key, value, tail_mask))
        return torch.cat([out, tail.to(out.dtype)], dim=1)

    @staticmethod
    def _text_last_outputs(attn, out: torch.Tensor, text_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(video, text) outputs of a [video, text] joint call through the block's output projections."""
        out, encoder_out = out[:, :-text_len], out[:, -text_len:]
        if getattr(attn, "to_out", None) is not None:
            out = attn.to_out[0](out)
            out = attn.to_out[1](out)
        if getattr(attn, "to_add_out", None) is not None:
            encoder_out = attn.to_add_out(encoder_out)
        return out, encoder_out


class HunyuanVideoSparseAttnProcessor(PaddedTextSparseProcessor, HunyuanVideoAttnProcessor2_0):
    """Diffusers' HunyuanVideo processor with the joint attention routed through the sparse core."""

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
    ):
        if encoder_hidden_states is None:  # not a joint call (never made by the blocks we replace)
            return super().__call__(attn, hidden_states, None, attention_mask, image_rotary_emb)
        text_len = encoder_hidden_states.shape[1]
        single_stream = attn.add_q_proj is None
        if single_stream:
            hidden_states = torch.cat([hidden_states, encoder_hidden_states], dim=1)

        query = attn.to_q(hidden_states).unflatten(2, (attn.heads, -1))
        key = attn.to_k(hidden_states).unflatten(2, (attn.heads, -1))
        value = attn.to_v(hidden_states).unflatten(2, (attn.heads, -1))
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

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
            encoder_query, encoder_key, encoder_value = text_qkv(attn, encoder_hidden_states)
            query = torch.cat([query, encoder_query], dim=1)
            key = torch.cat([key, encoder_key], dim=1)
            value = torch.cat([value, encoder_value], dim=1)

        out = self._attend(query, key, value, attention_mask)
        return self._text_last_outputs(attn, out.flatten(2, 3).to(query.dtype), text_len)

    def _attend(self, query, key, value, attention_mask=None, text_first=False):
        dense = self._dense_attention(query, key, value, attention_mask)
        seq_len = query.shape[1]
        valid = None
        # Under context parallelism each rank holds a shard, so the prefix cannot be cut here.
        if attention_mask is not None and self._parallel_config is None and not self.core.config.is_dense:
            valid = self.trim.valid_length(attention_mask, seq_len)
        if valid is None or valid == seq_len:
            return self.core.attend(
                query, key, value, layer=self.layer, layer_name=self.name, dense_fn=dense,
                text_first=False, attention_mask=attention_mask, parallel_config=self._parallel_config,
            )
        # Padded text queries still attend to every valid key in the original model.
        return self._attend_text_last_prefix(query, key, value, valid, dense)


@register_adapter
class HunyuanVideoAdapter(ModelAdapter):
    family = "hunyuan_video"
    transformer_classes = ("HunyuanVideoTransformer3DModel",)
    facts = ModelFacts(
        family="HunyuanVideo (T2V; I2V latent-concat and token-replace variants)",
        text="joint, text last: [video, text] in dual- and single-stream blocks; padded text keys masked",
        rope="3D RoPE inside the processor after the head split and q/k norm, on video tokens only",
        heads="(B, S, H, D) after unflatten; dispatched through dispatch_attention_fn",
    )
    text_first = False

    def __init__(self) -> None:
        self._trim = KeyPaddingTrim()  # one mask analysis per forward, shared by every layer

    def self_attention_modules(self, model: torch.nn.Module) -> Iterator[tuple[str, torch.nn.Module]]:
        for i, block in enumerate(model.transformer_blocks):
            yield f"transformer_blocks.{i}.attn", block.attn
        for i, block in enumerate(model.single_transformer_blocks):
            yield f"single_transformer_blocks.{i}.attn", block.attn

    def make_processor(self, original, core, layer: int, name: str):
        return HunyuanVideoSparseAttnProcessor(core, layer, name, original, self._trim)

    def layout(self, model, args, kwargs) -> VideoLayout | None:
        x = arg(args, kwargs, "hidden_states", 0)
        if x is None or x.dim() != 5:
            return None
        p, pt = model.config.patch_size, model.config.patch_size_t
        _, _, f, h, w = x.shape
        return VideoLayout(f // pt, h // p, w // p)
