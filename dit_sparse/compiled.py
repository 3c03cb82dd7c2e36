"""The sparse attention call as one `torch.library` custom op, so that `torch.compile` can compile models
that dit-sparse has been applied to.

Everything a sparse call decides at run time (dense warm-up or sparse by the denoising step, planning with
its per-layer caches and CUDA graphs, the backend, the statistics) stays eager behind one op,
`dit_sparse::attend`: Dynamo sees a leaf with a fake implementation (an empty output of the query's shape)
and compiles the processor's own projections, norms and RoPE around it, without graph breaks, so
`transformer.compile_repeated_blocks(fullgraph=True)` works. Nothing per layer is a Python constant of
the traced code (the layer index travels as a CPU tensor), so one compiled block serves every layer.

Outside compilation the processors call the core directly, exactly as before.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch

Tensor = torch.Tensor

_CORES: weakref.WeakValueDictionary[int, Any] = weakref.WeakValueDictionary()
_NAMES: dict[int, dict[int, str]] = {}


def register_layer(core: Any, layer: int, name: str) -> Tensor:
    """Make `core`'s layer `layer` (named `name`) reachable from the op; returns the CPU tensor that
    stands for the layer index in compiled code."""
    if _CORES.get(id(core)) is not core:
        _CORES[id(core)] = core
        _NAMES[id(core)] = {}
        weakref.finalize(core, _NAMES.pop, id(core), None)
    _NAMES[id(core)][layer] = name
    return torch.tensor(layer, dtype=torch.int64)


@torch.library.custom_op("dit_sparse::attend", mutates_args=())
def attend(query: Tensor, key: Tensor, value: Tensor, layer: Tensor, core: int, attention_mask: Tensor | None,
           text_first: int, attention_backend: str) -> Tensor:
    """[B, S, H, D] self-attention of one layer through the sparse core `core` (an id from
    `register_layer`), dense calls running Diffusers' `dispatch_attention_fn` with `attention_backend`
    ("" = the default). `text_first`: -1 unknown, 0 text after the video, 1 text first."""
    from diffusers.models.attention_dispatch import dispatch_attention_fn

    sparse_core = _CORES.get(core)
    if sparse_core is None:
        raise RuntimeError("dit-sparse: this compiled model refers to a sparse core that was removed; "
                           "compile the model again after dit_sparse.apply / remove")
    index = int(layer)  # a CPU tensor: no device synchronisation

    def dense() -> Tensor:
        return dispatch_attention_fn(query, key, value, attn_mask=attention_mask, dropout_p=0.0, is_causal=False,
                                     backend=attention_backend or None)

    out = sparse_core.attend(query, key, value, layer=index, layer_name=_NAMES[core][index], dense_fn=dense,
                             text_first=None if text_first < 0 else bool(text_first), attention_mask=attention_mask)
    return out.contiguous()  # one layout for every path (the fake below promises it)


@attend.register_fake
def _(query: Tensor, key: Tensor, value: Tensor, layer: Tensor, core: int, attention_mask: Tensor | None,
      text_first: int, attention_backend: str) -> Tensor:
    return query.new_empty(query.shape)
