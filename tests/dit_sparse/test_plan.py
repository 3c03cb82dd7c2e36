import dataclasses

import pytest
import torch

from dit_sparse.plan import TENSOR_FIELDS, BlockPlan


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


def test_permute_tokens_matches_gather_for_every_layout():
    from dit_sparse.plan import permute_tokens, shares_order

    g = torch.Generator().manual_seed(3)
    B, S, H, D = 2, 37, 3, 8
    base = torch.randn(B, S, H, D, generator=g)
    layouts = {
        "diffusers [B,S,H,D] view": base.transpose(1, 2),
        "contiguous": base.transpose(1, 2).contiguous(),
        "odd strides": torch.randn(B, H, S, D + 3, generator=g)[..., 1 : D + 1],  # rows not whole: fallback
    }
    per_head = torch.stack([torch.randperm(S, generator=g) for _ in range(B * H)]).view(B, H, S)
    shared = torch.randperm(S, generator=g).view(1, 1, S).expand(B, H, S)
    assert shares_order(shared) and not shares_order(per_head)
    assert shares_order(torch.randperm(S, generator=g).view(1, 1, S).expand(1, H, S))  # B = 1 keeps stride S
    for name, x in layouts.items():
        for perm in (per_head, shared):
            want = torch.gather(x, 2, perm[..., None].expand(B, H, S, D))
            got = permute_tokens(x, perm)
            assert torch.equal(got, want), name


def test_compact_indices_lists_selected_positions_first_in_order() -> None:
    from dit_sparse.plan import compact_indices

    g = torch.Generator().manual_seed(5)
    for n in (1, 7, 64):
        mask = torch.rand(2, 3, 5, n, generator=g) < 0.4
        mask[0, 0, 0] = False  # an empty row
        mask[0, 0, 1] = True  # a full row
        idx, counts = compact_indices(mask)
        assert idx.dtype == counts.dtype == torch.int32 and idx.shape == mask.shape
        for row, m, c in zip(idx.reshape(-1, n), mask.reshape(-1, n), counts.reshape(-1)):
            sel = torch.nonzero(m).flatten().int()
            assert int(c) == sel.numel()
            assert torch.equal(row[: int(c)], sel) and not row[int(c):].any()


def test_tensor_fields_name_every_tensor_field_of_a_plan():
    """CUDA graphs and the Triton preparation rebuild plans from TENSOR_FIELDS: it must stay complete."""
    perm = torch.randperm(40).expand(1, 2, 40)
    plan = BlockPlan.from_block_mask(torch.rand(1, 2, 3, 3) < 0.5, 16, 40, q_perm=perm, k_perm=perm)
    tensors = [f.name for f in dataclasses.fields(BlockPlan) if isinstance(getattr(plan, f.name), torch.Tensor)]
    assert tuple(tensors) == TENSOR_FIELDS
