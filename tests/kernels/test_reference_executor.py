"""The pure-PyTorch executor is the oracle for every kernel: check it against float64 masked SDPA."""

import math

import pytest
import torch
import torch.nn.functional as F
from dit_sparse.kernels import block_sparse_attention

from dit_sparse.plan import BlockPlan


def masked_attention(q, k, v, mask, scale=None):
    """float64 softmax attention with a token mask [B, H, Sq, Sk]; empty rows give zeros."""
    q, k, v = (t.double() for t in (q, k, v))
    scale = 1 / math.sqrt(q.shape[-1]) if scale is None else scale
    s = (q @ k.transpose(-1, -2)) * scale
    s = s.masked_fill(~mask, -math.inf)
    lse = torch.logsumexp(s, -1)
    p = torch.softmax(s, -1).nan_to_num(0.0)
    return p @ v, lse


def rand_qkv(B, H, S, D, dtype=torch.float32, seed=0, sk=None):
    g = torch.Generator().manual_seed(seed)
    sk = S if sk is None else sk
    q = torch.randn(B, H, S, D, generator=g, dtype=dtype)
    k = torch.randn(B, H, sk, D, generator=g, dtype=dtype)
    v = torch.randn(B, H, sk, D, generator=g, dtype=dtype)
    return q, k, v


