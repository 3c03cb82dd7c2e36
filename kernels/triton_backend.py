"""The "triton" backend: block-sparse attention forward on CUDA GPUs (and on CPU under TRITON_INTERPRET=1).

Handles fixed-size blocks and variable-length ranges, bf16/fp16 (float32 only in the interpreter), head dim
64 and 128, any sequence lengths, batch > 1 and strided [B, H, S, D] views. Plan permutations are applied
inside the kernel by default (rows gathered on load, output scattered on store); `gather="copy"` permutes
Q/K/V physically first instead (kept for measurement, see docs/kernels-notes.md).

Launch metadata derived from a plan is cached in the plan (`plan.derived`; plans are treated as immutable),
so a plan reused across layers or steps pays its preparation once. On GPUs that preparation (dozens of
small tensor operations) replays as one CUDA graph per plan signature: a method that re-plans every call
would otherwise spend more host time launching them than the attention takes (semantic's exact clusters on
the bundled model, one call on an H200: 3.0 ms before, 1.1 ms after; cuDNN dense 0.15 ms). Block sizes /
warps / stages come from a table chosen offline per (GPU architecture, head dim, plan kind), never from
timing during a generation (`DIT_SPARSE_TRITON_CONFIG=BM,BN,WARPS,STAGES` pins one). K/V are read with
TMA descriptors when the key order is the identity (`DIT_SPARSE_TRITON_TMA=0` turns that off);
`DIT_SPARSE_TRITON_WS=1` adds Triton warp-specialised configs to the autotune list (no gain measured on H100).

Plan contract relied upon: the valid entries of each `kv_indices` row are distinct (as
`BlockPlan.from_range_mask` builds them); a repeated block would be computed twice.
"""

from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass

import torch

from dit_sparse.graphs import PlanGraphs
from dit_sparse.plan import TENSOR_FIELDS, BlockPlan

from .backend_call import (
    HALF_DTYPES,
    checks_setting_first,
    raise_if_unsupported,
    softmax_scale,
    to_plan_order,
)
from .dispatch import Backend, register_backend
from .result import AttentionResult
from .triton_kernel import LOG2E, block_sparse_fwd
from .triton_prep import KeyChunks, QueryTiles, key_chunks, query_tiles
from .triton_util import INTERPRET

try:
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # pragma: no cover - older triton
    TensorDescriptor = None

Tensor = torch.Tensor

_HEAD_DIMS = (64, 128)


@dataclass(frozen=True)
class KernelConfig:
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int
    warp_specialize: bool = False


# Warp-specialised variants (Triton's automatic producer/consumer split), tried only where enabled.
_WS_CANDIDATES = (
    [KernelConfig(128, 128, 8, 2, True), KernelConfig(128, 128, 4, 3, True)]
    if os.environ.get("DIT_SPARSE_TRITON_WS", "0") == "1"
    else []
)
# First entry is the default; the rest are timed once per shape when autotuning is on.
_CANDIDATES: dict[int, list[KernelConfig]] = {
    # H100 sweep (docs/kernels-notes.md): 128x128 with 8 warps wins; 2 stages for contiguous/TMA keys,
    # 3 stages for gathered (permuted) keys, whose loads need more latency hiding. 128x64 tiles lose.
    128: [
        KernelConfig(128, 128, 8, 2),
        KernelConfig(128, 128, 8, 3),
        *_WS_CANDIDATES,
    ],
    64: [
        KernelConfig(128, 128, 8, 3),
        KernelConfig(128, 64, 4, 3),
        KernelConfig(128, 128, 4, 3),
    ],
}
LAST_CONFIG: KernelConfig | None = None  # the config of the latest call (reported by the benchmark)

# "kernel": gather rows through the permutation inside the kernel; "copy": permute Q/K/V first.
DEFAULT_GATHER = "kernel"
# Load K/V with TMA tensor descriptors when the key order is the identity (Hopper+).
USE_TMA = os.environ.get("DIT_SPARSE_TRITON_TMA", "1") == "1"


