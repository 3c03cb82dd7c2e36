"""Sparse attention inside Diffusers' context parallelism (Ulysses), plus the launch helpers around it.

Under `model.enable_parallelism(config=ContextParallelConfig(ulysses_degree=N))` Diffusers cuts the
token sequence into N shards, so each rank's attention processor holds q, k, v of shape [B, S/N, H, D].
Its own Ulysses attention exchanges them (all-to-all) to [B, S, H/N, D], runs the backend and exchanges
back. The sparse path does the same exchange with `UlyssesGroup`: each rank then sees every token of its
H/N heads, so the methods' per-head plans and the block-sparse kernels run unchanged, and method state
(caches) naturally holds only the rank's heads. Rank r gets heads [r*H/N, (r+1)*H/N) and shard r of the
sequence, exactly Diffusers' assignment, so dense and sparse calls agree on who holds what.

Joint-attention models (Flux; HunyuanVideo with a user cp_plan) shard text and video separately, so each
rank's local sequence is [its text shard, its video shard] (or video first). After the exchange the
sequence is those N chunks one after another, not the model's [text, video] order. `gathered_order`
gives the permutation to the canonical order that the methods' `VideoLayout` describes.

Ring attention (ring_degree > 1) would need the partial LSEs merged across ranks: the core runs those
calls dense (Diffusers' own ring attention) with one warning.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from .config import ConfigError
from .layout import VideoLayout

Tensor = torch.Tensor

# Hook names Diffusers and dit-sparse register on the transformer (see `root_split_factor`).
_CP_ROOT_INPUT_HOOK = "cp_input---"  # diffusers.hooks.context_parallel template "cp_input---{}" for module ""
_TRACKER_HOOK = "dit_sparse_step_tracker"


@dataclass(frozen=True)
class UlyssesGroup:
    """The Ulysses process group of one context-parallel config and this rank's place in it."""

    group: Any
    size: int
    rank: int

    def to_heads(self, query: Tensor, key: Tensor, value: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """[B, S/N, H, D] sequence shards -> [B, S, H/N, D] head shards (contiguous), one all-to-all."""
        n = self.size
        B, s, H, D = query.shape
        # [B, s, H, D] -> [N (destination = head group), B, s, H/N, D]; unflatten is always a view.
        parts = [t.unflatten(2, (n, H // n)).permute(2, 0, 1, 3, 4) for t in (query, key, value)]
        if key.shape == query.shape and value.shape == query.shape and len({t.dtype for t in parts}) == 1:
            recv = _all_to_all(torch.stack(parts, dim=1), self.group)  # [N (source = seq shard), 3, B, s, h, D]
            chunks = recv.unbind(1)
        else:
            chunks = [_all_to_all(p.contiguous(), self.group) for p in parts]
        # Source rank j sent sequence shard j: put the shards back in order along the sequence.
        return tuple(c.permute(1, 0, 2, 3, 4).reshape(B, n * s, c.shape[3], c.shape[4]) for c in chunks)

    def to_sequence(self, out: Tensor) -> Tensor:
        """[B, S, H/N, D] head shard (any strides) -> [B, S/N, H, D] sequence shard, one all-to-all."""
        n = self.size
        B, S, h, D = out.shape
        send = out.unflatten(1, (n, S // n)).permute(1, 0, 2, 3, 4).contiguous()  # [N (dest), B, s, h, D]
        recv = _all_to_all(send, self.group)  # [N (source = head group), B, s, h, D]
        return recv.permute(1, 2, 0, 3, 4).reshape(B, S // n, n * h, D)

    def all_true(self, ok: bool, device: torch.device) -> bool:
        """True when `ok` holds on every rank (one tiny all-reduce: keeps data-dependent choices in step)."""
        flag = torch.tensor([int(ok)], device=device, dtype=torch.int32)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=self.group)
        return bool(flag.item())


def _all_to_all(x: Tensor, group: Any) -> Tensor:
    """Split the contiguous `x` along dim 0 into one piece per rank, send piece j to rank j."""
    out = torch.empty_like(x)
    dist.all_to_all_single(out, x, group=group)
    return out


def context_parallel_of(parallel_config: Any) -> Any:
    """The `ContextParallelConfig` inside a Diffusers `ParallelConfig` (or the config itself), or None."""
    if parallel_config is None:
        return None
    return getattr(parallel_config, "context_parallel_config", parallel_config if hasattr(
        parallel_config, "ulysses_degree") else None)


def ulysses_group(parallel_config: Any, heads: int) -> tuple[UlyssesGroup | None, str | None]:
    """(group, None) when the sparse path can run under this config, (None, None) without context
    parallelism, (None, reason) when the call must stay dense (Diffusers parallelises it itself)."""
    cp = context_parallel_of(parallel_config)
    if cp is None:
        return None, None
    ring, ulysses = int(cp.ring_degree or 1), int(cp.ulysses_degree or 1)
    if ring > 1:
        return None, ("ring context parallelism (ring_degree > 1) needs partial results merged across "
                      "ranks; use ContextParallelConfig(ulysses_degree=N) for sparse attention")
    if ulysses <= 1:
        return None, None
    if getattr(cp, "ulysses_anything", False):
        return None, "ulysses_anything (uneven shards) is not supported by the sparse path"
    if heads % ulysses:
        return None, f"{heads} heads do not split over ulysses_degree={ulysses}"
    mesh = getattr(cp, "_ulysses_mesh", None)
    if mesh is None:
        return None, "the context-parallel config has no Ulysses mesh (enable_parallelism not finished?)"
    group = mesh.get_group()
    return UlyssesGroup(group, ulysses, dist.get_rank(group)), None


def gathered_order(layout: VideoLayout | None, n: int, device: torch.device,
                   cache: dict[tuple, tuple[Tensor, Tensor]] | None = None) -> tuple[Tensor, Tensor] | None:
    """(to_canonical, to_gathered) token indices for a joint sequence gathered from N shards, or None.

    Each rank held [first_r, second_r] with (first, second) = (text, video) when text comes first, so
    the gathered sequence is N such chunks; `x[..., to_canonical, :]` is [all first, all second] (the
    order `layout` describes) and `y[..., to_gathered, :]` undoes it. None when no reordering is needed
    (no text: video shards are contiguous pieces of one sequence). `cache` (owned by the caller, e.g. the
    attention core) keeps the index tensors per shape.
    """
    if layout is None or layout.text_tokens == 0 or n == 1:
        return None
    key = (layout.text_tokens, layout.video_tokens, layout.text_first, n, device)
    cache = {} if cache is None else cache
    if key not in cache:
        first, second = ((layout.text_tokens, layout.video_tokens) if layout.text_first
                         else (layout.video_tokens, layout.text_tokens))
        f, g = first // n, second // n
        starts = torch.arange(n, device=device)[:, None] * (f + g)
        fwd = torch.cat([(starts + torch.arange(f, device=device)).flatten(),
                         (starts + f + torch.arange(g, device=device)).flatten()])
        cache[key] = (fwd, torch.argsort(fwd))
    return cache[key]


def sharded_layout(layout: VideoLayout | None, n: int) -> bool:
    """Whether a gathered joint sequence of `layout` can be the N equal [text, video] chunks above."""
    return layout is None or (layout.text_tokens % n == 0 and layout.video_tokens % n == 0)


def root_split_factor(model: torch.nn.Module) -> int:
    """How many shards the transformer's own forward inputs were cut into before the step tracker saw them.

    Diffusers' cp_plan may split inputs of the transformer itself (module "": Flux, LTX-Video). Hooks
    registered later run first, so when `enable_parallelism` came after `dit_sparse.apply` the split
    hook runs before the tracker and the tracker sees shards; the adapters scale the grid back up.
    """
    config = getattr(model, "_parallel_config", None)
    cp = context_parallel_of(config)
    if cp is None:
        return 1
    order = getattr(getattr(model, "_diffusers_hook", None), "_hook_order", None) or []
    if _CP_ROOT_INPUT_HOOK in order and _TRACKER_HOOK in order:
        if order.index(_CP_ROOT_INPUT_HOOK) > order.index(_TRACKER_HOOK):
            return int(cp.ring_degree or 1) * int(cp.ulysses_degree or 1)
    return 1


# ---------------------------------------------------------------------- launching
def init_distributed(device: torch.device) -> tuple[int, int, torch.device]:
    """Initialise the default process group from torchrun's environment: (rank, world size, device).

    NCCL on CUDA (each rank on cuda:LOCAL_RANK), gloo on CPU. Raises ConfigError with the launch line
    when the process was not started by torchrun.
    """
    if "WORLD_SIZE" not in os.environ or "RANK" not in os.environ:
        raise ConfigError("context parallelism needs one process per GPU: launch with "
                           "`torchrun --nproc-per-node N -m dit_sparse.pipelines.cli ...` (see docs/context-parallel.md)")
    local_rank = int(os.environ.get("LOCAL_RANK", os.environ["RANK"]))
    if device.type == "cuda":
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), dist.get_world_size(), device


@contextlib.contextmanager
def _cpu_device_count() -> Any:
    # Diffusers 0.42 places rank r on device `r % torch.accelerator.device_count()`, which divides by
    # zero on a CPU-only machine; count the CPU as one device while the mesh is built.
    acc = getattr(torch, "accelerator", None)
    if acc is None or torch._C._get_accelerator().type != "cpu" or acc.device_count() > 0:
        yield
        return
    original = acc.device_count
    acc.device_count = lambda *a, **k: 1
    try:
        yield
    finally:
        acc.device_count = original


def enable_ulysses(model: torch.nn.Module, degree: int) -> None:
    """`model.enable_parallelism(config=ContextParallelConfig(ulysses_degree=degree))`, also on CPU/gloo."""
    from diffusers import ContextParallelConfig

    with _cpu_device_count():
        model.enable_parallelism(config=ContextParallelConfig(ulysses_degree=degree))
