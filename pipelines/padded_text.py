"""Joint attention with padded text (HunyuanVideo, HunyuanVideo 1.5, Qwen-Image): cutting the padding off.

These models pad the prompt to a fixed length and mask the padded text tokens. A block plan cannot express
such a mask, but when every batch row keeps the same prefix of the text, the padded tokens can be cut out
of the sequence: the valid tokens attend to each other through the sparse core, and the few padded
queries get their rows from the model's own dense call. Both equal the masked attention exactly. What the
mask looks like and where the text sits differ per family; the processors in the family modules say how.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any

import torch

from .adapters import ModelAdapter
from .sparse_processor import SparseProcessorMixin, Tensor, project_out


class KeyPaddingTrim:
    """Length of the valid prefix of a padded-text mask, computed once per forward for all layers.

    The model builds one mask tensor per forward and hands the same object to every block, so the answer
    is cached against that object (a weak reference: a new forward's mask never hits a stale entry).
    """

    def __init__(self) -> None:
        self._mask_ref: weakref.ref | None = None
        self._length: int | None = None

    def valid_length(self, mask: Tensor, seq_len: int) -> int | None:
        """L such that every batch row keeps exactly keys [0, L); None if the mask is not of that form.

        `mask` is a boolean key mask, [B, 1, 1, S] (HunyuanVideo's joint key mask) or [B, S] (the per-token
        text mask that HunyuanVideo 1.5 and Qwen-Image hand their processors).
        """
        if self._mask_ref is not None and self._mask_ref() is mask:
            return self._length
        self._length = _prefix_length(mask, seq_len)
        self._mask_ref = weakref.ref(mask)
        return self._length


def _prefix_length(mask: Tensor, seq_len: int) -> int | None:
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

    def __init__(self, core: Any, layer: int, name: str, original: Any = None,
                 trim: KeyPaddingTrim | None = None) -> None:
        super().__init__(core, layer, name, original)
        self.trim = trim if trim is not None else KeyPaddingTrim()

    def _valid_length(self, mask: Tensor | None, seq_len: int) -> int | None:
        """`KeyPaddingTrim.valid_length` of `mask`, or None when the padding is not cut off: no mask, a
        dense core (the model's own masked call runs anyway), or context parallelism (each rank holds a
        shard of the sequence, not its prefix)."""
        if mask is None or self._parallel_config is not None or self.core.config.is_dense:
            return None
        return self.trim.valid_length(mask, seq_len)

    def _attend_core(self, query: Tensor, key: Tensor, value: Tensor, dense: Callable[[], Tensor],
                     text_first: bool, mask: Tensor | None = None) -> Tensor:
        """The sparse core on [B, S, H, D] with `dense` as its fallback; a `mask` it cannot express makes it
        run `dense`."""
        return self.core.attend(
            query, key, value, layer=self.layer, layer_name=self.name, dense_fn=dense, text_first=text_first,
            attention_mask=mask, parallel_config=self._parallel_config,
        )

    def _padded_queries(self, query: Tensor, key: Tensor, value: Tensor, mask: Tensor | None = None) -> Tensor:
        """Attention of the padded text queries (cut out of the sparse call) by the model's own dense
        attention, as the original masked call computes their rows."""
        return self._dense_attention(query, key, value, mask)()

    def _attend_text_last_prefix(self, query: Tensor, key: Tensor, value: Tensor, keep: int,
                                 dense: Callable[[], Tensor], tail_mask: Tensor | None = None) -> Tensor:
        """[video, text] with the text padded after `keep` tokens: the sparse core on the first `keep` tokens,
        the padded queries against the kept keys (`tail_mask` None) or against every key under their rows of
        the joint mask."""
        q, k, v = query[:, :keep], key[:, :keep], value[:, :keep]
        out = self._attend_core(q, k, v, dense, text_first=False)
        if out.shape[1] == query.shape[1]:  # the core ran `dense` on the full, masked sequence
            return out
        tail = (self._padded_queries(query[:, keep:], k, v) if tail_mask is None
                else self._padded_queries(query[:, keep:], key, value, tail_mask))
        return torch.cat([out, tail.to(out.dtype)], dim=1)

    @staticmethod
    def _text_last_outputs(attn: Any, out: Tensor, text_len: int) -> tuple[Tensor, Tensor]:
        """(video, text) outputs of a [video, text] joint call through the block's output projections."""
        out, encoder_out = out[:, :-text_len], out[:, -text_len:]
        if getattr(attn, "to_out", None) is not None:
            out = project_out(attn, out)
        if getattr(attn, "to_add_out", None) is not None:
            encoder_out = attn.to_add_out(encoder_out)
        return out, encoder_out


class PaddedTextAdapter(ModelAdapter):
    """An adapter whose processors (`processor_class`, a `PaddedTextSparseProcessor`) share one
    `KeyPaddingTrim`, so the mask is analysed once per forward rather than once per layer."""

    def __init__(self) -> None:
        self._trim = KeyPaddingTrim()

    def make_processor(self, original: Any, core: Any, layer: int, name: str) -> Any:
        """The family's padded-text processor, with this adapter's shared `KeyPaddingTrim`."""
        return self.processor_class(core, layer, name, original, self._trim)
