"""The batched CPU executor against the float64 reference on random plans."""

import math

import pytest
import torch
from dit_sparse.kernels import block_sparse_attention, reference_block_sparse_attention, select_backend
from dit_sparse.kernels.cpu_backend import cpu_block_sparse_attention

from dit_sparse.plan import BlockPlan


def _ranges(S, g, lo=0, hi=90):
    cuts = [0]
    while cuts[-1] < S:
        cuts.append(min(S, cuts[-1] + int(torch.randint(lo, hi, (1,), generator=g))))
    return torch.tensor(cuts, dtype=torch.int32)


def _qkv(B, H, S, D, g, dtype):
    # Diffusers' [B, S, H, D] layout seen as [B, H, S, D], as the processors pass it.
    return [torch.randn(B, S, H, D, generator=g).to(dtype).transpose(1, 2) for _ in range(3)]


@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fixed_blocks_with_shared_and_per_head_orders(D, dtype):
    g = torch.Generator().manual_seed(D)
    B, H, S, bs = 2, 3, 1037, 64
    q, k, v = _qkv(B, H, S, D, g, dtype)
    nb = math.ceil(S / bs)
    mask = torch.rand(B, H, nb, nb, generator=g) < 0.25
    mask[0, 1, 3] = False  # a query block with no key block: zeros
    shared = torch.randperm(S, generator=g).view(1, 1, S).expand(B, H, S)
    per_head = torch.stack([torch.randperm(S, generator=g) for _ in range(B * H)]).view(B, H, S)
    for q_perm, k_perm in ((None, None), (shared, shared), (per_head, per_head.flip(-1))):
        plan = BlockPlan.from_block_mask(mask, bs, S, q_perm=q_perm, k_perm=k_perm)
        got = cpu_block_sparse_attention(q, k, v, plan)
        want = reference_block_sparse_attention(q.double(), k.double(), v.double(), plan,
                                                compute_dtype=torch.float64).out
        tol = 1e-5 if dtype == torch.float32 else 3e-2
        torch.testing.assert_close(got.out.double(), want, atol=tol, rtol=tol)
        assert got.out.dtype == dtype
        rows = torch.arange(3 * bs, 4 * bs)
        rows = rows if q_perm is None else q_perm[0, 1, rows]
        assert got.out[0, 1, rows].abs().max() == 0


def test_variable_ranges_with_empty_ranges_and_permutations():
    g = torch.Generator().manual_seed(7)
    B, H, S, D = 2, 2, 611, 64
    q, k, v = _qkv(B, H, S, D, g, torch.float32)
    q_off, k_off = _ranges(S, g), _ranges(S, g, lo=0, hi=140)  # lo=0: some ranges are empty
    nq, nk = q_off.numel() - 1, k_off.numel() - 1
    mask = torch.rand(B, H, nq, nk, generator=g) < 0.3
    perms = [torch.stack([torch.randperm(S, generator=g) for _ in range(B * H)]).view(B, H, S) for _ in range(2)]
    plan = BlockPlan.from_range_mask(mask, q_off.expand(B, H, -1), k_off.expand(B, H, -1), perms[0], perms[1])
    got = cpu_block_sparse_attention(q, k, v, plan).out
    want = reference_block_sparse_attention(q.double(), k.double(), v.double(), plan, compute_dtype=torch.float64)
    torch.testing.assert_close(got.double(), want.out, atol=1e-5, rtol=1e-5)


def test_auto_uses_it_on_the_cpu_unless_lse_or_statistics_are_needed():
    plan = BlockPlan.dense(1, 2, 200, 64)
    q = torch.randn(1, 2, 200, 64)
    assert select_backend(q, plan)[0] == "cpu"
    assert select_backend(q, plan, lse=True)[0] == "reference"
    assert select_backend(q, plan, tile_stats=True)[0] == "reference"
    res = block_sparse_attention(q, q, q, plan, return_lse=True)  # auto: the reference, with LSE
    assert res.lse is not None and torch.isfinite(res.lse).all()
    with pytest.raises(ValueError, match="no LSE"):
        block_sparse_attention(q, q, q, plan, return_lse=True, backend="cpu")
