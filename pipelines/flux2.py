"""Flux.2 (dev, Klein): sparse joint attention over [text, image] in double- and single-stream blocks.

Double-stream blocks (`Flux2Attention`) get text and image separately and concatenate [text, image]
inside the processor; single-stream blocks (`Flux2ParallelSelfAttention`) get the concatenated sequence
and fuse the attention with the MLP (one input and one output projection for both). Both are replaced,
double-stream blocks first. Flux.2 is an image model: the grid is 1 x rows x cols.

The KV-cache processors that the Klein KV pipeline installs (reference-image K/V cached across steps)
are kept as they are, with a warning: their key set differs from their query set.
"""

from __future__ import annotations

import torch
from diffusers.models.embeddings import apply_rotary_emb
from diffusers.models.transformers.transformer_flux2 import (
    Flux2AttnProcessor,
    Flux2ParallelSelfAttnProcessor,
    _get_qkv_projections,
)

from dit_sparse.layout import VideoLayout
from dit_sparse.parallel import root_split_factor

from .adapters import DOUBLE_AND_SINGLE_STREAM, ModelAdapter, ModelFacts, arg, register_adapter
from .flux import _image_grid, joint_qkv
from .sparse_processor import RotaryEmb, SparseProcessorMixin, Tensor, project_out


class Flux2SparseAttnProcessor(SparseProcessorMixin, Flux2AttnProcessor):
    """Diffusers' Flux.2 double-stream processor with the joint attention routed through the sparse core."""

    def __call__(self, attn, hidden_states: Tensor, encoder_hidden_states: Tensor | None = None,
                 attention_mask: Tensor | None = None,
                 image_rotary_emb: RotaryEmb | None = None) -> Tensor | tuple[Tensor, Tensor]:
        # RoPE over the whole joint sequence (text ids first, 4 axes), after the concatenation.
        query, key, value = joint_qkv(attn, _get_qkv_projections(attn, hidden_states, encoder_hidden_states),
                                      image_rotary_emb)
        out = self._attend(query, key, value, attention_mask, text_first=True)
        out = out.flatten(2, 3).to(query.dtype)

        if encoder_hidden_states is not None:
            text_len = encoder_hidden_states.shape[1]
            encoder_out, out = out.split_with_sizes([text_len, out.shape[1] - text_len], dim=1)
            encoder_out = attn.to_add_out(encoder_out)
        out = project_out(attn, out)
        if encoder_hidden_states is not None:
            return out, encoder_out
        return out


class Flux2SparseParallelSelfAttnProcessor(SparseProcessorMixin, Flux2ParallelSelfAttnProcessor):
    """Diffusers' Flux.2 single-stream (attention + MLP in parallel) processor, attention through the core."""

    def __call__(self, attn, hidden_states: Tensor, attention_mask: Tensor | None = None,
                 image_rotary_emb: RotaryEmb | None = None) -> Tensor:
        hidden_states = attn.to_qkv_mlp_proj(hidden_states)
        # Split QKV from the MLP input by their global ratio, as Diffusers does (valid on tensor-parallel shards).
        qkv_dim = 3 * attn.inner_dim
        mlp_dim = attn.mlp_hidden_dim * attn.mlp_mult_factor
        local_qkv = hidden_states.shape[-1] * qkv_dim // (qkv_dim + mlp_dim)
        qkv, mlp_hidden_states = torch.split(hidden_states, [local_qkv, hidden_states.shape[-1] - local_qkv], dim=-1)

        query, key, value = qkv.chunk(3, dim=-1)
        query = attn.norm_q(query.unflatten(-1, (-1, attn.head_dim)))
        key = attn.norm_k(key.unflatten(-1, (-1, attn.head_dim)))
        value = value.unflatten(-1, (-1, attn.head_dim))
        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
            key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)

        out = self._attend(query, key, value, attention_mask, text_first=True)
        out = out.flatten(2, 3).to(query.dtype)

        mlp_hidden_states = attn.mlp_act_fn(mlp_hidden_states)
        return attn.to_out(torch.cat([out, mlp_hidden_states], dim=-1))


@register_adapter
class Flux2Adapter(ModelAdapter):
    family = "flux2"
    timestep_index = 2  # forward(hidden_states, encoder_hidden_states, timestep, ...)
    transformer_classes = ("Flux2Transformer2DModel",)
    facts = ModelFacts(
        family="Flux.2 (dev, Klein; image model, grid 1 x rows x cols)",
        text="joint, text first: [text, image] in double-stream and single-stream (parallel attention+MLP) blocks",
        rope="4-axis RoPE (t, h, w, l ids) inside the processor after q/k RMSNorm and concatenation, on the "
        "whole joint sequence (text ids count along l)",
        heads="(B, S, H, D) after unflatten by head_dim; dispatched through dispatch_attention_fn",
    )
    text_first = True
    self_attention_paths = DOUBLE_AND_SINGLE_STREAM
    # The KV-cache processors of the Klein KV pipeline are not subclasses of these, and are kept.
    processor_twins = {
        Flux2AttnProcessor: Flux2SparseAttnProcessor,
        Flux2ParallelSelfAttnProcessor: Flux2SparseParallelSelfAttnProcessor,
    }

    def layout(self, model, args, kwargs) -> VideoLayout | None:
        x = arg(args, kwargs, "hidden_states", 0)  # packed latents [B, S, C]
        if x is None or x.dim() != 3:
            return None
        # ids (t, h, w, l): rows and cols are id columns 1 and 2, as in Flux.1; reference images (t = 10,
        # 20, ...) are appended to the image tokens, and then no single grid accounts for them.
        grid = _image_grid(arg(args, kwargs, "img_ids", 3), x.shape[1])
        split = root_split_factor(model)  # context parallelism may have split x (and img_ids) already
        return VideoLayout(1, grid[0] * split, grid[1]) if grid is not None else None