def supports_setting(device: torch.device, dtype: torch.dtype | None) -> str | None:
    """None if the Triton kernel can run on `device` in `dtype` (None: not known yet), else the reason."""
    if device.type != "cuda" and not INTERPRET:
        return "inputs are not on a CUDA device (set TRITON_INTERPRET=1 to run the kernel on CPU)"
    if device.type == "cuda" and dtype is not None and dtype not in HALF_DTYPES:
        return f"dtype {dtype} is not supported (use bfloat16 or float16)"
    return None


@checks_setting_first(supports_setting)
def supports(q: Tensor, plan: BlockPlan) -> str | None:
    """None if the Triton kernel can run these inputs, else the reason it cannot."""
    if q.shape[-1] not in _HEAD_DIMS:
        return f"head dim {q.shape[-1]} is not supported (64 or 128)"
    if plan.num_q_blocks == 0 or plan.num_k_blocks == 0:
        return "the plan has no query or key ranges"
    if not _fits_int32(q):
        return "one (batch, head) slice is too large for the kernel's int32 offsets"
    return None


def _fits_int32(x: Tensor) -> bool:
    # In-head offsets are computed in int32 (cheaper in the inner loop); batch/head offsets in int64.
    return (x.shape[2] - 1) * abs(x.stride(2)) + (x.shape[3] - 1) * abs(x.stride(3)) < 2**31


# ---------------------------------------------------------------------------------------- plan metadata
_PREP_GRAPHS = PlanGraphs()  # launch metadata of new plans, one graph replay each on GPUs


def prepare(plan: BlockPlan, sq: int, sk: int, cfg: KernelConfig, stats: bool) -> tuple[KeyChunks, QueryTiles, dict]:
    """Chunk lists, query tiles and int32 permutations for `plan` under `cfg` (cached in `plan.derived`)."""
    # Fixed-block chunks do not depend on `stats` (a chunk never straddles two blocks).
    fixed = plan.block_size is not None and plan.block_size[1] == cfg.block_n
    stats = stats and not fixed
    return plan.cached(("triton.prep", cfg.block_m, cfg.block_n, stats), lambda: _prepare_new(plan, sq, sk, cfg, stats))


def _prepare_new(plan: BlockPlan, sq: int, sk: int, cfg: KernelConfig, stats: bool
                 ) -> tuple[KeyChunks, QueryTiles, dict]:
    """`_prepare_tensors` for a plan seen for the first time, through the CUDA graph of its signature."""
    names = tuple(n for n in TENSOR_FIELDS if getattr(plan, n) is not None)
    static = dict(names=names, block_size=plan.block_size, seq_lens=plan.seq_lens, sq=sq, sk=sk,
                  block_m=cfg.block_m, block_n=cfg.block_n, stats=stats)
    flat = _PREP_GRAPHS.run(("triton.prep", *static.values()), functools.partial(_prepare_tensors, **static),
                            tuple(getattr(plan, n) for n in names))
    starts, ends, slots, counts, tiles, q_offsets, q_perm, k_perm = flat
    chunks = KeyChunks(starts=starts, ends=ends, slots=slots, counts=counts)
    return chunks, QueryTiles(tiles=tiles, q_offsets=q_offsets), {"q": q_perm, "k": k_perm}


def _prepare_tensors(*tensors: Tensor, names: tuple[str, ...], block_size: tuple[int, int] | None,
                     seq_lens: tuple[int, int], sq: int, sk: int, block_m: int, block_n: int, stats: bool
                     ) -> tuple[Tensor | None, ...]:
    """The launch metadata as a flat tuple: a pure function of the plan's tensors (graphed)."""
    plan = BlockPlan(**dict(zip(names, tensors)), block_size=block_size, seq_lens=seq_lens)
    chunks = key_chunks(plan, sk, block_n, stats)
    tiles = query_tiles(plan, sq, block_m, chunks)
    B, H = plan.batch, plan.heads
    q_perm, k_perm = (None if p is None else p.reshape(B * H, -1).to(torch.int32).contiguous()
                      for p in (plan.q_perm, plan.k_perm))
    return chunks.starts, chunks.ends, chunks.slots, chunks.counts, tiles.tiles, tiles.q_offsets, q_perm, k_perm


