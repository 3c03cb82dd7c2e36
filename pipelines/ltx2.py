"""LTX-2 (2.0 / 2.3 / 2.5, audio + video): sparse video self-attention (`attn1`); every other attention stays dense.

Each LTX-2 block runs six attentions, all `LTX2Attention` modules with the same processor class:

- `attn1`: video self-attention over the video tokens alone. The only one made sparse.
- `audio_attn1`: audio self-attention (a 1D sequence of audio latent frames: no video grid, and short).
- `attn2` / `audio_attn2`: cross-attention from video / audio to the prompt (the connectors' text embeddings).
- `audio_to_video_attn` / `video_to_audio_attn`: cross-attention between the two streams.

The cross-attentions have queries and keys of different lengths, and the audio stream has no frame x row x col
grid for the methods to exploit, so those keep their original processor objects.

Models built with `perturbed_attn=True` (LTX-2.3 and later) use `LTX2PerturbedAttnProcessor`, which
implements spatio-temporal guidance (STG): in the STG blocks of the STG forward, attention is replaced by the
value projection. Those calls never reach the sparse core; partially perturbed batches go through the core and
are blended with the values exactly as Diffusers does.
"""

from __future__ import annotations

import weakref

import torch
from diffusers.models.transformers.transformer_ltx2 import (
    LTX2AudioVideoAttnProcessor,
    LTX2PerturbedAttnProcessor,
    apply_interleaved_rotary_emb,
    apply_split_rotary_emb,
)

from dit_sparse.layout import VideoLayout
from dit_sparse.parallel import root_split_factor

from .adapters import ModelAdapter, ModelFacts, arg, register_adapter
from .sparse_processor import RotaryEmb, SparseProcessorMixin, Tensor, head_mask, project_out, split_heads

# Positions of the forward arguments the adapter reads, in LTX2VideoTransformer3DModel.forward's signature.
_TIMESTEP_INDEX = 4
_SIZE_ARGS = (("num_frames", 10), ("height", 11), ("width", 12))
_VIDEO_COORDS_INDEX = 15


class _LTX2SparseSelfAttention(SparseProcessorMixin):
    """The video self-attention of Diffusers' LTX-2 processors, with the attention call through the sparse core.

    Deliberately defines no `__call__`: the concrete classes below put it in front of one Diffusers processor
    class each, and `super().__call__` must reach that class for the calls that stay dense.
    """

    def _self_attention(
        self,
        attn: torch.nn.Module,
        hidden_states: Tensor,
        attention_mask: Tensor | None,
        query_rotary_emb: RotaryEmb | None,
        key_rotary_emb: RotaryEmb | None,
        perturbation_mask: Tensor | None = None,
    ) -> Tensor:
        """Diffusers' maths step by step (same ops, same order), so a dense core gives bitwise equal outputs."""
        if attention_mask is not None:  # IC-LoRA's video_self_attention_mask, as an additive bias
            attention_mask = head_mask(attn, attention_mask, hidden_states)

        # Per-head output gates (gated attention) are computed from the block's input, not the attention output.
        gate_logits = attn.to_gate_logits(hidden_states) if attn.to_gate_logits is not None else None

        query = attn.norm_q(attn.to_q(hidden_states))  # RMSNorm across all heads, before the head split
        key = attn.norm_k(attn.to_k(hidden_states))
        value = attn.to_v(hidden_states)
        # RoPE on the flat [B, S, H*D] projections, with Diffusers' own functions. Self-attention gets one table
        # (query_rotary_emb) unless the caller passes a separate key table.
        if query_rotary_emb is not None:
            key_emb = key_rotary_emb if key_rotary_emb is not None else query_rotary_emb
            if attn.rope_type == "interleaved":
                query = apply_interleaved_rotary_emb(query, query_rotary_emb)
                key = apply_interleaved_rotary_emb(key, key_emb)
            elif attn.rope_type == "split":
                query = apply_split_rotary_emb(query, query_rotary_emb)
                key = apply_split_rotary_emb(key, key_emb)
        query, key, value_heads = split_heads(attn, query, key, value)

        out = self._attend(query, key, value_heads, attention_mask)
        out = out.flatten(2, 3).to(query.dtype)
        if perturbation_mask is not None:
            # STG on some batch rows: those take the value projection instead of the attention output.
            out = torch.lerp(value, out, perturbation_mask)
        if gate_logits is not None:
            # 2 * sigmoid: zero-initialised gate logits leave the output unchanged.
            gates = 2.0 * torch.sigmoid(gate_logits)  # [B, S, H]
            out = (out.unflatten(2, (attn.heads, -1)) * gates.unsqueeze(-1)).flatten(2, 3)
        return project_out(attn, out)


