"""Qwen-Image (T2I, edit, layered): sparse joint attention over [text, image] in every dual-stream block.

Every block is an MMDiT block whose single attention module projects text and image separately and
attends over the concatenation [text, image]. Qwen-Image is an image model: the grid is frames x rows x
cols with one "frame" per image in `img_shapes` (the edit and layered pipelines append reference images,
which RoPE places at the next frame indices).

Padded text: the model hands every block the same boolean [B, T] text mask (valid tokens True) and the
processor turns it into a [B, 1, 1, T + N] key mask. A block plan cannot express the mask, so when every
row's valid text is the same prefix [0, L) (what the pipelines make for one prompt per forward; they pass
no mask at all when nothing is padded), the padded text tokens are cut out: [valid text, image] goes
through the core, and the padded text queries attend to the kept keys densely. Both equal the masked
attention exactly. Any other mask goes to the core, which then runs dense with a warning.
"""

from __future__ import annotations

import torch
from diffusers.models.transformers.transformer_qwenimage import (
    QwenDoubleStreamAttnProcessor2_0,
    apply_rotary_emb_qwen,
)

from dit_sparse.layout import VideoLayout
from dit_sparse.parallel import root_split_factor

from .adapters import ModelFacts, arg, register_adapter
from .padded_text import PaddedTextAdapter, PaddedTextSparseProcessor
from .sparse_processor import RotaryEmb, Tensor


class QwenImageSparseAttnProcessor(PaddedTextSparseProcessor, QwenDoubleStreamAttnProcessor2_0):
    """Diffusers' Qwen-Image double-stream processor with the joint attention routed through the sparse core."""

    def __call__(self, attn, hidden_states: Tensor, encoder_hidden_states: Tensor | None = None,
                 encoder_hidden_states_mask: Tensor | None = None, attention_mask: Tensor | None = None,
                 image_rotary_emb: RotaryEmb | None = None) -> tuple[Tensor, Tensor]:
        if encoder_hidden_states is None or attention_mask is not None:
            # Diffusers rejects both; let it raise its own errors.
            return super().__call__(
                attn, hidden_states, encoder_hidden_states, encoder_hidden_states_mask, attention_mask,
                image_rotary_emb,
            )
        joint_mask = None
        if encoder_hidden_states_mask is not None:
            image_mask = hidden_states.new_ones(hidden_states.shape[:2], dtype=torch.bool)
            joint_mask = torch.cat([encoder_hidden_states_mask, image_mask], dim=1)[:, None, None, :]
        seq_txt = encoder_hidden_states.shape[1]

        # Heads from a fixed head_dim with -1 for the count, as Diffusers does (tensor-parallel shards).
        head_dim = attn.inner_dim // attn.heads
        img_query = attn.to_q(hidden_states).unflatten(-1, (-1, head_dim))
        img_key = attn.to_k(hidden_states).unflatten(-1, (-1, head_dim))
        img_value = attn.to_v(hidden_states).unflatten(-1, (-1, head_dim))
        txt_query = attn.add_q_proj(encoder_hidden_states).unflatten(-1, (-1, head_dim))
        txt_key = attn.add_k_proj(encoder_hidden_states).unflatten(-1, (-1, head_dim))
        txt_value = attn.add_v_proj(encoder_hidden_states).unflatten(-1, (-1, head_dim))
        if attn.norm_q is not None:
            img_query = attn.norm_q(img_query)
        if attn.norm_k is not None:
            img_key = attn.norm_k(img_key)
        if attn.norm_added_q is not None:
            txt_query = attn.norm_added_q(txt_query)
        if attn.norm_added_k is not None:
            txt_key = attn.norm_added_k(txt_key)

        # RoPE per stream before the concatenation: image freqs from img_shapes, text freqs continue after
        # the largest image index.
        if image_rotary_emb is not None:
            img_freqs, txt_freqs = image_rotary_emb
            img_query = apply_rotary_emb_qwen(img_query, img_freqs, use_real=False)
            img_key = apply_rotary_emb_qwen(img_key, img_freqs, use_real=False)
            txt_query = apply_rotary_emb_qwen(txt_query, txt_freqs, use_real=False)
            txt_key = apply_rotary_emb_qwen(txt_key, txt_freqs, use_real=False)

        query = torch.cat([txt_query, img_query], dim=1)
        key = torch.cat([txt_key, img_key], dim=1)
        value = torch.cat([txt_value, img_value], dim=1)

        out = self._attend_joint(query, key, value, joint_mask, encoder_hidden_states_mask, seq_txt)
        out = out.flatten(2, 3).to(query.dtype)

        txt_out, img_out = out[:, :seq_txt], out[:, seq_txt:]
        img_out = attn.to_out[0](img_out.contiguous())
        if len(attn.to_out) > 1:
            img_out = attn.to_out[1](img_out)
        txt_out = attn.to_add_out(txt_out.contiguous())
        return img_out, txt_out

    def _attend_joint(self, query, key, value, joint_mask, text_mask, seq_txt: int) -> torch.Tensor:
        dense = self._dense_attention(query, key, value, joint_mask)
        valid = self._valid_length(text_mask, seq_txt)
        if valid is None:
            return self._attend_core(query, key, value, dense, text_first=True, mask=joint_mask)
        if valid == seq_txt:  # the mask keeps every key
            return self._attend_core(query, key, value, dense, text_first=True)
        q, k, v = (torch.cat([t[:, :valid], t[:, seq_txt:]], dim=1) for t in (query, key, value))
        out = self._attend_core(q, k, v, dense, text_first=True)
        if out.shape[1] == query.shape[1]:  # the core ran `dense` on the full, masked sequence
            return out
        # Padded text queries still attend to every kept key in the original model.
        tail = self._padded_queries(query[:, valid:seq_txt], k, v)
        return torch.cat([out[:, :valid], tail.to(out.dtype), out[:, valid:]], dim=1)


