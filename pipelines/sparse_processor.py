"""What the sparse processors share: the core call and the pieces of Diffusers' processor code they repeat.

Every family's sparse processor subclasses Diffusers' own processor with `SparseProcessorMixin` in front,
and follows Diffusers' maths step by step (same ops, same order) so that a dense core gives bitwise equal
outputs. The helpers below are those steps where several families share them: the head split of the
q/k/v projections, the per-head mask, the output projection.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

import torch

from dit_sparse.compiled import register_layer

Tensor = torch.Tensor
QKV = tuple[Tensor, Tensor, Tensor]
RotaryEmb = tuple[Tensor, Tensor]  # (cos, sin) or (real, imaginary) rotary tables, as the model passes them


class SparseProcessorMixin:
    """What every sparse processor carries: the shared core, its layer, and the user's settings.

    Mixed into subclasses of Diffusers' own processors; it keeps the attention backend and the
    context-parallel config of the processor it replaces.
    """

    # False for processors that do not go through Diffusers' dispatcher with the model's settings (they call
    # F.scaled_dot_product_attention, or always the default backend): nothing of the original to keep.
    keeps_dispatch_settings: ClassVar[bool] = True

    def __init__(self, core: Any, layer: int, name: str, original: Any = None) -> None:
        super().__init__()
        self.core = core
        self.layer = layer
        self.name = name
        self._layer_index = register_layer(core, layer, name)  # the layer as compiled code sees it
        if original is not None and self.keeps_dispatch_settings:
            for attr in ("_attention_backend", "_parallel_config"):
                if hasattr(original, attr):
                    setattr(self, attr, getattr(original, attr))

    def _dense_attention(self, query: Tensor, key: Tensor, value: Tensor,
                         attention_mask: Tensor | None) -> Callable[[], Tensor]:
        """The exact attention call of Diffusers' dispatching processors, deferred."""
        from diffusers.models.attention_dispatch import dispatch_attention_fn

        return lambda: dispatch_attention_fn(
            query, key, value, attn_mask=attention_mask, dropout_p=0.0, is_causal=False,
            backend=self._attention_backend, parallel_config=self._parallel_config,
        )

    def _attend(self, query: Tensor, key: Tensor, value: Tensor,
                attention_mask: Tensor | None = None, text_first: bool | None = None) -> Tensor:
        """[B, S, H, D] attention through the sparse core, dense falling back to the model's own call.

        Under torch.compile the core runs behind one custom op (`dit_sparse.compiled`), except at
        sparsity 0 (the model's own call, compiled as Diffusers would) and under context parallelism
        (not supported by the op: the call graph-breaks into the core).
        """
        if torch.compiler.is_compiling() and self._parallel_config is None:
            if self.core.config.is_dense:
                return self._dense_attention(query, key, value, attention_mask)()
            backend = getattr(self._attention_backend, "value", self._attention_backend) or ""
            return torch.ops.dit_sparse.attend(query, key, value, self._layer_index, id(self.core), attention_mask,
                                               -1 if text_first is None else int(text_first), backend)
        return self.core.attend(
            query, key, value, layer=self.layer, layer_name=self.name,
            dense_fn=self._dense_attention(query, key, value, attention_mask), text_first=text_first,
            attention_mask=attention_mask, parallel_config=self._parallel_config,
        )


def _qkv_heads(attn: Any, states: Tensor, projections: tuple[Callable, ...], norms: tuple[Any, Any]) -> QKV:
    query, key, value = (project(states).unflatten(2, (attn.heads, -1)) for project in projections)
    norm_q, norm_k = norms
    if norm_q is not None:
        query = norm_q(query)
    if norm_k is not None:
        key = norm_k(key)
    return query, key, value


def video_qkv(attn: Any, hidden_states: Tensor) -> QKV:
    """The query, key and value ([B, S, H, D]) of a block's own tokens: Diffusers' `to_q`, `to_k`, `to_v`,
    split into heads, with the q/k norms where the block has them (no RoPE yet)."""
    return _qkv_heads(attn, hidden_states, (attn.to_q, attn.to_k, attn.to_v), (attn.norm_q, attn.norm_k))


def text_qkv(attn: Any, encoder_hidden_states: Tensor) -> QKV:
    """The text tokens' query, key and value of a joint-attention block ([B, T, H, D]): Diffusers' added
    projections (`add_q_proj`, ...), split into heads, with the added q/k norms where the block has them."""
    projections = (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj)
    return _qkv_heads(attn, encoder_hidden_states, projections, (attn.norm_added_q, attn.norm_added_k))


def with_text_last(attn: Any, video: QKV, encoder_hidden_states: Tensor) -> QKV:
    """[video, text] query, key and value: the block's text tokens (`text_qkv`) after the video's."""
    query, key, value = (torch.cat([v, t], dim=1) for v, t in zip(video, text_qkv(attn, encoder_hidden_states)))
    return query, key, value


def split_heads(attn: Any, *tensors: Tensor) -> tuple[Tensor, ...]:
    """[B, S, H * D] projections as [B, S, H, D], H being the block's head count."""
    return tuple(t.unflatten(2, (attn.heads, -1)) for t in tensors)


def head_mask(attn: Any, attention_mask: Tensor, hidden_states: Tensor) -> Tensor:
    """A user attention mask the way Diffusers' processors prepare it: `prepare_attention_mask` for the
    sequence of `hidden_states` [B, S, C], viewed per head [B, H, -1, keys]."""
    batch_size, sequence_length, _ = hidden_states.shape
    mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
    return mask.view(batch_size, attn.heads, -1, mask.shape[-1])


def project_out(attn: Any, out: Tensor) -> Tensor:
    """The block's output projection `to_out` (linear, then dropout) of the attention output [B, S, C]."""
    out = attn.to_out[0](out)
    return attn.to_out[1](out)
