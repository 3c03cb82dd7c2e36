"""Model adapters: what dit-sparse needs to know about each supported Diffusers transformer.

An adapter names the self-attention modules that get sparse processors, builds the processor for each
one, and reads the token grid (frames x rows x cols) from the transformer's forward arguments. Where
text tokens sit, where RoPE is applied and the head layout are documented per adapter in `ModelFacts`.

Most families only declare what differs: `self_attention_paths` (which modules), `processor_class` or
`processor_twins` (which processor), and, for transformers fed the unpatched 5D latent,
`LatentVideoAdapter.patch_size` (the grid). The processors themselves build on `sparse_processor`.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Mapping
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
    """Base class; subclasses set `family`, `transformer_classes`, `facts`, say which modules and processors
    (`self_attention_paths`, `processor_class` / `processor_twins`, or the methods themselves) and implement
    `layout`."""

    family: ClassVar[str] = ""
    transformer_classes: ClassVar[tuple[str, ...]] = ()
    facts: ClassVar[ModelFacts]
    text_first: ClassVar[bool | None] = None  # None: no text in self-attention
    timestep_index: ClassVar[int] = 1  # position of `timestep` in the transformer's forward signature
    # (block list, attention attribute) of the modules made sparse, e.g. ("blocks", "attn1"): every block of
    # each list in turn, which fixes the layer indices.
    self_attention_paths: ClassVar[tuple[tuple[str, str], ...]] = ()
    # The sparse processor that replaces whatever processor a module has...
    processor_class: ClassVar[type | None] = None
    # ...or, for families where only Diffusers' own processors are replaced: {Diffusers class: sparse class}.
    # Exact classes: a subclass (or a user's processor) may change the maths, so it is kept, with a warning.
    processor_twins: ClassVar[Mapping[type, type]] = {}

    def self_attention_modules(self, model: torch.nn.Module) -> Iterator[tuple[str, torch.nn.Module]]:
        """(name, module) of every attention module whose processor becomes sparse, in layer order."""
        if not self.self_attention_paths:
            raise NotImplementedError
        for blocks, attention in self.self_attention_paths:
            for i, block in enumerate(getattr(model, blocks)):
                yield f"{blocks}.{i}.{attention}", getattr(block, attention)

    def make_processor(self, original: Any, core: Any, layer: int, name: str) -> Any:
        """A sparse processor that replaces `original` (same maths when the core runs dense)."""
        if self.processor_class is not None:
            return self.processor_class(core, layer, name, original)
        if not self.processor_twins:
            raise NotImplementedError
        twin = self.processor_twins.get(type(original))
        return twin(core, layer, name, original) if twin is not None else keep_processor(original, name)

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


# `self_attention_paths` of MMDiTs with double-stream blocks followed by single-stream blocks (Flux, Flux.2,
# HunyuanVideo): every double-stream block's attention first.
DOUBLE_AND_SINGLE_STREAM = (("transformer_blocks", "attn"), ("single_transformer_blocks", "attn"))


class LatentVideoAdapter(ModelAdapter):
    """An adapter for transformers whose `hidden_states` is the unpatched 5D video latent."""

    frames_dim: ClassVar[int] = 2  # [B, C, F, H, W]; CogVideoX passes [B, F, C, H, W]

    def patch_size(self, model: torch.nn.Module) -> tuple[int, int, int]:
        """(frames, rows, cols) of one patch; by default the config's `patch_size` triple."""
        return model.config.patch_size

    def layout(self, model: torch.nn.Module, args: tuple, kwargs: dict) -> VideoLayout | None:
        """Grid of the 5D latent divided by the patch size; tokens are frame-major."""
        x = arg(args, kwargs, "hidden_states", 0)
        if x is None or x.dim() != 5:
            return None
        pt, ph, pw = self.patch_size(model)
        f, h, w = x.shape[self.frames_dim], x.shape[3], x.shape[4]
        return VideoLayout(f // pt, h // ph, w // pw)


def keep_processor(original: Any, name: str) -> Any:
    """`original` itself, with a warning: a processor dit-sparse does not replace, so the layer stays dense."""
    # stacklevel 4: past this function, the adapter's make_processor and dit_sparse.apply, to the caller.
    warnings.warn(
        f"dit-sparse: {name} uses {type(original).__name__}, which dit-sparse does not replace; "
        "that layer stays dense",
        stacklevel=4,
    )
    return original


_ADAPTERS: list[type[ModelAdapter]] = []


def register_adapter(cls: type[ModelAdapter]) -> type[ModelAdapter]:
    """Class decorator: make `cls` one of the adapters `get_adapter` chooses from."""
    _ADAPTERS.append(cls)
    return cls


def registered_adapters() -> list[type[ModelAdapter]]:
    """Every registered adapter class, in registration order (the built-ins once
    `dit_sparse.pipelines.families` is imported)."""
    return list(_ADAPTERS)


def arg(args: tuple, kwargs: dict, name: str, index: int) -> Any:
    """A forward argument given by keyword or position."""
    if name in kwargs:
        return kwargs[name]
    return args[index] if len(args) > index else None