class LTX2SparseAttnProcessor(_LTX2SparseSelfAttention, LTX2AudioVideoAttnProcessor):
    """Diffusers' LTX-2 processor with the video self-attention call routed through the sparse core."""

    def __call__(self, attn: torch.nn.Module, hidden_states: Tensor, encoder_hidden_states: Tensor | None = None,
                 attention_mask: Tensor | None = None, query_rotary_emb: RotaryEmb | None = None,
                 key_rotary_emb: RotaryEmb | None = None) -> Tensor:
        """Self-attention (no `encoder_hidden_states`) through the sparse core; anything else as Diffusers."""
        if encoder_hidden_states is not None:  # never reached for attn1; keeps the class a drop-in
            return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, query_rotary_emb,
                                    key_rotary_emb)
        return self._self_attention(attn, hidden_states, attention_mask, query_rotary_emb, key_rotary_emb)


class LTX2SparsePerturbedAttnProcessor(_LTX2SparseSelfAttention, LTX2PerturbedAttnProcessor):
    """Diffusers' LTX-2 STG processor with the video self-attention call routed through the sparse core.

    `LTX2Attention.forward` passes only the keyword arguments named in the processor's `__call__` signature,
    so this signature must keep `perturbation_mask` and `all_perturbed`.
    """

    def __call__(self, attn: torch.nn.Module, hidden_states: Tensor, encoder_hidden_states: Tensor | None = None,
                 attention_mask: Tensor | None = None, query_rotary_emb: RotaryEmb | None = None,
                 key_rotary_emb: RotaryEmb | None = None, perturbation_mask: Tensor | None = None,
                 all_perturbed: bool | Tensor | None = None) -> Tensor:
        """Self-attention through the sparse core unless STG perturbs every row; anything else as Diffusers."""
        if all_perturbed is None:
            all_perturbed = torch.all(perturbation_mask == 0) if perturbation_mask is not None else False
        if encoder_hidden_states is not None or all_perturbed:
            # Cross-attention (never reached for attn1), or an STG block where every row skips attention and
            # takes the value projection: no attention for the core to run, Diffusers' code does it all.
            return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, query_rotary_emb,
                                    key_rotary_emb, perturbation_mask, all_perturbed)
        return self._self_attention(attn, hidden_states, attention_mask, query_rotary_emb, key_rotary_emb,
                                    perturbation_mask)


def _frame_major_grid(coords: Tensor) -> tuple[int, int, int] | None:
    """(frames, rows, cols) when `coords` place the tokens on a frame-major grid, else None.

    `coords` is the model's `video_coords`: [B, 3, N, 2] patch bounds [start, end) or [B, 3, N] positions, on
    the (time, height, width) axes. The grid must be exact: one time per frame, the same rows in every frame,
    the same columns in every row, distinct along each axis, and the same for every batch row.
    """
    if coords.dim() == 4:
        coords = coords.sum(-1)  # start + end: twice the patch midpoint the RoPE uses, same structure
    if coords.dim() != 3 or coords.shape[1] != 3 or coords.shape[2] == 0:
        return None
    # SYNC: one copy to the host, once per coords tensor (the adapter caches the verdict).
    coords = coords.detach().to("cpu", torch.float64)
    if not bool((coords == coords[:1]).all()):
        return None
    pos = coords[0]
    n = pos.shape[1]
    new_frame = (pos[0] != pos[0, 0]).nonzero()
    per_frame = int(new_frame[0]) if len(new_frame) else n
    new_row = (pos[1, :per_frame] != pos[1, 0]).nonzero()
    cols = int(new_row[0]) if len(new_row) else per_frame
    if n % per_frame or per_frame % cols:
        return None
    frames, rows = n // per_frame, per_frame // cols
    t, h, w = pos.reshape(3, frames, rows, cols).unbind(0)
    product = (t == t[:, :1, :1]).all() and (h == h[:1, :, :1]).all() and (w == w[:1, :1, :]).all()
    distinct = all(axis.unique().numel() == axis.numel() for axis in (t[:, 0, 0], h[0, :, 0], w[0, 0, :]))
    return (frames, rows, cols) if bool(product) and distinct else None


