import pytest
import torch

from dit_sparse.methods.budget import block_mass, select_blocks


def _random_case(seed, B=2, H=3, NQ=13, NK=29, empty=True):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, H, NQ, NK, generator=g) * 2.0
    qs = torch.randint(1, 40, (B, H, NQ), generator=g)
    ks = torch.randint(1, 40, (B, H, NK), generator=g)
    if empty:  # clusters can be empty: they must cost nothing and never be selected
        qs[..., 3] = 0
        ks[..., 5] = 0
    return logits, qs, ks


def _pairs(mask, qs, ks):
    return (mask.long() * qs[..., :, None] * ks[..., None, :]).sum((-1, -2))


def _rank0_cost(logits, qs, ks):
    """Cost of every live query range's single highest-logit live key range (the hard floor)."""
    best = logits.masked_fill((ks == 0)[..., None, :], float("-inf")).argmax(-1)
    return (qs * torch.gather(ks, -1, best)).sum(-1)


def test_block_mass_weights_by_range_size_and_ignores_empty_ranges():
    logits = torch.tensor([[[[0.0, 0.0, 5.0]]]])
    ks = torch.tensor([[[3, 1, 0]]])
    p = block_mass(logits, ks)
    torch.testing.assert_close(p, torch.tensor([[[[0.75, 0.25, 0.0]]]]))


@pytest.mark.parametrize("sparsity", [0.5, 0.9, 0.97])
@pytest.mark.parametrize("seed", [0, 1])
def test_budget_is_met_up_to_one_range_per_query_and_rows_are_never_empty(sparsity, seed):
    logits, qs, ks = _random_case(seed)
    mask = select_blocks(logits, qs, ks, sparsity, top_p=1.0, min_blocks=2)
    total = qs.sum(-1) * ks.sum(-1)
    allowed = torch.floor(total * (1 - sparsity))
    pairs = _pairs(mask, qs, ks)
    assert (pairs <= torch.maximum(allowed, _rank0_cost(logits, qs, ks))).all()
    live_rows = mask.any(-1)
    assert torch.equal(live_rows, qs > 0)  # every non-empty query range has a key range, empty ones none
    assert not mask[..., 5].any()  # empty key range never selected
    # top_p = 1 fills the budget: what is left is smaller than the largest block.
    if sparsity < 0.97:
        max_block = (qs[..., :, None] * ks[..., None, :]).flatten(-2).max(-1).values
        assert (allowed - pairs < max_block).all()


def test_top_p_makes_peaked_rows_sparser_than_the_budget():
    B, H, NQ, NK = 1, 2, 6, 10
    logits = torch.full((B, H, NQ, NK), -20.0)
    logits[..., torch.arange(NQ), torch.arange(NQ)] = 20.0  # each query range looks at one key range
    sizes_q = torch.full((B, H, NQ), 10)
    sizes_k = torch.full((B, H, NK), 10)
    mask = select_blocks(logits, sizes_q, sizes_k, 0.5, top_p=0.9, min_blocks=1)
    assert torch.equal(mask[0, 0], torch.eye(NQ, NK, dtype=torch.bool))
    # With top_p = 1 the same budget is filled far beyond the diagonal.
    full = select_blocks(logits, sizes_q, sizes_k, 0.5, top_p=1.0, min_blocks=1)
    assert full.sum() > 3 * mask.sum()


def test_greedy_prefers_high_probability_blocks():
    logits = torch.zeros(1, 1, 2, 4)
    logits[0, 0, 0, 2] = 6.0
    logits[0, 0, 1, 1] = 6.0
    sizes = torch.tensor([[[10, 10, 10, 10]]])
    mask = select_blocks(logits, sizes[..., :2], sizes, 0.74, top_p=1.0)  # budget: 2 blocks of 80
    expected = torch.zeros(1, 1, 2, 4, dtype=torch.bool)
    expected[0, 0, 0, 2] = expected[0, 0, 1, 1] = True
    assert torch.equal(mask, expected)


def test_forced_text_ranges_are_always_selected_and_paid_first():
    logits, qs, ks = _random_case(3, empty=False)
    fq = torch.zeros(13, dtype=torch.bool)
    fq[-1] = True
    fk = torch.zeros(29, dtype=torch.bool)
    fk[-1] = True
    mask = select_blocks(logits, qs, ks, 0.9, top_p=1.0, force_q=fq, force_k=fk)
    assert mask[..., -1, :].all() and mask[..., :, -1].all()
    total = qs.sum(-1) * ks.sum(-1)
    forced = (qs[..., -1] * ks.sum(-1)) + (qs[..., :-1].sum(-1) * ks[..., -1])
    rank0 = _rank0_cost(logits[..., :-1, :-1], qs[..., :-1], ks[..., :-1])
    pairs = _pairs(mask, qs, ks)
    assert (pairs <= torch.maximum(torch.floor(total * 0.1), forced + rank0)).all()


def test_layer_scope_shares_the_budget_between_heads():
    B, H, N = 1, 2, 8
    logits = torch.zeros(B, H, N, N)
    logits[:, 0] = torch.eye(N) * 30  # head 0: one key range per query range is all it needs
    sizes = torch.full((B, H, N), 16)
    head = select_blocks(logits, sizes, sizes, 0.75, top_p=0.99, budget_scope="head")
    layer = select_blocks(logits, sizes, sizes, 0.75, top_p=0.99, budget_scope="layer")
    total = N * N * 16 * 16
    assert _pairs(head, sizes, sizes)[0, 1] <= total * 0.25
    assert _pairs(layer, sizes, sizes)[0, 1] > total * 0.25  # head 1 used what head 0 left
    assert _pairs(layer, sizes, sizes).sum() <= 2 * total * 0.25


def test_bad_arguments_raise():
    logits, qs, ks = _random_case(0)
    with pytest.raises(ValueError, match="sparsity"):
        select_blocks(logits, qs, ks, 1.0)
    with pytest.raises(ValueError, match="top_p"):
        select_blocks(logits, qs, ks, 0.9, top_p=0.0)
    with pytest.raises(ValueError, match="budget_scope"):
        select_blocks(logits, qs, ks, 0.9, budget_scope="model")


@pytest.mark.parametrize("n", [7, 1024, 1025, 5000])
def test_two_level_cumsum_is_exact(n: int) -> None:
    from dit_sparse.methods.budget import _cumsum

    g = torch.Generator().manual_seed(n)
    x = torch.randint(0, 16385, (2, 3, n), generator=g, dtype=torch.int64)
    assert torch.equal(_cumsum(x), torch.cumsum(x, -1))


def test_top_p_one_fills_the_budget_to_within_one_block() -> None:
    # top_p = 1 skips the per-row sort (every candidate is eligible) and the long pools (1,600 blocks)
    # take the two-level scan: the greedy prefix still stops at the budget, within one block of it.
    g = torch.Generator().manual_seed(3)
    B, H, NQ, NK = 2, 3, 40, 40  # 1,600 blocks per pool: the two-level scan runs
    logits = torch.randn(B, H, NQ, NK, generator=g) * 3
    sizes = torch.randint(1, 65, (B, H, NQ), generator=g)
    full = select_blocks(logits, sizes, sizes, 0.8, top_p=1.0)
    cost = sizes[..., :, None] * sizes[..., None, :]
    spent = (cost * full).sum((-1, -2))
    total = sizes.sum(-1) ** 2
    assert (spent <= (total * 0.2).floor()).all()
    assert (spent + cost.max() > (total * 0.2).floor()).all()  # within one block of the budget
