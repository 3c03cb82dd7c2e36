"""One entry point, `block_sparse_attention`, over a small registry of executors ("backends").

Backends register a callable with the reference executor's signature plus a `supports(q, plan)` check and
whether they compute tile statistics. `backend="auto"` takes the first backend in the automatic order
(fastest first, as measured in BENCHMARKS.md: flash-attn-4 where installed, then Triton, then the batched
CPU executor) that supports the inputs; `select_backend` tells the caller beforehand, so that the attention
processors can run the model's own dense attention (one warning) for CUDA inputs no fast kernel runs.
The pure-PyTorch reference is the oracle of the tests and runs what nothing faster can (LSE and tile
statistics on the CPU).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from dit_sparse.plan import BlockPlan
from dit_sparse.warn import WarnOnce

from .reference import reference_block_sparse_attention
from .result import AttentionResult


@dataclass(frozen=True)
class Backend:
    name: str
    run: Callable[..., AttentionResult]
    supports: Callable[[torch.Tensor, BlockPlan], str | None]  # None if supported, else the reason
    tile_stats: bool = False  # computes AttentionResult.tile_lse (needed by "skip")
    lse: bool = True  # can return AttentionResult.lse
    # The part of `supports` that needs no tensor (device, dtype or None when not known yet): lets callers
    # such as the CLI reject e.g. `--backend triton --device cpu` before loading a model.
    supports_setting: Callable[[torch.device, torch.dtype | None], str | None] | None = None


_BACKENDS: dict[str, Backend] = {}
_AUTO_ORDER: list[str] = []
_warn_once = WarnOnce("dit-sparse: using the PyTorch reference attention because ", stacklevel=3)


def register_backend(backend: Backend, auto: bool = True, first: bool = False) -> None:
    """Add an executor; `auto=True` lets `backend="auto"` choose it (earlier in the order wins; `first`
    puts it ahead of the backends registered so far)."""
    _BACKENDS[backend.name] = backend
    if auto and backend.name not in _AUTO_ORDER:
        _AUTO_ORDER.insert(0, backend.name) if first else _AUTO_ORDER.append(backend.name)


def auto_order() -> list[str]:
    """The backends `backend="auto"` tries, in order."""
    return list(_AUTO_ORDER)


def select_backend(q: torch.Tensor, plan: BlockPlan, backend: str = "auto",
                   tile_stats: bool = False, lse: bool = False) -> tuple[str, str | None]:
    """(name of the backend that will run, None) or ("", the reasons none can) for these inputs.

    "reference" is returned for CPU inputs nothing faster runs, and when asked for by name. A named
    backend that cannot run the inputs is an error (ValueError), not a fallback.
    """
    if backend == "reference":
        return "reference", None
    if backend != "auto":
        chosen = _BACKENDS[check_backend(backend)]
        reason = chosen.supports(q, plan)
        if reason is None and tile_stats and not chosen.tile_stats:
            reason = "it computes no tile statistics (needed by 'skip'); use backend='triton'"
        if reason is None and lse and not chosen.lse:
            reason = "it returns no LSE (needed by 'skip'); use backend='triton' or 'reference'"
        if reason is not None:
            raise ValueError(f"backend {backend!r} cannot run these inputs: {reason}")
        return backend, None
    reasons = []
    for name in _AUTO_ORDER:
        cand = _BACKENDS[name]
        if (tile_stats and not cand.tile_stats) or (lse and not cand.lse):
            continue
        reason = cand.supports(q, plan)
        if reason is None:
            return name, None
        reasons.append(f"{name}: {reason}")
    if not q.is_cuda:
        return "reference", None
    return "", "; ".join(reasons) or "no GPU kernel is registered"


def available_backends() -> list[str]:
    """Names accepted by `backend=` besides "auto": the reference executor and every registered one."""
    return ["reference", *_BACKENDS]


def check_backend(backend: str, device: torch.device | str | None = None,
                  dtype: torch.dtype | None = None) -> str:
    """Return `backend` if it names a known executor that can run on `device` in `dtype`, else raise
    ValueError saying what is available. Device and dtype are checked only when given ("auto" and
    "reference" run anywhere: "auto" falls back to the reference)."""
    if backend in ("auto", "reference"):
        return backend
    if backend not in _BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; available: {['auto', *available_backends()]}")
    check = _BACKENDS[backend].supports_setting
    if device is not None and check is not None:
        reason = check(torch.device(device), dtype)
        if reason is not None:
            where = f"{torch.device(device)}" + (f" in {str(dtype).removeprefix('torch.')}" if dtype else "")
            raise ValueError(f"backend {backend!r} cannot run on {where}: {reason}; "
                             f"use backend 'auto' (falls back to the reference) or 'reference'")
    return backend


def block_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    plan: BlockPlan,
    scale: float | None = None,
    return_lse: bool = False,
    return_tile_stats: bool = False,
    backend: str = "auto",
) -> AttentionResult:
    """Attention of q [B, H, Sq, D] over k, v [B, H, Sk, D] restricted to the pairs `plan` selects.

    Inputs may be non-contiguous views (e.g. Diffusers' [B, S, H, D] transposed). The output is in the
    original token order, same dtype as q.
    """
    _check_shapes(q, k, v, plan)
    name, reason = select_backend(q, plan, backend, return_tile_stats, return_lse)
    if not name:
        _warn_once(reason)
        name = "reference"
    return run_backend(name, q, k, v, plan, scale=scale, return_lse=return_lse, return_tile_stats=return_tile_stats)


def run_backend(name: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: BlockPlan,
                scale: float | None = None, return_lse: bool = False, return_tile_stats: bool = False
                ) -> AttentionResult:
    """Run `plan` on the backend `select_backend` chose (no second selection: callers that selected
    already, like the attention core, go straight here)."""
    _check_shapes(q, k, v, plan)
    kwargs = dict(scale=scale, return_lse=return_lse, return_tile_stats=return_tile_stats)
    if name == "reference":
        return reference_block_sparse_attention(q, k, v, plan, **kwargs)
    return _BACKENDS[name].run(q, k, v, plan, **kwargs)


def _check_shapes(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: BlockPlan) -> None:
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"q, k, v must be [B, H, S, D]; got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if k.shape != v.shape or q.shape[:2] != k.shape[:2] or q.shape[-1] != k.shape[-1]:
        raise ValueError(f"incompatible shapes q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if (plan.batch, plan.heads) != tuple(q.shape[:2]):
        raise ValueError(f"plan is for (B, H) = {(plan.batch, plan.heads)}, inputs have {tuple(q.shape[:2])}")
    if plan.seq_len_q != q.shape[2] or plan.seq_len_k != k.shape[2]:
        raise ValueError(f"plan covers {plan.seq_len_q}x{plan.seq_len_k} tokens, inputs {q.shape[2]}x{k.shape[2]}")