@register_adapter
class LTX2Adapter(ModelAdapter):
    family = "ltx2"
    timestep_index = _TIMESTEP_INDEX  # forward(hidden_states, audio_hidden_states, text, audio text, timestep, ...)
    transformer_classes = ("LTX2VideoTransformer3DModel",)
    facts = ModelFacts(
        family="LTX-2 / 2.3 / 2.5 audio-video (T2V, I2V, condition, IC-LoRA, DFR pipelines)",
        text="cross-attention (attn2, stays dense); self-attention attn1 is video only. The audio stream "
        "(audio_attn1, audio_attn2) and the audio<->video cross-attention (audio_to_video_attn, "
        "video_to_audio_attn) keep their processors",
        rope="3D RoPE from patch-midpoint coordinates (time in seconds, pixel rows/cols) inside the processor, "
        "after RMSNorm across heads and before the head split, on q and k; interleaved pairs (LTX-2.0) or "
        "split halves per head (LTX-2.3)",
        heads="(B, S, H, D) after unflatten; dispatched through dispatch_attention_fn; optional per-head output "
        "gates (gated attention) and STG value blending applied after the attention call",
    )
    text_first = None
    # The video self-attention `attn1` of every block; the audio and cross-attention modules are left out.
    self_attention_paths = (("transformer_blocks", "attn1"),)
    # The sparse twins of Diffusers' plain and STG processors; any other processor is kept (with a warning).
    processor_twins = {
        LTX2AudioVideoAttnProcessor: LTX2SparseAttnProcessor,
        LTX2PerturbedAttnProcessor: LTX2SparsePerturbedAttnProcessor,
    }

    def __init__(self) -> None:
        # (weak ref to a video_coords tensor, its version, its grid): pipelines reuse one coords tensor for
        # every step, so the host copy in `_frame_major_grid` happens once per generation, not per forward.
        self._coords_verdict: tuple[weakref.ref, int, tuple[int, int, int] | None] | None = None

    def layout(self, model: torch.nn.Module, args: tuple, kwargs: dict) -> VideoLayout | None:
        """Grid of the packed video tokens [B, S, C] (frame-major, as the pipelines' `_pack_latents` flattens).

        From the `num_frames`/`height`/`width` arguments (latent sizes before patching; the model patches them
        as `prepare_video_coords` does) when given, else from `video_coords` (the DFR pipelines pass only
        those). None when the tokens are not exactly that grid, e.g. the condition and IC-LoRA pipelines
        append keyframe or reference tokens to the sequence; grid-based methods (window3d) then run dense
        with a warning.
        """
        x = arg(args, kwargs, "hidden_states", 0)
        if x is None or x.dim() != 3:
            return None
        tokens = x.shape[1] * root_split_factor(model)  # context parallelism may have split x already
        sizes = [arg(args, kwargs, name, i) for name, i in _SIZE_ARGS]
        if all(s is not None for s in sizes):
            pt, p = model.config.patch_size_t, model.config.patch_size
            # Ceiling division: prepare_video_coords steps through each axis by the patch size.
            grid = tuple(-(-int(s) // q) for s, q in zip(sizes, (pt, p, p)))
        else:
            coords = arg(args, kwargs, "video_coords", _VIDEO_COORDS_INDEX)
            if not isinstance(coords, torch.Tensor):
                return None
            grid = self._coords_grid(coords)
        if grid is None or min(grid) < 1 or grid[0] * grid[1] * grid[2] != tokens:
            return None
        return VideoLayout(*grid)

    def _coords_grid(self, coords: Tensor) -> tuple[int, int, int] | None:
        cached = self._coords_verdict
        if cached is not None and cached[0]() is coords and cached[1] == coords._version:
            return cached[2]
        grid = _frame_major_grid(coords)
        self._coords_verdict = (weakref.ref(coords), coords._version, grid)
        return grid
