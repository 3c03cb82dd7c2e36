"""CUDA graphs over planning: a method's static-shaped planning function launched as one graph replay.

Planning (k-means, block scores, budgeted selection, plan construction) is a hundred or more small GPU
operations. Launched one by one from Python they cost more host time than the GPU needs to run them
(measured on an H200 at Wan-1.3B's shape: semantic 4.9 ms to enqueue about 200 operations that run in
3.7 ms; pooled 4.8 ms for 1.8 ms). Plans are static data (Python-int lengths, index tensors of fixed
width) and planning is free of host synchronisation, so the same operations can be recorded once per
input signature and replayed: one launch per call.

`PlanGraphs.run(key, fn, inputs)`:

* the first call of a signature runs `fn` eagerly (it may compile kernels or fill host-side caches),
  then records it into a CUDA graph on copies of the inputs ("static inputs");
* later calls copy the inputs into the static inputs, replay, and return *clones* of the outputs: one
  graph serves every layer with that signature, so its output memory is overwritten by the next layer's
  replay, while a plan may be kept for several steps (`replan_every`).

`fn` must be a pure function of its tensor inputs: everything else it reads (options, Python-int shapes,
the text range) belongs in `key`. Its result may be a tensor, None, a `BlockPlan` or a tuple of these;
a plan's pair counts (read by the statistics) are computed inside the graph and travel with it.
Graphs are used only for CUDA inputs, outside another capture, and unless DIT_SPARSE_CUDA_GRAPHS=0; a
capture that fails (an operation that synchronises, say) is reported once and that signature runs
eagerly from then on. All graphs of one `PlanGraphs` share a memory pool: outputs are cloned right after
each replay, before any other graph runs, so no replay can overwrite memory still in use.
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from collections.abc import Callable, Hashable
from typing import Any

import torch

from .plan import TENSOR_FIELDS, BlockPlan

Tensor = torch.Tensor



def enabled() -> bool:
    """False when DIT_SPARSE_CUDA_GRAPHS=0 (every planning function then runs eagerly)."""
    return os.environ.get("DIT_SPARSE_CUDA_GRAPHS", "1") != "0"


@dataclasses.dataclass
class _Entry:
    graph: Any  # torch.cuda.CUDAGraph, or None when capture failed (then run eagerly)
    inputs: list[Tensor]
    outputs: list[Tensor]
    spec: Any


class PlanGraphs:
    """CUDA graphs of planning functions, one per key; see the module docstring."""

    def __init__(self) -> None:
        self._entries: dict[Hashable, _Entry] = {}
        self._pools: dict[torch.device, Any] = {}  # one memory pool per GPU
        self.replays = 0  # for tests and benchmarks: calls served by a graph replay

    def run(self, key: Hashable, fn: Callable[..., Any], inputs: tuple[Tensor, ...]) -> Any:
        """fn(*inputs), replayed from a CUDA graph recorded for `key` and the inputs' shapes and strides."""
        if not _graphable(inputs):
            return fn(*inputs)
        full_key = (key, tuple((t.shape, t.stride(), t.dtype, t.device) for t in inputs))
        entry = self._entries.get(full_key)
        if entry is None:
            out = fn(*inputs)  # the first call runs eagerly: kernels compile, host-side caches fill
            self._entries[full_key] = self._capture(key, fn, inputs)
            return out
        if entry.graph is None:
            return fn(*inputs)
        with torch.cuda.device(inputs[0].device):  # a graph replays on its own GPU's current stream
            for static, x in zip(entry.inputs, inputs):
                static.copy_(x)
            entry.graph.replay()
        self.replays += 1
        return _build(entry.spec, [t.clone() for t in entry.outputs])

    def _capture(self, key: Hashable, fn: Callable[..., Any], inputs: tuple[Tensor, ...]) -> _Entry:
        with torch.cuda.device(inputs[0].device):  # record on the inputs' GPU, whichever is current
            return self._capture_here(key, fn, inputs)

    def _capture_here(self, key: Hashable, fn: Callable[..., Any], inputs: tuple[Tensor, ...]) -> _Entry:
        static = [_like(t).copy_(t) for t in inputs]
        try:
            # Run once on a side stream first (as torch.cuda.graphs recommends: lazy initialisation
            # such as cuBLAS workspaces must not happen inside the capture).
            # The warm-up and the capture share one side stream (per-stream library workspaces exist
            # before recording starts).
            device = inputs[0].device
            side = torch.cuda.Stream(device)
            side.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(side):
                fn(*static)
            if device not in self._pools:
                self._pools[device] = torch.cuda.graph_pool_handle()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self._pools[device], stream=side):
                out = _with_pair_counts(fn(*static))
            torch.cuda.current_stream(device).wait_stream(side)
            tensors: list[Tensor] = []
            spec = _flatten(out, tensors)
        except Exception as exc:  # a capture-unsafe operation: run this signature eagerly from now on
            warnings.warn(f"dit-sparse: planning {key!r} runs without a CUDA graph ({type(exc).__name__}: {exc})",
                          stacklevel=3)
            return _Entry(None, [], [], None)
        return _Entry(graph, static, tensors, spec)


def _with_pair_counts(out: Any) -> Any:
    """out, with the pair counts of every plan in it computed (the statistics read them for every plan:
    inside the graph they cost no launches of their own)."""
    for x in out if isinstance(out, tuple) else (out,):
        if isinstance(x, BlockPlan):
            x.pair_counts()
    return out


def _like(t: Tensor) -> Tensor:
    """An empty tensor with t's strides (the graph reads the layout it was recorded with); contiguous when
    t is an expanded view, whose repeated elements could not be written."""
    if any(st == 0 and n > 1 for st, n in zip(t.stride(), t.shape)):
        return torch.empty(t.shape, dtype=t.dtype, device=t.device)
    return torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=t.device)


def _graphable(inputs: tuple[Tensor, ...]) -> bool:
    if not inputs or not enabled() or not all(isinstance(t, Tensor) and t.is_cuda for t in inputs):
        return False
    return not torch.cuda.is_current_stream_capturing()  # inside a user's graph: record into theirs


def _flatten(obj: Any, tensors: list[Tensor]) -> Any:
    """A spec of obj with every tensor replaced by its index in `tensors` (appended)."""
    if isinstance(obj, Tensor):
        tensors.append(obj)
        return ("t", len(tensors) - 1)
    if obj is None:
        return ("none",)
    if isinstance(obj, BlockPlan):
        fields = {name: _flatten(getattr(obj, name), tensors) for name in TENSOR_FIELDS}
        derived = {key: _flatten(val, tensors) for key, val in obj.derived.items() if isinstance(val, Tensor)}
        return ("plan", fields, obj.block_size, obj.seq_lens, derived)
    if isinstance(obj, tuple):
        return ("tuple", [_flatten(x, tensors) for x in obj])
    raise TypeError(f"a graphed planning function may return tensors, None, BlockPlans or tuples, got {type(obj)}")


def _build(spec: Any, tensors: list[Tensor]) -> Any:
    kind = spec[0]
    if kind == "t":
        return tensors[spec[1]]
    if kind == "none":
        return None
    if kind == "plan":
        fields = {name: _build(s, tensors) for name, s in spec[1].items()}
        plan = BlockPlan(**fields, block_size=spec[2], seq_lens=spec[3])
        plan.derived.update({key: _build(s, tensors) for key, s in spec[4].items()})
        return plan
    return tuple(_build(s, tensors) for s in spec[1])
