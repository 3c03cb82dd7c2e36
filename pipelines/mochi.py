"""Mochi 1: sparse joint attention over [video, valid text] in every block (`attn1`).

Diffusers' Mochi processor attends per sample over [video, that sample's valid prompt tokens] (the
padded prompt tokens are dropped, not masked), then zero-pads each output to the full length. The sparse
processor does the same: samples with equally many valid prompt tokens share one core call (all of them
in the usual case of one prompt per forward); when the counts differ (e.g. batched CFG with a short
negative prompt), each sample gets its own core call, under a layer name suffixed with `[sample index]`
so that methods which keep state per layer keep it per sample.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import MochiAttnProcessor2_0

from .adapters import LatentVideoAdapter, ModelFacts, register_adapter
from .sparse_processor import QKV, RotaryEmb, SparseProcessorMixin, Tensor, project_out, text_qkv, video_qkv


def _rope_interleaved(x: torch.Tensor, freqs_cos: torch.Tensor, freqs_sin: torch.Tensor) -> torch.Tensor:
    """Mochi's RoPE on (even, odd) channel pairs, in float32, as Diffusers' processor computes it."""
    x_even = x[..., 0::2].float()
    x_odd = x[..., 1::2].float()
    cos = (x_even * freqs_cos - x_odd * freqs_sin).to(x.dtype)
    sin = (x_even * freqs_sin + x_odd * freqs_cos).to(x.dtype)
    return torch.stack([cos, sin], dim=-1).flatten(-2)


class MochiSparseAttnProcessor(SparseProcessorMixin, MochiAttnProcessor2_0):
    """Diffusers' Mochi processor with the per-sample joint attention routed through the sparse core.

    Mochi calls `F.scaled_dot_product_attention` directly (no dispatcher, so there is no attention backend
    to carry over); the dense fallback makes the same call.
    """

    keeps_dispatch_settings = False

    def __call__(self, attn, hidden_states: Tensor, encoder_hidden_states: Tensor, attention_mask: Tensor,
                 image_rotary_emb: RotaryEmb | None = None) -> tuple[Tensor, Tensor]:
        if self.core.config.is_dense:  # sparsity 0: Diffusers' own call, bit for bit
            return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)
        query, key, value = video_qkv(attn, hidden_states)
        encoder_query, encoder_key, encoder_value = text_qkv(attn, encoder_hidden_states)
        # RoPE on the video tokens only.
        if image_rotary_emb is not None:
            query = _rope_interleaved(query, *image_rotary_emb)
            key = _rope_interleaved(key, *image_rotary_emb)

        video_len, text_len = query.shape[1], encoder_query.shape[1]
        out = self._attend_per_prompt_length(
            (query, key, value), (encoder_query, encoder_key, encoder_value), attention_mask
        )
        out = out.flatten(2, 3)
        out, encoder_out = out.split_with_sizes((video_len, text_len), dim=1)
        out = project_out(attn, out)
        if hasattr(attn, "to_add_out"):
            encoder_out = attn.to_add_out(encoder_out)
        return out, encoder_out

    def _attend_per_prompt_length(self, video: QKV, text: QKV, attention_mask: Tensor) -> Tensor:
        """[B, video + text, H, D]: each sample's [video, valid text] attention, zero-padded at the end."""
        batch_size = video[0].shape[0]
        total = video[0].shape[1] + text[0].shape[1]
        # One host sync for the valid-token indices of every sample (Diffusers syncs once per sample).
        indices = [row.nonzero().flatten() for row in attention_mask.bool().reshape(batch_size, -1).cpu()]
        counts = {len(i) for i in indices}
        if len(counts) == 1:
            index = torch.stack(indices).to(video[0].device)  # [B, L]
            joint = [
                torch.cat([v, torch.gather(t, 1, index[:, :, None, None].expand(-1, -1, *t.shape[2:]))], dim=1)
                for v, t in zip(video, text)
            ]
            out = self._attend_rows(*joint, self.name)
            return F.pad(out, (0, 0, 0, 0, 0, total - out.shape[1]))
        outs = []
        for b, index in enumerate(indices):
            index = index.to(video[0].device)
            joint = [torch.cat([v[b : b + 1], t[b : b + 1, index]], dim=1) for v, t in zip(video, text)]
            out = self._attend_rows(*joint, f"{self.name}[{b}]")
            outs.append(F.pad(out, (0, 0, 0, 0, 0, total - out.shape[1])))
        return torch.cat(outs, dim=0)

    def _attend_rows(self, query, key, value, layer_name: str) -> torch.Tensor:
        dense: Callable[[], torch.Tensor] = lambda: F.scaled_dot_product_attention(  # noqa: E731
            query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), dropout_p=0.0, is_causal=False
        ).transpose(1, 2)
        return self.core.attend(query, key, value, layer=self.layer, layer_name=layer_name, dense_fn=dense,
                                text_first=False)


class ProcessorSlot:
    """The processor of a `MochiAttention`, which (unlike Diffusers' other attention classes) has no
    `get_processor`/`set_processor`: `dit_sparse.apply` and `remove` swap processors through this."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.module = module

    @property
    def processor(self):
        return self.module.processor

    def get_processor(self):
        return self.module.processor

    def set_processor(self, processor) -> None:
        self.module.processor = processor


@register_adapter
class MochiAdapter(LatentVideoAdapter):
    family = "mochi"
    timestep_index = 2  # forward(hidden_states, encoder_hidden_states, timestep, ...)
    transformer_classes = ("MochiTransformer3DModel",)
    facts = ModelFacts(
        family="Mochi 1 (preview; T2V)",
        text="joint, text last: [video, valid prompt tokens] per sample in every block's attn1 (padded prompt "
        "tokens dropped, their outputs zero)",
        rope="3D RoPE (learned frequencies, interleaved pairs) inside the processor after the head split and "
        "q/k RMSNorm, on video tokens only",
        heads="(B, S, H, D) after unflatten, transposed to (B, H, S, D) for F.scaled_dot_product_attention "
        "(no dispatcher)",
    )
    text_first = False
    self_attention_paths = (("transformer_blocks", "attn1"),)
    processor_class = MochiSparseAttnProcessor

    def self_attention_modules(self, model: torch.nn.Module) -> Iterator[tuple[str, torch.nn.Module]]:
        for name, module in super().self_attention_modules(model):
            yield name, ProcessorSlot(module)

    def patch_size(self, model: torch.nn.Module) -> tuple[int, int, int]:
        """Mochi patches rows and columns only (`patch_size`); every latent frame is a token frame."""
        p = model.config.patch_size
        return 1, p, p
