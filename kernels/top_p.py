"""Top-p membership per row (the selection step of "semantic" and "pooled"), one Triton program per row.

For each row of block masses `p` [R, N] with candidates `cand`, the top-p set is the shortest run of the
largest candidate masses whose cumulative mass, counted after `forced` mass already taken, reaches
`top_p`: a candidate belongs to it when the mass of the larger candidates before it is still below
`top_p`. The result is `cand & (p >= threshold)`, the threshold being the smallest mass inside the run
(candidates tied with it are all in).

PyTorch's batched sort of short rows (3,072 rows of 256 blocks at Wan-1.3B's shape) took 0.07 ms on an
H200; a row of at most a few thousand blocks fits one program, which sorts it in registers (`tl.sort`).
On the CPU (and without Triton) the same rule runs in PyTorch.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - CPU installs without Triton use PyTorch
    triton = None

from .triton_util import triton_runs_on

Tensor = torch.Tensor

_MAX_ROW = 4096  # longest row one program sorts


def top_p_members(p: Tensor, cand: Tensor, forced_mass: Tensor, top_p: float) -> Tensor:
    """Boolean [..., N]: the candidates in each row's top-p set (see the module docstring).

    p: float32 [..., N] block masses; cand: bool [..., N]; forced_mass: float32 [..., 1] mass already taken.
    """
    n = p.shape[-1]
    if triton_runs_on(p) and 0 < n <= _MAX_ROW:
        rows = p.numel() // n
        out = torch.empty(p.shape, dtype=torch.bool, device=p.device)
        if rows:
            _top_p_kernel[(rows,)](p.contiguous(), cand.contiguous(), forced_mass.contiguous(), out, n, float(top_p),
                                   BLOCK=triton.next_power_of_2(n), num_warps=4)
        return out
    return _top_p_torch(p, cand, forced_mass, top_p)


def _top_p_torch(p: Tensor, cand: Tensor, forced_mass: Tensor, top_p: float) -> Tensor:
    p_cand = torch.where(cand, p, torch.full_like(p, -1.0))  # -1 sorts non-candidates last
    p_sorted = torch.sort(p_cand, dim=-1, descending=True).values
    pos = p_sorted.clamp_min(0.0)
    inside = forced_mass + torch.cumsum(pos, -1) - pos < top_p
    threshold = torch.where(inside, p_sorted, torch.full_like(p_sorted, torch.inf)).amin(-1, keepdim=True)
    return cand & (p_cand >= threshold)


if triton is not None:

    @triton.jit
    def top_p_row(p, cand, forced_mass, top_p):
        """The rule of the module docstring on one row held in registers: p float32 [BLOCK], cand bool
        [BLOCK] (False on padding lanes), forced_mass a scalar. Also used by kernels/priority.py."""
        pc = tl.where(cand, p, -1.0)  # -1 sorts non-candidates last
        s = tl.sort(pc, descending=True)
        pos = tl.maximum(s, 0.0)
        before = forced_mass + tl.cumsum(pos, 0) - pos
        threshold = tl.min(tl.where(before < top_p, s, float("inf")), 0)
        return cand & (pc >= threshold)

    @triton.jit
    def _top_p_kernel(P, CAND, FORCED, OUT, N, top_p, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        offs = tl.arange(0, BLOCK)
        ok = offs < N
        p = tl.load(P + row * N + offs, mask=ok, other=0.0)
        c = (tl.load(CAND + row * N + offs, mask=ok, other=0) != 0) & ok
        tl.store(OUT + row * N + offs, top_p_row(p, c, tl.load(FORCED + row), top_p), mask=ok)
