"""Per-block partial sums of sampled rows' attention (`kernels.block_sums`): the Triton kernel (under
TRITON_INTERPRET=1 in a subprocess) and the PyTorch path against float64 sums, with a short last block,
B=2, head dims 64 and 128, strided inputs and rows that do not fill the kernel's row tile."""

from __future__ import annotations

import textwrap

import torch
from _interpreter import run_interpreted
from dit_sparse.kernels.block_sums import _block_sums_torch


def _case(seed: int, S: int, D: int, R: int = 13):
    g = torch.Generator().manual_seed(seed)
    # Diffusers' [B, S, H, D] layout seen as [B, H, S, D]: strided views, never contiguous copies.
    k, v = (torch.randn(2, S, 3, D, generator=g).transpose(1, 2) for _ in range(2))
    q = torch.randn(2, R, 3, D, generator=g).transpose(1, 2) * 2.0
    return q, k, v


def _float64(q, k, v, block: int, scale: float):
    S = k.shape[2]
    s = (q.double() @ k.double().transpose(-1, -2)) * scale
    m, mass, o = [], [], []
    for n0 in range(0, S, block):
        sb = s[..., n0:n0 + block]
        mb = sb.amax(-1)
        p = torch.exp(sb - mb[..., None])
        m.append(mb)
        mass.append(p.sum(-1))
        o.append(p @ v.double()[:, :, n0:n0 + block])
    return torch.stack(m, -1), torch.stack(mass, -1), torch.stack(o, 3)


def _check(fn) -> int:
    n_ok = 0
    for S, D, block in ((203, 64, 32), (130, 128, 64), (64, 64, 16)):
        q, k, v = _case(S + D, S, D)
        got = fn(q, k, v, block, 0.125)
        want = _float64(q, k, v, block, 0.125)
        for a, b in zip(got, want):
            torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-4)
        n_ok += 1
    return n_ok


def test_torch_path_matches_float64() -> None:
    assert _check(_block_sums_torch) == 3


_KERNEL_CHECK = textwrap.dedent(
    """
    import sys
    sys.path.insert(0, "tests/kernels")
    from test_block_sums import _check
    from dit_sparse.kernels import block_sums as mod
    calls = []
    torch_path = mod._block_sums_torch
    mod._block_sums_torch = lambda *a: calls.append(1) or torch_path(*a)
    print("ok", _check(mod.block_sums), "torch calls", len(calls))
    """
)


def test_triton_kernel_under_interpreter() -> None:
    run_interpreted(_KERNEL_CHECK, "ok 3 torch calls 0")
