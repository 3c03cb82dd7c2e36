"""Flux.1 (dev, schnell, Fill, Kontext): sparse joint attention over [text, image] in every block.

Double-stream blocks get text and image separately and concatenate [text, image] inside the processor;
single-stream blocks get the already concatenated [text, image] sequence. Both are replaced, double-stream
blocks first. Flux is an image model: the grid is 1 x rows x cols.
"""

from __future__ import annotations

import torch
from diffusers.models.embeddings import apply_rotary_emb
from diffusers.models.transformers.transformer_flux import FluxAttnProcessor, _get_qkv_projections

from dit_sparse.layout import VideoLayout
from dit_sparse.parallel import root_split_factor

from .adapters import (
    DOUBLE_AND_SINGLE_STREAM,
    ModelAdapter,
    ModelFacts,
    arg,
    keep_processor,
    register_adapter,
)
from .sparse_processor import SparseProcessorMixin


def joint_qkv(attn, projections: tuple, image_rotary_emb) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """[text, image] query, key, value [B, S, H, D] of a Flux-style joint block, as Diffusers' Flux and
    Flux.2 processors compute them: `projections` are the six q/k/v of the module's `_get_qkv_projections`;
    per-head RMSNorm, text first when the block has text projections, RoPE over the joint sequence."""
    query, key, value, encoder_query, encoder_key, encoder_value = projections
    # A fixed head_dim with -1 for the heads, as Diffusers does (tensor-parallel shards have fewer heads).
    query = attn.norm_q(query.unflatten(-1, (-1, attn.head_dim)))
    key = attn.norm_k(key.unflatten(-1, (-1, attn.head_dim)))
    value = value.unflatten(-1, (-1, attn.head_dim))
    if attn.added_kv_proj_dim is not None:
        encoder_query = attn.norm_added_q(encoder_query.unflatten(-1, (-1, attn.head_dim)))
        encoder_key = attn.norm_added_k(encoder_key.unflatten(-1, (-1, attn.head_dim)))
        encoder_value = encoder_value.unflatten(-1, (-1, attn.head_dim))
        query = torch.cat([encoder_query, query], dim=1)
        key = torch.cat([encoder_key, key], dim=1)
        value = torch.cat([encoder_value, value], dim=1)
    if image_rotary_emb is not None:
        query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
        key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)
    return query, key, value


class FluxSparseAttnProcessor(SparseProcessorMixin, FluxAttnProcessor):
    """Diffusers' Flux processor with the joint attention routed through the sparse core."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        # RoPE over the whole joint sequence (text ids are zeros), after the concatenation.
        query, key, value = joint_qkv(attn, _get_qkv_projections(attn, hidden_states, encoder_hidden_states),
                                      image_rotary_emb)
        out = self._attend(query, key, value, attention_mask, text_first=True)
        out = out.flatten(2, 3).to(query.dtype)

        if encoder_hidden_states is None:  # single-stream block: the caller splits text and image
            return out
        text_len = encoder_hidden_states.shape[1]
        encoder_out, out = out.split_with_sizes([text_len, out.shape[1] - text_len], dim=1)
        out = attn.to_out[0](out.contiguous())
        out = attn.to_out[1](out)
        encoder_out = attn.to_add_out(encoder_out.contiguous())
        return out, encoder_out


def _image_grid(img_ids: torch.Tensor | None, image_tokens: int) -> tuple[int, int] | None:
    """(rows, cols) of the image tokens, or None when no single grid accounts for them.

    Flux packs 2x2 latent patches row-major and gives each token the id (0, row, col), so rows and cols are
    the extents of id columns 1 and 2 (one host sync per forward). When the extents do not account for
    every token (Kontext appends a reference image with id[0] = 1) there is no single grid: None. Without
    ids the grid is taken as square when the token count is a perfect square, else None.
    """
    if img_ids is not None:
        ids = img_ids[0] if img_ids.dim() == 3 else img_ids
        if ids.dim() != 2 or ids.shape[0] != image_tokens or ids.shape[1] < 3:
            return None
        lo_r, lo_c, hi_r, hi_c = torch.cat([ids[:, 1:3].amin(0), ids[:, 1:3].amax(0)]).tolist()
        rows, cols = int(hi_r - lo_r) + 1, int(hi_c - lo_c) + 1
        return (rows, cols) if rows * cols == image_tokens else None
    side = int(round(image_tokens**0.5))
    return (side, side) if side * side == image_tokens else None


@register_adapter
class FluxAdapter(ModelAdapter):
    family = "flux"
    timestep_index = 3  # forward(hidden_states, ..., timestep, ...)
    transformer_classes = ("FluxTransformer2DModel",)
    facts = ModelFacts(
        family="Flux.1 (dev, schnell, Fill, Kontext; image model, grid 1 x rows x cols)",
        text="joint, text first: [text, image] in double-stream and single-stream blocks",
        rope="2D RoPE (3 id axes) inside the processor after q/k RMSNorm and concatenation, on the whole "
        "joint sequence (text ids are zeros)",
        heads="(B, S, H, D) after unflatten by head_dim; dispatched through dispatch_attention_fn",
    )
    text_first = True
    self_attention_paths = DOUBLE_AND_SINGLE_STREAM
    processor_class = FluxSparseAttnProcessor

    def make_processor(self, original, core, layer: int, name: str):
        if not isinstance(original, FluxAttnProcessor):
            # e.g. the IP-Adapter processor, which owns weights and adds image-prompt attention: keep it.
            return keep_processor(original, name)
        return super().make_processor(original, core, layer, name)

    def layout(self, model, args, kwargs) -> VideoLayout | None:
        x = arg(args, kwargs, "hidden_states", 0)  # packed latents [B, S, C]
        if x is None or x.dim() != 3:
            return None
        grid = _image_grid(arg(args, kwargs, "img_ids", 4), x.shape[1])
        # Under context parallelism the tracker may see one shard of whole rows: scale the rows back up.
        split = root_split_factor(model)
        return VideoLayout(1, grid[0] * split, grid[1]) if grid is not None else None
