import pytest
import torch

from dit_sparse.plan import BlockPlan


def test_block_mask_roundtrip_and_density():
    g = torch.Generator().manual_seed(0)
    mask = torch.rand(2, 3, 5, 4, generator=g) < 0.4
    plan = BlockPlan.from_block_mask(mask, (16, 20), (70, 65))
    plan.validate()
    assert torch.equal(plan.block_mask(), mask)
    tm = plan.token_mask()
    assert tm.shape == (2, 3, 70, 65)
    assert abs(plan.density() - tm.double().mean().item()) < 1e-12
    assert torch.equal(plan.pair_counts(), tm.sum((-1, -2)))


def test_padded_index_slots_do_not_hide_selection():
    # row selecting only block 0 plus padding slots that also hold 0
    mask = torch.zeros(1, 1, 2, 3, dtype=torch.bool)
    mask[0, 0, 0, 0] = True
    mask[0, 0, 1] = True
    plan = BlockPlan.from_block_mask(mask, 8, (16, 24))
    assert torch.equal(plan.block_mask(), mask)


def test_dense_plan_density_is_one():
    assert BlockPlan.dense(2, 2, 37, 16).density() == 1.0


def test_validate_rejects_malformed_plans():
    plan = BlockPlan.dense(1, 1, 32, 16)
    bad = BlockPlan(plan.q_offsets, plan.k_offsets, plan.kv_indices + 5, plan.kv_counts)
    with pytest.raises(ValueError, match="kv_indices"):
        bad.validate()
    with pytest.raises(ValueError, match="blocks"):
        BlockPlan.from_block_mask(torch.ones(1, 1, 3, 3, dtype=torch.bool), 16, 32)
