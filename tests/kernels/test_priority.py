"""Selection priority keys: the Triton row kernel (under TRITON_INTERPRET=1 in a subprocess) against the
PyTorch path of `select_blocks`, on random rows with forced, empty and padded ranges."""

from __future__ import annotations

import math
import textwrap

import pytest
import torch
from _interpreter import run_interpreted
from dit_sparse.kernels import priority

from dit_sparse.methods.budget import _LEVEL, _priority_keys_torch


def _case(seed: int, nq: int, nk: int):
    """(logits, q_sizes, k_sizes, force_q, force_k) for B=2, H=3 with empty and forced ranges."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(2, 3, nq, nk, generator=g) * 3.0
    qs = torch.randint(0, 130, (2, 3, nq), generator=g)
    ks = torch.randint(1, 130, (2, 3, nk), generator=g)
    ks[..., 0] = 0  # an empty key range in every row
    qs[0, 0, 0] = 0  # an empty query range
    ks[1, 2] = 0  # a (batch, head) without keys: every row empty
    fq = torch.rand(2, 3, nq, generator=g) < 0.1
    fk = torch.rand(2, 3, nk, generator=g) < 0.1
    return logits, qs, ks, fq, fk


def torch_keys(logits, qs, ks, fq, fk, top_p, min_blocks):
    live = (qs > 0)[..., None] & (ks > 0)[..., None, :]
    forced = (fq[..., None] | fk[..., None, :]) & live
    return _priority_keys_torch(logits, ks, forced, live, top_p, min_blocks)


def test_torch_keys_put_floor_before_top_p_and_leave_non_candidates_out() -> None:
    logits, qs, ks, fq, fk = _case(0, 5, 40)
    key = torch_keys(logits, qs, ks, fq, fk, 1.0, 3)
    live = (qs > 0)[..., None] & (ks > 0)[..., None, :]
    cand = live & ~(fq[..., None] | fk[..., None, :])
    assert torch.equal(torch.isfinite(key), cand)
    level = torch.where(torch.isfinite(key), torch.floor(key / _LEVEL), torch.full_like(key, math.inf))
    floor = level < 3
    assert (floor.sum(-1) <= 3).all() and torch.equal(floor.sum(-1), cand.sum(-1).clamp(max=3))
    # the floor holds the best logits of the row's candidates
    best = torch.where(cand, logits, torch.full_like(logits, -math.inf)).topk(1, -1).indices
    has = cand.any(-1, keepdim=True)
    assert torch.equal(torch.gather(level, -1, best)[has[..., 0]], torch.zeros_like(best, dtype=key.dtype)[has[..., 0]])


_KERNEL_CHECK = textwrap.dedent(
    """
    import sys
    import torch
    sys.path.insert(0, "tests/kernels")
    from test_priority import _case, torch_keys
    from dit_sparse.kernels import priority
    from dit_sparse.methods.budget import _LEVEL, select_blocks
    n_ok = 0
    # a single block, short rows with more floor slots than keys, a padded row of 512 lanes
    for seed, (nq, nk, top_p, min_blocks) in enumerate(
            [(1, 1, 1.0, 1), (4, 7, 0.9, 9), (4, 7, 1.0, 4), (2, 64, 0.9, 2), (1, 300, 0.9, 4)]):
        case = _case(seed, nq, nk)
        assert priority.use_kernel(case[0])
        got = priority.priority_keys(*case, top_p, min_blocks, _LEVEL)
        want = torch_keys(*case, top_p, min_blocks)
        assert torch.equal(torch.isinf(got), torch.isinf(want)), (nq, nk, top_p, min_blocks)
        fin = torch.isfinite(want)
        assert torch.allclose(got[fin], want[fin], rtol=1e-5, atol=1e-4), (nq, nk, top_p, min_blocks)
        n_ok += 1
    # whole selection: the kernel path (interpreter) against the PyTorch path, same masks
    logits, qs, ks, fq, fk = _case(7, 8, 24)
    for sparsity in (0.5, 0.9):
        got = select_blocks(logits, qs, ks, sparsity, top_p=0.9, min_blocks=2, force_q=fq, force_k=fk)
        priority.use_kernel = lambda logits: False
        want = select_blocks(logits, qs, ks, sparsity, top_p=0.9, min_blocks=2, force_q=fq, force_k=fk)
        priority.use_kernel = lambda logits: True
        assert torch.equal(got, want), sparsity
        n_ok += 1
    print("ok", n_ok)
    """
)


def test_triton_kernel_matches_torch_under_interpreter() -> None:
    run_interpreted(_KERNEL_CHECK, "ok 7")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_selection_matches_the_cpu_path() -> None:
    """Whole selections at Wan-like row counts on the GPU kernel path equal the PyTorch path on the CPU."""
    from dit_sparse.methods.budget import select_blocks

    for seed, (nq, nk, top_p, mb) in enumerate([(64, 256, 1.0, 6), (40, 300, 0.9, 3), (9, 1024, 0.9, 21)]):
        logits, qs, ks, fq, fk = _case(seed, nq, nk)
        assert not priority.use_kernel(logits)  # CPU tensors take PyTorch here
        for sparsity in (0.75, 0.9):
            want = select_blocks(logits, qs, ks, sparsity, top_p=top_p, min_blocks=mb, force_q=fq, force_k=fk)
            got = select_blocks(*(t.cuda() for t in (logits, qs, ks)), sparsity, top_p=top_p, min_blocks=mb,
                                force_q=fq.cuda(), force_k=fk.cuda())
            assert torch.equal(got.cpu(), want), (nq, nk, top_p, sparsity)
