"""Model adapters: what dit-sparse needs to know about each supported Diffusers transformer.

An adapter names the self-attention modules that get sparse processors, builds the processor for each
one, and reads the token grid (frames x rows x cols) from the transformer's forward arguments. Where
text tokens sit, where RoPE is applied and the head layout are documented per adapter in `ModelFacts`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from dit_sparse.layout import VideoLayout

from .reorder import ReorderPoint


class UnsupportedModelError(ValueError):
    """The transformer is not one dit-sparse knows how to make sparse."""


@dataclass(frozen=True)
class ModelFacts:
    """Static facts about a model family (documentation the adapters also act on)."""

    family: str
    text: str  # "cross-attention" | "joint, text first" | "joint, text last"
    rope: str
    heads: str


class ModelAdapter:
    """Base class; subclasses set `family`, `transformer_classes`, `facts` and implement the methods."""

    family: ClassVar[str] = ""
    transformer_classes: ClassVar[tuple[str, ...]] = ()
    facts: ClassVar[ModelFacts]
    text_first: ClassVar[bool | None] = None  # None: no text in self-attention
    timestep_index: ClassVar[int] = 1  # position of `timestep` in the transformer's forward signature

    def self_attention_modules(self, model: torch.nn.Module) -> Iterator[tuple[str, torch.nn.Module]]:
        """(name, module) of every attention module whose processor becomes sparse, in layer order."""
        raise NotImplementedError

    def make_processor(self, original: Any, core: Any, layer: int, name: str) -> Any:
        """A sparse processor that replaces `original` (same maths when the core runs dense)."""
        raise NotImplementedError

    def timestep(self, args: tuple, kwargs: dict) -> Any:
        """The denoising timestep passed to the forward call (by keyword or position)."""
        return arg(args, kwargs, "timestep", self.timestep_index)

    def layout(self, model: torch.nn.Module, args: tuple, kwargs: dict) -> VideoLayout | None:
        """Token grid of the forward call about to run (text tokens are added per attention call)."""
        raise NotImplementedError

    def reorder_points(self, model: torch.nn.Module) -> tuple[ReorderPoint, ...]:
        """Where `model` can run its whole sequence in a method's token order (`pipelines.reorder`); empty
        (the default) when it cannot, and the plans then permute q, k and v in every attention call."""
        return ()


class SparseProcessorMixin:
    """What every sparse processor carries: the shared core, its layer, and the user's settings.

    Mixed into subclasses of Diffusers' own processors; `_bind` keeps the attention backend and the
    context-parallel config of the processor it replaces.
    """

    def _bind(self, core: Any, layer: int, name: str, original: Any = None) -> None:
        from dit_sparse.compiled import register_layer

        self.core = core
        self.layer = layer
        self.name = name
        self._layer_index = register_layer(core, layer, name)  # the layer as compiled code sees it
        if original is not None:
            for attr in ("_attention_backend", "_parallel_config"):
                if hasattr(original, attr):
                    setattr(self, attr, getattr(original, attr))

    def _dense_attention(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                         attention_mask: torch.Tensor | None) -> Callable[[], torch.Tensor]:
        """The exact attention call of Diffusers' dispatching processors, deferred."""
        from diffusers.models.attention_dispatch import dispatch_attention_fn

        return lambda: dispatch_attention_fn(
            query, key, value, attn_mask=attention_mask, dropout_p=0.0, is_causal=False,
            backend=self._attention_backend, parallel_config=self._parallel_config,
        )

    def _attend(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                attention_mask: torch.Tensor | None = None, text_first: bool | None = None) -> torch.Tensor:
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


_ADAPTERS: list[type[ModelAdapter]] = []


def register_adapter(cls: type[ModelAdapter]) -> type[ModelAdapter]:
    _ADAPTERS.append(cls)
    return cls


def _load_builtin_adapters() -> None:
    from . import wan  # noqa: F401

    for mod in ("hunyuan_video", "cogvideox", "ltx_video", "flux", "qwen_image", "flux2", "hunyuan_video15",
                "mochi", "cosmos", "skyreels_v2", "wan_animate", "chronoedit", "ltx2"):
        try:
            __import__(f"dit_sparse.pipelines.{mod}")
        except ModuleNotFoundError as exc:
            if exc.name != f"dit_sparse.pipelines.{mod}":
                raise


def supported_models() -> list[str]:
    """Transformer class names that dit-sparse supports."""
    _load_builtin_adapters()
    return [name for cls in _ADAPTERS for name in cls.transformer_classes]


def get_adapter(model: torch.nn.Module) -> ModelAdapter:
    """The adapter for `model`'s class, or UnsupportedModelError naming the supported ones."""
    _load_builtin_adapters()
    name = type(model).__name__
    for cls in _ADAPTERS:
        if name in cls.transformer_classes:
            return cls()
    raise UnsupportedModelError(
        f"dit-sparse does not support {name}; supported transformers: {', '.join(supported_models())}"
    )


def text_qkv(attn: Any, encoder_hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The text tokens' query, key and value of a joint-attention block ([B, T, H, D]): Diffusers' added
    projections (`add_q_proj`, ...), split into heads, with the added q/k norms where the block has them."""
    q = attn.add_q_proj(encoder_hidden_states).unflatten(2, (attn.heads, -1))
    k = attn.add_k_proj(encoder_hidden_states).unflatten(2, (attn.heads, -1))
    v = attn.add_v_proj(encoder_hidden_states).unflatten(2, (attn.heads, -1))
    if attn.norm_added_q is not None:
        q = attn.norm_added_q(q)
    if attn.norm_added_k is not None:
        k = attn.norm_added_k(k)
    return q, k, v


def arg(args: tuple, kwargs: dict, name: str, index: int) -> Any:
    """A forward argument given by keyword or position."""
    if name in kwargs:
        return kwargs[name]
    return args[index] if len(args) > index else None