def _image_grid(img_shapes, image_tokens: int) -> tuple[int, int, int] | None:
    """(frames, rows, cols) of one sample's `img_shapes`, or None when no single grid accounts for the tokens.

    Several images of one size (the edit pipelines' reference images, the layered pipeline's layers) are
    stacked as frames, as RoPE numbers them; images of different sizes have no common grid.
    """
    if not img_shapes:
        return None
    shapes = img_shapes[0]  # one entry per sample; the pipelines give every sample the same shapes
    if isinstance(shapes, tuple):
        shapes = [shapes]
    try:
        sizes = [tuple(int(s) for s in shape) for shape in shapes]
    except (TypeError, ValueError):
        return None
    if not sizes or any(len(s) != 3 for s in sizes) or len({s[1:] for s in sizes}) != 1:
        return None
    frames = sum(s[0] for s in sizes)
    rows, cols = sizes[0][1:]
    return (frames, rows, cols) if frames * rows * cols == image_tokens and min(frames, rows, cols) > 0 else None


@register_adapter
class QwenImageAdapter(PaddedTextAdapter):
    family = "qwen_image"
    timestep_index = 3  # forward(hidden_states, encoder_hidden_states, encoder_hidden_states_mask, timestep, ...)
    transformer_classes = ("QwenImageTransformer2DModel",)
    facts = ModelFacts(
        family="Qwen-Image (T2I, edit / edit-plus, layered; image model, grid frames x rows x cols with one "
        "frame per same-sized image)",
        text="joint, text first: [text, image] in every dual-stream block; padded text keys masked",
        rope="complex 3-axis RoPE inside the processor after the head split and q/k RMSNorm, separately on "
        "image (from img_shapes) and text (positions after the largest image index), before concatenation",
        heads="(B, S, H, D) after unflatten by head_dim; dispatched through dispatch_attention_fn",
    )
    text_first = True
    self_attention_paths = (("transformer_blocks", "attn"),)
    processor_class = QwenImageSparseAttnProcessor

    def layout(self, model, args, kwargs) -> VideoLayout | None:
        x = arg(args, kwargs, "hidden_states", 0)  # packed latents [B, S, C]
        if x is None or x.dim() != 3:
            return None
        grid = _image_grid(arg(args, kwargs, "img_shapes", 4), x.shape[1] * root_split_factor(model))
        return VideoLayout(*grid) if grid is not None else None
