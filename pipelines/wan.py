"""Wan 2.1 / 2.2 (T2V, I2V) and Wan VACE: sparse self-attention (`attn1`); cross-attention stays dense.

`WanStyleSparseProcessor` is the self-attention of Diffusers' `WanAttnProcessor`; SkyReels-V2, Wan
Animate and ChronoEdit ship copies of that processor under their own classes and reuse it from here.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import ClassVar

import torch
from diffusers.models.transformers.transformer_wan import WanAttnProcessor, _get_qkv_projections

from .adapters import LatentVideoAdapter, ModelFacts, register_adapter
from .reorder import ReorderPoint, back_along
from .sparse_processor import SparseProcessorMixin, project_out, split_heads


def apply_wan_rope(x: torch.Tensor, freqs_cos: torch.Tensor, freqs_sin: torch.Tensor) -> torch.Tensor:
    """Wan's 3D RoPE on [B, S, H, D] (interleaved pairs), given the model's (cos, sin) rotary table."""
    # Same arithmetic as Diffusers' WanAttnProcessor (interleaved pairs), so dense outputs match bitwise.
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    cos = freqs_cos[..., 0::2]
    sin = freqs_sin[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2] = x1 * cos - x2 * sin
    out[..., 1::2] = x1 * sin + x2 * cos
    return out.type_as(x)


class WanStyleSparseProcessor(SparseProcessorMixin):
    """Wan's self-attention (RMSNorm across heads, head split, interleaved 3D RoPE) through the sparse core.

    Mixed in front of a family's Diffusers processor class (Wan's or one of its copies), which still
    handles cross-attention calls. `_qkv_projections` is that family's own projection helper, so fused
    projections follow the family's rule exactly.
    """

    _qkv_projections: ClassVar[Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor]]]

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        if encoder_hidden_states is not None:  # never reached for attn1; keeps the class a drop-in
            return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, rotary_emb)
        query, key, value = type(self)._qkv_projections(attn, hidden_states, None)
        query, key, value = split_heads(attn, attn.norm_q(query), attn.norm_k(key), value)
        if rotary_emb is not None:
            query = apply_wan_rope(query, *rotary_emb)
            key = apply_wan_rope(key, *rotary_emb)

        # SkyReels-V2 diffusion forcing passes a block-causal mask here: the core runs it dense.
        out = self._attend(query, key, value, attention_mask)
        return project_out(attn, out.flatten(2, 3).type_as(query))


class WanSparseAttnProcessor(WanStyleSparseProcessor, WanAttnProcessor):
    """Diffusers' Wan processor with the self-attention call routed through the sparse core."""

    _qkv_projections = staticmethod(_get_qkv_projections)


@register_adapter
class WanAdapter(LatentVideoAdapter):
    family = "wan"
    transformer_classes = ("WanTransformer3DModel",)
    facts = ModelFacts(
        family="Wan 2.1/2.2 (T2V, I2V; A14B experts each get their own processors)",
        text="cross-attention (attn2, stays dense); I2V image tokens also go through attn2",
        rope="3D RoPE inside the processor after the head split, on q and k",
        heads="(B, S, H, D) after unflatten; dispatched through dispatch_attention_fn",
    )
    text_first = None
    self_attention_paths = (("blocks", "attn1"),)
    processor_class = WanSparseAttnProcessor

    def reorder_points(self, model: torch.nn.Module) -> tuple[ReorderPoint, ...]:
        """Wan's own transformer is token-wise outside self-attention (norms, MLP, cross-attention queries,
        per-token modulation in Wan 2.2 TI2V): its sequence can run in a method's order from the patch
        embedding to the output projection. The Wan-derived families (VACE hints, SkyReels masks, Animate,
        ChronoEdit) keep per-call permutations."""
        if type(model).__name__ != "WanTransformer3DModel":
            return ()
        return (
            ReorderPoint("patch_embedding", "output", _patches_in_order),
            ReorderPoint("rope", "output", lambda out, order, inverse: tuple(t.index_select(1, order) for t in out)),
            ReorderPoint("condition_embedder", "input", _timesteps_in_order),
            ReorderPoint("proj_out", "output", back_along(1)),
        )


def _patches_in_order(x: torch.Tensor, order: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
    # Wan's forward flattens this [B, C, F, H, W] output into the sequence at once: the flattened positions
    # are reordered and handed back in the same shape, so that flatten yields the sequence in `order`.
    return x.flatten(2).index_select(2, order).view(x.shape)


def _timesteps_in_order(call: tuple[tuple, dict], order: torch.Tensor, inverse: torch.Tensor
                        ) -> tuple[tuple, dict]:
    # Wan 2.2 TI2V passes one timestep per token, flattened to [B * S]: those follow the tokens.
    args, kwargs = call
    seq = kwargs.get("timestep_seq_len")
    if seq is None:
        return call
    if "timestep" in kwargs:
        kwargs = {**kwargs, "timestep": kwargs["timestep"].view(-1, seq).index_select(1, order).flatten()}
    else:
        args = (args[0].view(-1, seq).index_select(1, order).flatten(), *args[1:])
    return args, kwargs


@register_adapter
class WanVACEAdapter(WanAdapter):
    family = "wan_vace"
    transformer_classes = ("WanVACETransformer3DModel",)
    facts = ModelFacts(
        family="Wan VACE (2.1 / 2.2: control, inpainting, reference-to-video)",
        text="cross-attention (attn2, stays dense) in the backbone and in the VACE control blocks",
        rope="Wan's 3D RoPE; the control branch reuses the backbone's rotary table (same frame-major grid: "
             "control latents are zero-padded to the video length)",
        heads="(B, S, H, D) after unflatten; Wan's own WanAttnProcessor in blocks and vace_blocks",
    )

    # The VACE blocks run first in a forward, but the backbone is listed first so its layer indices
    # (warm-up layers, per-layer seeds) are those of the Wan model it was built on.
    self_attention_paths = (("blocks", "attn1"), ("vace_blocks", "attn1"))