# ---------------------------------------------------------------------------------------- launch
def _launch(
    q: Tensor, k: Tensor, v: Tensor, plan: BlockPlan, scale: float, cfg: KernelConfig,
    return_lse: bool, return_tile_stats: bool, gather: str, use_tma: bool = False,
) -> AttentionResult:
    B, H, Sq, D = q.shape
    Sk = k.shape[2]
    chunks, tiles, perms = prepare(plan, Sq, Sk, cfg, return_tile_stats)
    qperm, kperm = perms["q"], perms["k"]
    perm_o = qperm is not None
    out = torch.empty_like(q)  # keeps the caller's layout (e.g. a [B, S, H, D] buffer seen as [B, H, S, D])
    if gather == "copy":
        # Physically permute first; the output is still scattered by the kernel's store.
        q = to_plan_order(q, plan.q_perm)
        k, v = to_plan_order(k, plan.k_perm), to_plan_order(v, plan.k_perm)
        perm_q, perm_k = False, False
    else:
        perm_q, perm_k = qperm is not None, kperm is not None
    dev = q.device
    dummy_i = torch.zeros(1, dtype=torch.int32, device=dev)
    lse = torch.empty(B, H, Sq, dtype=torch.float32, device=dev) if return_lse else torch.empty(1, device=dev)
    maxk = plan.kv_indices.shape[-1]
    NQ = plan.num_q_blocks
    if return_tile_stats:  # full runs and tail chunks of each slot, combined below
        tm, tm2 = (torch.full((B, H, NQ, maxk), -math.inf, dtype=torch.float32, device=dev) for _ in range(2))
    else:
        tm = tm2 = torch.empty(1, dtype=torch.float32, device=dev)
    grid = (tiles.num, B * H)
    tma = use_tma and not perm_k and _tma_ok(k) and _tma_ok(v)
    if tma:
        k_arg = TensorDescriptor(k, list(k.shape), list(k.stride()), [1, 1, cfg.block_n, D])
        v_arg = TensorDescriptor(v, list(v.shape), list(v.stride()), [1, 1, cfg.block_n, D])
    else:
        k_arg, v_arg = k, v
    block_sparse_fwd[grid](
        q, k_arg, v_arg, out, lse, tm, tm2,
        qperm if qperm is not None else dummy_i,
        kperm if kperm is not None else dummy_i,
        tiles.tiles, tiles.q_offsets,
        chunks.starts, chunks.ends, chunks.slots, chunks.counts,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(),
        H, Sq, Sk, NQ, chunks.starts.shape[-1], maxk, tiles.num,
        scale, scale * LOG2E,
        HEAD_DIM=D, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
        PERM_Q=perm_q, PERM_K=perm_k, PERM_O=perm_o,
        HAS_LSE=return_lse, HAS_STATS=return_tile_stats,
        STATS_OWNED=return_tile_stats and plan.block_size is not None
        and plan.block_size[1] == cfg.block_n and plan.block_size[0] <= cfg.block_m,
        UPCAST=INTERPRET and q.dtype == torch.bfloat16,
        TMA_KV=tma,
        WARP_SPEC=cfg.warp_specialize,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    tile_lse = torch.logaddexp(tm, tm2) if return_tile_stats else None
    return AttentionResult(out=out, lse=lse if return_lse else None, tile_lse=tile_lse)


def _tma_ok(x: Tensor) -> bool:
    # TMA needs a CUDA Hopper+ device, unit last stride and 16-byte aligned base and strides.
    if not x.is_cuda or TensorDescriptor is None or torch.cuda.get_device_capability(x.device)[0] < 9:
        return False
    es = x.element_size()
    return x.stride(3) == 1 and x.data_ptr() % 16 == 0 and all((s * es) % 16 == 0 for s in x.stride()[:3])


def _env_config() -> KernelConfig | None:
    spec = os.environ.get("DIT_SPARSE_TRITON_CONFIG")
    if not spec:
        return None
    bm, bn, w, s = (int(x) for x in spec.split(","))
    return KernelConfig(bm, bn, w, s)


def plan_kind(plan: BlockPlan) -> str:
    """The kernel-relevant kind of a plan: fixed blocks or variable ranges, identity or permuted keys."""
    kind = "fixed" if plan.block_size is not None else "ranges"
    return kind + ("-perm" if plan.k_perm is not None else "")


# Configurations chosen offline per (GPU architecture, head dim, plan kind), never timed during a
# generation: `python -m dit_sparse.kernels.bench --sweep` times every candidate per shape and plan kind.
# From the H100 sweep (docs/kernels-notes.md): 128x128 tiles with 8 warps; 2 stages where keys are read
# contiguously (TMA), 3 where they are gathered through a permutation (more latency to hide).
STORED_CONFIGS: dict[tuple[int, int, str], KernelConfig] = {
    (9, 128, "fixed"): KernelConfig(128, 128, 8, 2),
    (9, 128, "ranges"): KernelConfig(128, 128, 8, 2),
    (9, 128, "fixed-perm"): KernelConfig(128, 128, 8, 3),
    (9, 128, "ranges-perm"): KernelConfig(128, 128, 8, 3),
    (9, 64, "fixed"): KernelConfig(128, 128, 8, 3),
    (9, 64, "ranges"): KernelConfig(128, 128, 8, 3),
    (9, 64, "fixed-perm"): KernelConfig(128, 128, 8, 3),
    (9, 64, "ranges-perm"): KernelConfig(128, 128, 8, 3),
}


def choose_config(q: Tensor, plan: BlockPlan) -> KernelConfig:
    """The kernel configuration for these inputs: pinned by the environment, else the stored table, else
    the first candidate of the head dim. A lookup: nothing is timed here."""
    pinned = _env_config()
    if pinned is not None:
        return pinned
    D = q.shape[-1]
    if q.is_cuda and not INTERPRET:
        major = torch.cuda.get_device_capability(q.device)[0]
        cfg = STORED_CONFIGS.get((major, D, plan_kind(plan)))
        if cfg is not None:
            return cfg
    return _CANDIDATES[D][0]


def candidate_configs(head_dim: int, plan: BlockPlan) -> list[KernelConfig]:
    """Configurations worth timing offline for this head dim and plan (used by the tuner)."""
    fixed = plan.block_size
    return [c for c in _CANDIDATES[head_dim] if fixed is None or c.block_m <= fixed[0]]


def triton_block_sparse_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    plan: BlockPlan,
    scale: float | None = None,
    return_lse: bool = False,
    return_tile_stats: bool = False,
    config: KernelConfig | None = None,
    gather: str | None = None,
) -> AttentionResult:
    """Run `plan` with the Triton kernel (same contract as `reference_block_sparse_attention`)."""
    raise_if_unsupported("triton", supports(q, plan))
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not _fits_int32(x):
            raise ValueError(f"{name} is too large for one (batch, head) slice with int32 offsets")
    gather = gather or DEFAULT_GATHER
    if gather not in ("kernel", "copy"):
        raise ValueError(f"gather must be 'kernel' or 'copy', got {gather!r}")
    scale = softmax_scale(scale, q.shape[-1])
    flags = (return_lse, return_tile_stats, gather)
    cfg = config or choose_config(q, plan)
    global LAST_CONFIG
    LAST_CONFIG = cfg
    return _launch(q, k, v, plan, scale, cfg, *flags, use_tma=USE_TMA)


register_backend(Backend(name="triton", run=triton_block_sparse_attention, supports=supports,
                         supports_setting=supports_setting, tile_stats=True))

try:  # FlexAttention on fixed-block plans, selectable by name (not chosen by "auto").
    from . import triton_flex  # noqa: F401
except ImportError:  # pragma: no cover - needs torch with flex_attention
    pass
