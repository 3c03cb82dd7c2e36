"""`gather_rows`: the Triton row copy (under TRITON_INTERPRET=1 in a subprocess) and the PyTorch path,
against plain indexing on fresh random inputs (Diffusers' strided layout, odd lengths, shared and
per-head orders, int32/int64 indices, head dims 40/64/128, B = 2)."""

from __future__ import annotations

import textwrap

import pytest
import torch
from _interpreter import run_interpreted
from dit_sparse.kernels.permute import gather_rows

_CASES = textwrap.dedent(
    """
    import torch
    from dit_sparse.kernels.permute import gather_rows, use_kernel

    def want(x, idx):
        B, H, S, D = x.shape
        out = torch.empty(B, idx.shape[-1], H, D, dtype=x.dtype)
        for b in range(B):
            for h in range(H):
                out[b, :, h] = x[b, h, idx[b, h].long()]
        return out

    g = torch.Generator().manual_seed(0)
    n = 0
    for B, H, S, D, L in ((2, 3, 77, 64, 77), (1, 2, 130, 128, 130), (2, 2, 45, 40, 31)):
        for dtype in (torch.float32, torch.bfloat16):
            for strided in (True, False):
                base = torch.randn(B, S, H, D, generator=g) if strided else torch.randn(B, H, S, D, generator=g)
                x = (base.transpose(1, 2) if strided else base).to(dtype)
                per_head = torch.stack([torch.randperm(S, generator=g)[:L] for _ in range(B * H)]).view(B, H, L)
                shared = torch.randperm(S, generator=g)[:L].expand(B, H, L)
                for idx in (per_head, per_head.int(), shared):
                    assert use_kernel(x)
                    got = gather_rows(x, idx)
                    assert got.is_contiguous() and got.shape == (B, L, H, D)
                    assert torch.equal(got, want(x, idx)), (B, H, S, D, L, dtype, strided, idx.dtype)
                    n += 1
    print("ok", n)
    """
)


def test_gather_rows_kernel_under_interpreter() -> None:
    run_interpreted(_CASES, "ok 36")


@pytest.mark.parametrize("strided", [True, False])
def test_gather_rows_torch_path_matches_indexing(strided: bool) -> None:
    g = torch.Generator().manual_seed(1)
    B, H, S, D = 2, 3, 53, 64
    x = torch.randn(B, S, H, D, generator=g).transpose(1, 2) if strided else torch.randn(B, H, S, D, generator=g)
    idx = torch.stack([torch.randperm(S, generator=g) for _ in range(B * H)]).view(B, H, S)
    got = gather_rows(x, idx)
    want = torch.stack([torch.stack([x[b, h, idx[b, h]] for h in range(H)], 1) for b in range(B)])
    assert got.is_contiguous() and torch.equal(got, want)
    # The inverse order puts the rows back where they were.
    inv = torch.argsort(idx, dim=-1)
    assert torch.equal(gather_rows(got.transpose(1, 2), inv), x.transpose(1, 2))


def test_gather_rows_rejects_bad_index_shape() -> None:
    x = torch.randn(1, 2, 8, 16)
    with pytest.raises(ValueError, match=r"idx must be \[B, H, L\]"):
        gather_rows(x, torch.zeros(2, 8, dtype=torch.long))
