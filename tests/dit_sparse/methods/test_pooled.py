import math

import pytest
import torch
from dit_sparse.kernels import reference_block_sparse_attention

from dit_sparse.context import AttentionContext
from dit_sparse.layout import VideoLayout
from dit_sparse.methods import build_method
from dit_sparse.methods.pooled import mean_pool


def _ctx(layout=None):
    return AttentionContext(1, "blocks.1.attn1", 2, 3, 10, "cond", layout, 0.9)


def test_mean_pool_handles_a_short_last_block():
    x = torch.randn(2, 3, 70, 8, generator=torch.Generator().manual_seed(0))
    pooled = mean_pool(x, 32)
    assert pooled.shape == (2, 3, 3, 8)
    torch.testing.assert_close(pooled[:, :, 1], x[:, :, 32:64].mean(2))
    torch.testing.assert_close(pooled[:, :, 2], x[:, :, 64:].mean(2))


@pytest.mark.parametrize("sparsity", [0.7, 0.9])
def test_plan_is_valid_fixed_blocks_and_meets_the_target(sparsity):
    g = torch.Generator().manual_seed(1)
    B, H, S, D = 2, 2, 1000, 64
    q, k, v = (torch.randn(B, H, S, D, generator=g) for _ in range(3))
    method, _ = build_method("pooled", sparsity, {"top_p": 1.0})
    plan = method.plan(q, k, v, _ctx())
    plan.validate()
    assert plan.block_size == (64, 64) and plan.q_perm is None and plan.num_q_blocks == 16
    assert 1 - plan.density() >= sparsity - 64 * S / S**2  # one block column per query row at most
    assert 1 - plan.density() <= sparsity + 0.05  # top_p = 1 spends the budget
    assert plan.kv_counts.min() >= 1


def test_local_attention_selects_the_diagonal_blocks():
    # Keys equal to slowly varying queries: every block's strongest partner is itself.
    B, H, S, D = 1, 2, 512, 64
    t = torch.linspace(0, 6 * math.pi, S)
    freqs = torch.arange(1, D + 1) / D
    q = torch.sin(t[:, None] * freqs[None, :] + freqs[None, :] * 7).expand(B, H, S, D) * 4
    method, _ = build_method("pooled", 0.8, {"block_size": 32})
    plan = method.plan(q, q, q, _ctx())
    mask = plan.block_mask()
    assert mask[..., torch.arange(16), torch.arange(16)].all()
    ref = torch.softmax(q @ q.transpose(-1, -2) / 8, -1) @ q
    out = reference_block_sparse_attention(q, q, q, plan).out
    assert float((out - ref).norm() / ref.norm()) < 0.1


@pytest.mark.parametrize("text_first", [True, False])
def test_text_blocks_are_attended_in_both_directions(text_first):
    layout = VideoLayout(2, 10, 20, text_tokens=50, text_first=text_first)  # 450 tokens, text not block-aligned
    S = layout.seq_len
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(2, 2, S, 64, generator=g) for _ in range(3))
    method, _ = build_method("pooled", 0.9, {})
    plan = method.plan(q, k, v, _ctx(layout))
    plan.validate()
    tm = plan.token_mask()
    text = slice(0, 50) if text_first else slice(S - 50, S)
    assert tm[:, :, text, :].all() and tm[:, :, :, text].all()
    assert not tm.all()


def test_bad_block_size_raises():
    with pytest.raises(ValueError, match="power of two"):
        build_method("pooled", 0.9, {"block_size": 48})