@pytest.mark.parametrize("B,H,S,D,block", [(1, 2, 64, 64, 16), (2, 3, 77, 64, 16), (2, 2, 131, 128, 32)])
def test_full_plan_equals_dense_sdpa(B, H, S, D, block):
    q, k, v = rand_qkv(B, H, S, D, seed=S)
    plan = BlockPlan.dense(B, H, S, block)
    res = block_sparse_attention(q, k, v, plan, return_lse=True, backend="reference")
    ref = F.scaled_dot_product_attention(q.double(), k.double(), v.double())
    torch.testing.assert_close(res.out.double(), ref, atol=2e-6, rtol=2e-6)
    lse_ref = torch.logsumexp((q.double() @ k.double().transpose(-1, -2)) / math.sqrt(D), -1)
    torch.testing.assert_close(res.lse.double(), lse_ref, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("D", [64, 128])
def test_random_block_plans_with_permutation(seed, D):
    g = torch.Generator().manual_seed(100 + seed)
    B, H, S, block = 2, 2, 45 + 17 * seed, 16
    q, k, v = rand_qkv(B, H, S, D, seed=seed)
    nb = math.ceil(S / block)
    mask = torch.rand(B, H, nb, nb, generator=g) < 0.35
    mask[0, 0, 0] = False  # an empty query block: its rows must be zero, never NaN
    q_perm = torch.stack([torch.randperm(S, generator=g) for _ in range(B * H)]).view(B, H, S)
    k_perm = torch.stack([torch.randperm(S, generator=g) for _ in range(B * H)]).view(B, H, S)
    plan = BlockPlan.from_block_mask(mask, block, S, q_perm=q_perm, k_perm=k_perm)
    plan.validate()
    res = block_sparse_attention(q, k, v, plan, return_lse=True, return_tile_stats=True, backend="reference")
    ref, lse = masked_attention(q, k, v, plan.token_mask())
    assert torch.isfinite(res.out).all()
    torch.testing.assert_close(res.out.double(), ref, atol=3e-6, rtol=3e-6)
    finite = torch.isfinite(lse)
    assert torch.equal(finite, torch.isfinite(res.lse))
    torch.testing.assert_close(res.lse.double()[finite], lse[finite], atol=3e-5, rtol=1e-5)
    # rows of the empty query block (plan positions 0..block-1 of (0, 0)) are exactly zero
    empty_rows = q_perm[0, 0, :block]
    assert torch.all(res.out[0, 0, empty_rows] == 0)


def test_variable_ranges_and_tile_stats():
    g = torch.Generator().manual_seed(7)
    B, H, S, D = 2, 2, 53, 64
    q, k, v = rand_qkv(B, H, S, D, seed=3)
    # ranges of length 0, 1 and up to 20 tokens, different per (batch, head)
    offs = []
    for _ in range(B * H):
        cuts = torch.sort(torch.randint(0, S + 1, (5,), generator=g)).values
        offs.append(torch.cat([torch.tensor([0]), cuts, torch.tensor([S])]))
    q_off = torch.stack(offs).view(B, H, -1)
    k_off = q_off.flip(0)
    mask = torch.rand(B, H, 6, 6, generator=g) < 0.5
    perm = torch.stack([torch.randperm(S, generator=g) for _ in range(B * H)]).view(B, H, S)
    plan = BlockPlan.from_range_mask(mask, q_off, k_off, q_perm=perm, k_perm=perm)
    plan.validate()
    res = block_sparse_attention(q, k, v, plan, return_lse=True, return_tile_stats=True, backend="reference")
    ref, _ = masked_attention(q, k, v, plan.token_mask())
    torch.testing.assert_close(res.out.double(), ref, atol=3e-6, rtol=3e-6)
    # tile_lse: recompute the largest row log-sum-exp of every selected (query range, key range) pair directly
    s = (q.double() @ k.double().transpose(-1, -2)) / math.sqrt(D)
    for b in range(B):
        for h in range(H):
            sp = s[b, h][perm[b, h]][:, perm[b, h]]
            for i in range(plan.num_q_blocks):
                for slot in range(plan.kv_indices.shape[-1]):
                    got = res.tile_lse[b, h, i, slot]
                    q0, q1 = q_off[b, h, i], q_off[b, h, i + 1]
                    if slot >= plan.kv_counts[b, h, i]:
                        assert got == -math.inf
                        continue
                    j = plan.kv_indices[b, h, i, slot]
                    k0, k1 = k_off[b, h, j], k_off[b, h, j + 1]
                    if q1 == q0 or k1 == k0:
                        assert got == -math.inf
                    else:
                        assert abs(float(got) - float(sp[q0:q1, k0:k1].logsumexp(-1).max())) < 1e-4


def test_cross_lengths_and_low_precision_inputs():
    B, H, Sq, Sk, D = 2, 2, 40, 70, 64
    q, k, v = rand_qkv(B, H, Sq, D, seed=9, sk=Sk)
    mask = torch.rand(B, H, 3, 5, generator=torch.Generator().manual_seed(1)) < 0.6
    plan = BlockPlan.from_block_mask(mask, 16, (Sq, Sk))
    for dtype, tol in ((torch.float32, 3e-6), (torch.bfloat16, 2e-2)):
        res = block_sparse_attention(q.to(dtype), k.to(dtype), v.to(dtype), plan, backend="reference")
        assert res.out.dtype == dtype
        ref, _ = masked_attention(q.to(dtype), k.to(dtype), v.to(dtype), plan.token_mask())
        err = (res.out.double() - ref).norm() / ref.norm()
        assert err < tol


def test_bad_inputs_raise_clear_errors():
    q, k, v = rand_qkv(1, 2, 32, 64)
    plan = BlockPlan.dense(1, 2, 48, 16)
    with pytest.raises(ValueError, match="plan covers"):
        block_sparse_attention(q, k, v, plan)
    with pytest.raises(ValueError, match=r"\[B, H, S, D\]"):
        block_sparse_attention(q[0], k, v, plan)
    with pytest.raises(ValueError, match="unknown backend"):
        block_sparse_attention(q, k, v, BlockPlan.dense(1, 2, 32, 16), backend="nope")


def test_non_contiguous_views_in_diffusers_layout():
    B, S, H, D = 2, 50, 3, 64
    g = torch.Generator().manual_seed(5)
    x = [torch.randn(B, S, H, D, generator=g) for _ in range(3)]
    q, k, v = (t.transpose(1, 2) for t in x)
    assert not q.is_contiguous()
    plan = BlockPlan.dense(B, H, S, 16)
    res = block_sparse_attention(q, k, v, plan)
    ref = F.scaled_dot_product_attention(q.double(), k.double(), v.double())
    torch.testing.assert_close(res.out.double(), ref, atol=2e-6, rtol=2e-6)
