"""Top-p membership: the Triton row kernel (under TRITON_INTERPRET=1 in a subprocess) and the PyTorch path
against a direct reading of the rule (per candidate: mass of the larger candidates before it < top_p)."""

from __future__ import annotations

import textwrap

import pytest
import torch
from _interpreter import run_interpreted
from dit_sparse.kernels.top_p import _top_p_torch


def _rule(p: torch.Tensor, cand: torch.Tensor, forced: torch.Tensor, top_p: float) -> torch.Tensor:
    """Candidate j is in when forced mass + the mass of candidates strictly larger than j is < top_p."""
    pc = torch.where(cand, p, torch.zeros_like(p))
    larger = (pc[..., None, :] > pc[..., :, None]) & cand[..., None, :]  # [..., j, i]: candidate i larger than j
    before = forced + (larger * pc[..., None, :]).sum(-1)
    return cand & (before < top_p)


def _case(seed: int, n: int):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(2, 3, 5, n, generator=g) * 2.5
    p = torch.softmax(logits, -1)
    cand = torch.rand(2, 3, 5, n, generator=g) < 0.8
    cand[0, 0, 0] = False  # a row without candidates
    forced = (p * ~cand).sum(-1, keepdim=True) * 0.5
    return p, cand, forced


@pytest.mark.parametrize("n", [1, 7, 64, 300])
@pytest.mark.parametrize("top_p", [0.5, 0.9, 0.99])
def test_torch_path_follows_the_rule(n: int, top_p: float) -> None:
    p, cand, forced = _case(n, n)
    assert torch.equal(_top_p_torch(p, cand, forced, top_p), _rule(p, cand, forced, top_p))


_KERNEL_CHECK = textwrap.dedent(
    """
    import sys
    import torch
    sys.path.insert(0, "tests/kernels")
    from test_top_p import _case, _rule
    from dit_sparse.kernels.top_p import top_p_members
    n_ok = 0
    for n in (1, 7, 300):  # a single block, a short row, a padded row of 512 lanes
        for top_p in (0.5, 0.9):
            p, cand, forced = _case(n, n)
            assert torch.equal(top_p_members(p, cand, forced, top_p), _rule(p, cand, forced, top_p)), (n, top_p)
            n_ok += 1
    print("ok", n_ok)
    """
)


def test_triton_kernel_under_interpreter() -> None:
    run_interpreted(_KERNEL_CHECK, "ok 6")
