"""Per-row priority keys of the budgeted block selection (`dit_sparse.methods.budget`), one Triton program
per query range.

For one query range (a row of estimated block logits) the selection needs, per key range: its mass P'
(a softmax over key ranges of logit + log(range size)), whether it is forced, a floor candidate (one of the
`min_blocks` best logits) or a top-p candidate, and its per-pair probability. `select_blocks` folds these
into one float sort key per block (module docstring there). In PyTorch that is some thirty elementwise
launches plus a `topk` (0.04-0.065 ms alone on an H200 at Wan-1.3B's 3,072 rows of 256 key ranges); here
each program loads its row once and writes the keys (0.014 ms with top_p 1, 0.025 ms with top_p 0.9, same
shape and GPU; benchmarks/h200-2026-12-01/session5/run2/profiles/). On the CPU (and without Triton) `select_blocks` runs
the same rule in PyTorch; under TRITON_INTERPRET=1 this kernel runs on CPU tensors, which is how CI
checks that both agree.

Ties: a floor rank goes to the smallest key index among equal logits (PyTorch's `topk` leaves tie order
unspecified), so the two paths agree whenever candidate logits are distinct.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - CPU installs without Triton use PyTorch
    triton = None

from .triton_util import triton_runs_on

if triton is not None:
    from .top_p import top_p_row

Tensor = torch.Tensor

MAX_ROW = 4096  # key ranges one program holds in registers (and sorts, for top_p < 1)


def use_kernel(logits: Tensor) -> bool:
    """Whether `priority_keys` can run for these logits [B, H, NQ, NK]."""
    return triton is not None and triton_runs_on(logits) and 0 < logits.shape[-1] <= MAX_ROW


def priority_keys(logits: Tensor, q_sizes: Tensor, k_sizes: Tensor, force_q: Tensor, force_k: Tensor,
                  top_p: float, min_blocks: int, level: float) -> Tensor:
    """float32 [B, H, NQ, NK] sort keys of `select_blocks` (inf = not a candidate).

    logits [B, H, NQ, NK]; q_sizes [B, H, NQ] and k_sizes [B, H, NK] token counts; force_q [B, H, NQ] and
    force_k [B, H, NK] bool; `level` is the width of one priority level in the key.
    """
    B, H, NQ, NK = logits.shape
    out = torch.empty(B, H, NQ, NK, dtype=torch.float32, device=logits.device)
    if out.numel() == 0:
        return out
    _priority_kernel[(B * H * NQ,)](
        logits.float().contiguous(), q_sizes.to(torch.int32).contiguous(), k_sizes.to(torch.int32).contiguous(),
        force_q.to(torch.int8).contiguous(), force_k.to(torch.int8).contiguous(), out,
        NQ, NK, float(top_p), int(min_blocks), float(level),
        USE_TOP_P=top_p < 1.0, BLOCK=triton.next_power_of_2(NK), num_warps=4 if NK <= 1024 else 8,
    )
    return out


if triton is not None:

    @triton.jit
    def _priority_kernel(L, QS, KS, FQ, FK, OUT, NQ, NK, top_p, min_blocks, level,
                         USE_TOP_P: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)  # (b * H + h) * NQ + i
        bh = row // NQ
        offs = tl.arange(0, BLOCK)
        ok = offs < NK
        neg_inf = float("-inf")
        logit = tl.load(L + row * NK + offs, mask=ok, other=0.0)
        ks = tl.load(KS + bh * NK + offs, mask=ok, other=0)
        fk = tl.load(FK + bh * NK + offs, mask=ok, other=0) != 0
        q_live = tl.load(QS + row) > 0
        fq = tl.load(FQ + row) != 0

        # P'_ij: softmax over key ranges of logit + log(size); empty key ranges (and padding lanes) get 0.
        k_live = ok & (ks > 0)
        logw = tl.where(k_live, logit + tl.log(tl.maximum(ks, 1).to(tl.float32)), neg_inf)
        top = tl.max(logw, 0)
        e = tl.where(k_live, tl.exp(logw - tl.where(top == neg_inf, 0.0, top)), 0.0)
        total = tl.sum(e, 0)
        p = e / tl.where(total > 0, total, 1.0)

        live = k_live & q_live
        forced = (fk | fq) & live
        cand = live & ~forced
        if USE_TOP_P:  # the shortest run of largest masses reaching top_p (kernels/top_p.py)
            in_top_p = top_p_row(p, cand, tl.sum(tl.where(forced, p, 0.0), 0), top_p)
        else:
            in_top_p = cand

        # Floor ranks by logit: the min_blocks best candidates, best first (ties: smallest index).
        rest = tl.where(cand, logit, neg_inf)
        rank = tl.full([BLOCK], 2147483647, tl.int32)
        for r in range(0, min_blocks):
            hit = (offs == tl.argmax(rest, 0)) & (rest > neg_inf)  # the first best, if any is left
            rank = tl.where(hit, r, rank)
            rest = tl.where(hit, neg_inf, rest)
        floor = cand & (rank < min_blocks)

        density = p / tl.maximum(ks, 1).to(tl.float32)
        neg_log = tl.minimum(tl.maximum(-tl.log(tl.maximum(density, 1e-30)), 0.0), level - 1.0)
        key = tl.where(floor, rank.to(tl.float32) * level + neg_log, float("inf"))
        key = tl.where(in_top_p & ~floor, min_blocks * level + neg_log, key)
        tl.store(OUT + row * NK + offs, key, mask=ok)
