"""SkipCache ("skip"): the mass bound, the greedy budget, re-verification, CFG isolation, memory."""

import math
from dataclasses import dataclass

import pytest
import torch
from dit_sparse.kernels import reference_block_sparse_attention

import dit_sparse
from dit_sparse.config import ConfigError, SparseConfig, WarmupConfig
from dit_sparse.context import AttentionContext
from dit_sparse.core import SparseAttentionCore
from dit_sparse.method import SparseMethod
from dit_sparse.methods import build_method
from dit_sparse.methods.dense import FullPlan, FullPlanConfig
from dit_sparse.methods.skip.cache import SkipState, pack_bits, skip_cache_bytes, tile_log_bounds, unpack_bits
from dit_sparse.methods.skip.method import SkipCache, SkipConfig
from dit_sparse.plan import BlockPlan, token_to_range
from dit_sparse.tracking import StepTracker

BLOCK = 64


def _clustered_qkv(B=2, H=2, S=397, D=64, groups=3, sharp=1.0, seed=0):
    """Each 64-token tile belongs to one random group; queries align with their group's keys.

    Attention concentrates on same-group tiles, so other-group tiles carry tiny (but nonzero) mass.
    """
    g = torch.Generator().manual_seed(seed)
    n_tiles = -(-S // BLOCK)
    centers = torch.randn(B, H, groups, D, generator=g)
    tile_group = torch.randint(0, groups, (B, H, n_tiles), generator=g)
    tok_group = tile_group.repeat_interleave(BLOCK, -1)[..., :S]
    c = torch.gather(centers, 2, tok_group[..., None].expand(B, H, S, D))
    q = sharp * c + 0.3 * torch.randn(B, H, S, D, generator=g)
    k = c + 0.3 * torch.randn(B, H, S, D, generator=g)
    v = torch.randn(B, H, S, D, generator=g)
    return q, k, v, tile_group


def _ctx(branch="cond", layer_name="blocks.0.attn1"):
    return AttentionContext(layer=0, layer_name=layer_name, num_layers=1, step=0, num_steps=None,
                            branch=branch, layout=None, sparsity=0.5)


def _skip(**opts):
    return SkipCache(0.5, SkipConfig(**opts), base=FullPlan(0.5, FullPlanConfig(BLOCK)))


def _call(method, q, k, v, ctx):
    """One sparse call as the core does it: plan, execute with LSE and tile stats, observe."""
    plan = method.plan(q, k, v, ctx)
    res = reference_block_sparse_attention(q, k, v, plan, return_lse=True, return_tile_stats=True)
    method.observe(ctx, plan, res)
    return plan, res


def _dense_probs(q, k):
    s = torch.einsum("bhqd,bhkd->bhqk", q.double(), k.double()) / math.sqrt(q.shape[-1])
    return torch.softmax(s, -1)


def _tile_mass(probs, plan):
    """Exact mass [B, H, S(plan order), NK] of each key range for every query row, plan order."""
    B, H, S, _ = probs.shape
    if plan.q_perm is not None:
        probs = torch.gather(probs, 2, plan.q_perm[..., None].expand(B, H, S, S))
    if plan.k_perm is not None:
        probs = torch.gather(probs, 3, plan.k_perm[:, :, None, :].expand(B, H, S, S))
    k_rng = token_to_range(plan.k_offsets, S)
    out = torch.zeros(B, H, S, plan.num_k_blocks, dtype=probs.dtype)
    return out.scatter_add_(3, k_rng[:, :, None, :].expand(B, H, S, S), probs)


def _skipped_mass_per_row(probs, plan, skip_mask):
    """Exact skipped mass [B, H, S] (plan order rows) for a [B, H, NQ, NK] skip mask."""
    mass = _tile_mass(probs, plan)
    q_rng = token_to_range(plan.q_offsets, probs.shape[2])
    row_skip = torch.gather(skip_mask, 2, q_rng[..., None].expand(-1, -1, -1, skip_mask.shape[-1]))
    return (mass * row_skip).sum(-1)


def _rel_err(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


@dataclass(frozen=True)
class _RaggedConfig:
    pass


class _RaggedBase(SparseMethod):
    """Test base: random permutation, ragged ranges (some empty), a random 70% of pairs selected."""

    name = "_ragged"
    Config = _RaggedConfig

    def __init__(self, sparsity, options, cuts=None, seed=0):
        super().__init__(sparsity, options)
        self.seed, self.cuts = seed, cuts

    def plan(self, q, k, v, ctx):
        B, H, S, _ = q.shape
        g = torch.Generator().manual_seed(self.seed)
        cuts = self.cuts if self.cuts is not None else [0, 50, 50, 170, 300, 301, 420, S]
        off = torch.tensor(cuts, dtype=torch.int32).expand(B, H, -1)
        n = len(cuts) - 1
        mask = torch.rand(B, H, n, n, generator=g) < 0.7
        mask[..., 0] = True
        qp = torch.stack([torch.randperm(S, generator=g) for _ in range(B * H)]).view(B, H, S)
        kp = torch.stack([torch.randperm(S, generator=g) for _ in range(B * H)]).view(B, H, S)
        return BlockPlan.from_range_mask(mask, off, off, q_perm=qp, k_perm=kp)


# ---------------------------------------------------------------------------------------------- bound
@pytest.mark.parametrize("ragged", [False, True])
def test_bound_is_an_upper_bound_of_exact_tile_mass(ragged):
    q, k, v, _ = _clustered_qkv(H=3, S=613 if not ragged else 517, sharp=0.6, seed=1)
    if ragged:
        plan = _RaggedBase(0.5, _RaggedConfig()).plan(q, k, v, None)
    else:
        plan = BlockPlan.dense(2, 3, q.shape[2], BLOCK)
    res = reference_block_sparse_attention(q, k, v, plan, return_lse=True, return_tile_stats=True)
    bound = torch.exp(tile_log_bounds(plan, res.lse, res.tile_lse)).double()  # [B, H, NQ, MAXK]
    probs = _dense_probs(q, k)
    mass = _tile_mass(probs, plan)  # vs dense softmax: the plan's LSE is smaller, so the bound still holds
    q_rng = token_to_range(plan.q_offsets, q.shape[2])
    B, H, NQ, MAXK = bound.shape
    worst = torch.zeros(B, H, NQ, plan.num_k_blocks, dtype=torch.float64)
    worst.scatter_reduce_(2, q_rng[..., None].expand_as(mass), mass, reduce="amax")
    worst_slot = torch.gather(worst, 3, plan.kv_indices.long())
    valid = torch.arange(MAXK) < plan.kv_counts[..., None]
    assert (worst_slot[valid] <= bound[valid] * (1 + 1e-5) + 1e-12).all()
    assert torch.isfinite(bound[valid]).all()
    if not ragged:  # coherent 64-token tiles: the bound is within a small factor of the truth on big tiles
        big = valid & (worst_slot > 1e-3)
        # 7.2x at most here (median 2x); the earlier n_j * exp(tile_max - min lse) needed 200x allowed
        assert big.any() and (bound[big] <= worst_slot[big] * 20).all()


def test_greedy_skipped_mass_per_query_tile_is_within_tol():
    tol = 0.02
    q, k, v, _ = _clustered_qkv(seed=2)
    method = _skip(tol=tol, recheck_every=4, max_skip=0.95)
    ctx = _ctx()
    plan0, _ = _call(method, q, k, v, ctx)  # first call: full base plan, fills the cache
    state: SkipState = method.state_of(ctx)
    skip = unpack_bits(state.bits, plan0.num_k_blocks)
    share = float(skip.float().mean())
    assert share > 0.3, share
    row_mass = _skipped_mass_per_row(_dense_probs(q, k), plan0, skip)
    assert float(row_mass.max()) <= tol
    # The committed budget (summed bounds) is what is checked against tol, and it dominates the truth.
    q_rng = token_to_range(plan0.q_offsets, q.shape[2])
    assert (torch.gather(state.budget.double(), 2, q_rng) >= row_mass - 1e-9).all()
    assert float(state.budget.max()) < tol
    # A tighter tol skips less.
    m2, ctx2 = _skip(tol=0.001, max_skip=0.95), _ctx()
    _call(m2, q, k, v, ctx2)
    assert float(unpack_bits(m2.state_of(ctx2).bits, plan0.num_k_blocks).float().mean()) < share


def test_max_skip_caps_each_row():
    q, k, v, _ = _clustered_qkv(seed=3, sharp=2.0)
    method, ctx = _skip(tol=0.5, max_skip=0.25), _ctx()
    plan0, _ = _call(method, q, k, v, ctx)
    skipped = unpack_bits(method.state_of(ctx).bits, plan0.num_k_blocks).sum(-1)
    assert int(skipped.max()) == math.floor(0.25 * plan0.num_k_blocks)
    plan1, _ = _call(method, q, k, v, ctx)
    assert int((plan0.kv_counts - plan1.kv_counts).max()) <= math.floor(0.25 * plan0.num_k_blocks)


# ---------------------------------------------------------------------------------------------- steps
def test_static_inputs_stay_within_tol_over_steps():
    tol = 0.02
    q, k, v, _ = _clustered_qkv(seed=4)
    probs = _dense_probs(q, k)
    dense = reference_block_sparse_attention(q, k, v, BlockPlan.dense(2, 2, q.shape[2], BLOCK)).out
    method, ctx = _skip(tol=tol, recheck_every=3), _ctx()
    shares = []
    for _ in range(5):
        plan, res = _call(method, q, k, v, ctx)
        skipped = ~plan.block_mask()
        # Bounds from earlier calls still hold for identical inputs: every row loses at most tol.
        assert float(_skipped_mass_per_row(probs, plan, skipped).max()) <= tol
        assert _rel_err(res.out, dense) <= tol
        shares.append(float(skipped.float().mean()))
    assert shares[0] == 0.0 and min(shares[1:]) > 0.2
    stats = method.skip_stats()
    assert 0.2 < stats["skipped_tile_share"] < 1.0
    assert set(stats["per_layer"]) == {"blocks.0.attn1"}


@pytest.mark.parametrize("recheck_every", [3, 0])
def test_recheck_revokes_a_skip_when_a_tile_becomes_important(recheck_every):
    q, k, v, tile_group = _clustered_qkv(seed=5, sharp=1.0)
    method, ctx = _skip(tol=0.02, recheck_every=recheck_every), _ctx()
    for _ in range(2):
        plan, _ = _call(method, q, k, v, ctx)
    skip = unpack_bits(method.state_of(ctx).bits, plan.num_k_blocks)
    # A (query tile, key tile) pair skipped in (b, h) = (0, 0): make that key tile match the query tile.
    qi, kj = (int(x) for x in skip[0, 0].nonzero()[0])
    k2 = k.clone()
    k2[0, 0, kj * BLOCK:(kj + 1) * BLOCK] = 3.0 * q[0, 0, qi * BLOCK:(qi + 1) * BLOCK].mean(0)
    dense = reference_block_sparse_attention(q, k2, v, BlockPlan.dense(2, 2, q.shape[2], BLOCK)).out
    computed = []
    for _ in range(4):
        plan, res = _call(method, q, k2, v, ctx)
        computed.append(bool(plan.block_mask()[0, 0, qi, kj]))
    row = slice(qi * BLOCK, (qi + 1) * BLOCK)
    err_row = _rel_err(res.out[0, 0, row], dense[0, 0, row])
    if recheck_every:
        assert any(computed) and computed[-1], computed  # re-verified, then kept
        assert err_row < 0.05
    else:
        assert not any(computed)  # LiteAttention-like: never re-checked, the error stays
        assert err_row > 0.2


def test_base_plan_changes_drop_stale_cache_and_keep_rows_nonempty():
    q, k, v, _ = _clustered_qkv(H=1, S=517, sharp=1.5, seed=6)
    base = _RaggedBase(0.5, _RaggedConfig())
    method = SkipCache(0.5, SkipConfig(tol=0.05, recheck_every=0, drift_threshold=0.1), base=base)
    ctx = _ctx()
    _call(method, q, k, v, ctx)
    _call(method, q, k, v, ctx)
    state = method.state_of(ctx)
    assert bool(unpack_bits(state.bits, 7).any())
    base.cuts = [0, 20, 200, 210, 300, 400, 401, 517]  # sizes move by far more than 10% of tokens
    plan, _ = _call(method, q, k, v, ctx)
    base_plan = base.plan(q, k, v, ctx)
    assert torch.equal(plan.kv_counts, base_plan.kv_counts)  # cache dropped: the full base plan ran
    assert ((plan.kv_counts > 0) | (base_plan.kv_counts == 0)).all()


def test_update_every_learns_on_every_nth_call_and_reuses_the_plan_in_between(monkeypatch):
    """`update_every=3` through the core: statistics are asked for (and the cache learns) on calls 0, 3, 6
    only; in between the same executed plan object runs, which is the base plan minus the cached skips,
    and every row still loses at most `tol` of its mass on these static inputs."""
    import dit_sparse.core as core_mod

    tol = 0.02
    method, _ = build_method("full+skip", 0.5, {"tol": tol, "update_every": 3, "recheck_every": 2})
    tracker = StepTracker()
    core = SparseAttentionCore(SparseConfig("full+skip", 0.5, WarmupConfig(0, 0)), method, tracker, 1,
                               backend="reference")
    q, k, v, _ = _clustered_qkv(B=1, H=2, S=333, seed=9)
    probs = _dense_probs(q, k)
    seen = []
    run = core_mod.run_backend

    def spy(name, qq, kk, vv, plan, **kw):
        seen.append((kw["return_tile_stats"], kw["return_lse"], plan))
        return run(name, qq, kk, vv, plan, **kw)

    monkeypatch.setattr(core_mod, "run_backend", spy)
    for i in range(8):
        tracker.begin_forward(900.0 - i, "cond", None, None)
        core.attend(*(t.transpose(1, 2) for t in (q, k, v)), layer=0, layer_name="blocks.0.attn1",
                    dense_fn=lambda: None)
    assert [s[0] for s in seen] == [i % 3 == 0 for i in range(8)]
    assert [s[1] for s in seen] == [s[0] for s in seen]
    state = method.state_of(tracker.context(0, "blocks.0.attn1", 1, 0.5, None))
    assert state.updates == 3 and state.calls == 8
    assert seen[4][2] is seen[5][2]  # nothing learnt between calls 4 and 5: the same plan object
    assert seen[1][2] is not seen[4][2]  # call 3 learnt: a new plan afterwards
    base = method.base.plan(q, k, v, tracker.context(0, "blocks.0.attn1", 1, 0.5, None))
    skip = unpack_bits(state.bits, base.num_k_blocks)
    assert torch.equal(seen[7][2].block_mask(), base.block_mask() & ~skip) and bool(skip.any())
    for _, _, plan in seen:
        assert float(_skipped_mass_per_row(probs, plan, ~plan.block_mask()).max()) <= tol


def test_an_empty_cache_backs_off_learning_and_runs_the_base_plan_itself():
    """Where nothing is negligible (tol far below any tile's bound) the cache stays empty: learning calls
    come at doubling intervals up to `max_idle_interval` (calls 0, 1, 3, 7, 15, 23 for update_every=1, cap
    8), and every call runs the base plan object itself (nothing to take out of it)."""
    q, k, v, _ = _clustered_qkv(seed=5)
    method, ctx = _skip(tol=1e-30, max_idle_interval=8), _ctx()
    learnt, plans = [], []
    for _ in range(26):
        plan = method.plan(q, k, v, ctx)
        learnt.append(method.state_of(ctx).pending is not None)
        res = reference_block_sparse_attention(q, k, v, plan, return_lse=True, return_tile_stats=True)
        method.observe(ctx, plan, res)
        plans.append(plan)
    assert [i for i, x in enumerate(learnt) if x] == [0, 1, 3, 7, 15, 23]
    base = method.base.plan(q, k, v, ctx)
    assert all(p is base for p in plans)  # learning or not: the base plan object, no new plan to prepare


def test_skips_found_restore_the_learning_cadence():
    """Once a learning call caches skips, learning returns to every `update_every` calls (re-checks)."""
    q, k, v, _ = _clustered_qkv(seed=4)
    method, ctx = _skip(tol=0.02, update_every=2, max_idle_interval=16), _ctx()
    learnt = []
    for _ in range(9):
        plan = method.plan(q, k, v, ctx)
        learnt.append(method.state_of(ctx).pending is not None)
        res = reference_block_sparse_attention(q, k, v, plan, return_lse=True, return_tile_stats=True)
        method.observe(ctx, plan, res)
    assert bool(method.state_of(ctx).bits.bool().any())
    assert [i for i, x in enumerate(learnt) if x] == [0, 2, 4, 6, 8]


def test_max_idle_interval_must_be_a_positive_integer():
    for bad in (0, -2, 1.5, "4"):
        with pytest.raises(ConfigError, match="max_idle_interval"):
            SkipConfig(max_idle_interval=bad)


# ---------------------------------------------------------------------------------------------- CFG
def test_cfg_branches_keep_separate_caches_through_the_core():
    method, _ = build_method("full+skip", 0.5, {"tol": 0.02})
    tracker = StepTracker()
    core = SparseAttentionCore(SparseConfig("full+skip", 0.5, WarmupConfig(0, 0)), method, tracker, 1,
                               backend="reference")
    q, k, v, _ = _clustered_qkv(B=1, H=2, S=333, seed=7)  # concentrated: "cond" skips a lot
    g = torch.Generator().manual_seed(8)
    diffuse = [0.05 * torch.randn(1, 2, 333, 64, generator=g) for _ in range(2)]  # near-uniform attention

    def attend(branch, qq, kk, t):
        tracker.begin_forward(t, branch, None, None)
        x = [t_.transpose(1, 2) for t_ in (qq, kk, v[:1])]
        return core.attend(*x, layer=0, layer_name="blocks.0.attn1", dense_fn=lambda: None)

    for t in (900.0, 800.0, 700.0):
        attend("cond", q, k, t)
        attend("uncond", *diffuse, t)
    states = {key: s.of(method) for key, s in tracker.states.items()}
    assert set(states) == {("blocks.0.attn1", "cond"), ("blocks.0.attn1", "uncond")}
    cond, uncond = states[("blocks.0.attn1", "cond")], states[("blocks.0.attn1", "uncond")]
    assert cond is not uncond and cond.calls == uncond.calls == 3
    assert float(unpack_bits(cond.bits, 6).float().mean()) > 0.3
    assert not bool(unpack_bits(uncond.bits, 6).any())


# ---------------------------------------------------------------------------------------------- memory
def test_bit_packing_round_trip_and_memory_formula():
    g = torch.Generator().manual_seed(9)
    for n in (1, 7, 8, 13, 1182):
        m = torch.rand(2, 3, 5, n, generator=g) < 0.4
        p = pack_bits(m)
        assert p.dtype == torch.uint8 and p.shape[-1] == -(-n // 8)
        assert torch.equal(unpack_bits(p, n), m)
    # Wan2.1-14B 720p, worked out by hand: 75,600 / 64 -> 1,182 query and key ranges; 1,182 skip bits take
    # 148 bytes, plus a 4-byte float32 budget: 152 bytes for each of 40 layers x 2 branches x 40 heads x
    # 1,182 query ranges = 3,782,400 rows -> 574,924,800 bytes.
    wan14b = skip_cache_bytes(num_layers=40, heads=40, tokens=75_600, block=64, branches=2)
    assert wan14b == 574_924_800
    assert wan14b <= 0.8e9 and wan14b <= 0.01 * 80e9


def _measured_cache_bytes(S, B, H, block, layers, branches, permuted):
    """Bytes the skip caches of `layers` x `branches` (layer, CFG branch) states really hold."""
    q, k, v, _ = _clustered_qkv(B=B, H=H, S=S, seed=10)
    if permuted:  # fixed 64-token blocks over a token order: range membership hashes are kept too
        assert block == BLOCK
        perm = torch.randperm(S, generator=torch.Generator().manual_seed(0))
        base = _PermutedBlocks(0.5, _RaggedConfig(), perm)
    else:
        base = FullPlan(0.5, FullPlanConfig(block))
    method = SkipCache(0.5, SkipConfig(), base=base)
    total = 0
    for layer in range(layers):
        for branch in ("cond", "uncond")[:branches]:
            ctx = _ctx(branch=branch, layer_name=f"blocks.{layer}.attn1")
            for _ in range(2):  # the first call fills the cache, the second runs from it
                _call(method, q, k, v, ctx)
            total += method.state_of(ctx).nbytes()
    return total


@pytest.mark.parametrize("S, B, H, block, layers, branches, permuted", [
    (397, 2, 2, 64, 1, 1, False),  # 7 ranges: one byte of bits per row
    (512, 1, 3, 64, 2, 2, False),  # exactly 8 ranges: still one byte
    (1100, 1, 2, 128, 1, 2, False),  # 9 ranges: two bytes
    (300, 2, 1, 16, 2, 1, False),  # 19 ranges: three bytes
    (397, 2, 2, 64, 1, 2, True),  # a token order: membership hashes of the query and key ranges
    (512, 1, 2, 64, 2, 1, True),
])
def test_memory_formula_matches_what_real_caches_hold(S, B, H, block, layers, branches, permuted):
    expected = skip_cache_bytes(layers, H, S, block, branches=branches, batch=B, variable_ranges=permuted)
    assert _measured_cache_bytes(S, B, H, block, layers, branches, permuted) == expected


def test_update_every_must_be_a_positive_integer():
    for bad in (0, -1, 1.5):
        with pytest.raises(ConfigError, match="update_every"):
            SkipConfig(update_every=bad)


def test_config_errors_are_clear():
    with pytest.raises(ConfigError, match="tol must lie"):
        SkipConfig(tol=1.5)
    with pytest.raises(ConfigError, match="max_skip"):
        SkipConfig(max_skip=1.0)
    with pytest.raises(ConfigError, match="recheck_every"):
        SkipConfig(recheck_every=-1)
    with pytest.raises(ConfigError, match="refines another method"):
        build_method("skip", 0.5, {})
    with pytest.raises(ConfigError, match="does not exist"):
        build_method("full+skip", 0.5, {"calibration": "/nonexistent/skip.json"})


# ---------------------------------------------------------------------------------------------- end to end
@torch.no_grad()
def test_full_plus_skip_on_tiny_wan_skips_on_concentrated_attention(coherent_tiny_wan):
    model, x, e = coherent_tiny_wan()
    ts = [900.0, 800.0, 700.0, 600.0]
    ref = [model(x, torch.tensor([t]), e, return_dict=False)[0] for t in ts]
    handle = dit_sparse.apply(model, "full+skip", 0.5, warmup_steps=0, warmup_layers=0, backend="reference")
    outs = [model(x, torch.tensor([t]), e, return_dict=False)[0] for t in ts]
    stats, skip = handle.stats(), handle.method.skip_stats()
    handle.remove()
    assert handle.tracker.step == len(ts) - 1
    assert stats["sparse_calls"] == 2 * len(ts)
    assert skip["skipped_tile_share"] > 0.2 and stats["sparsity_in_sparse_calls"] > 0.2
    assert set(skip["per_layer"]) == {"blocks.0.attn1", "blocks.1.attn1"}
    assert _rel_err(outs[0], ref[0]) < 1e-4  # first call runs the full base plan
    assert max(_rel_err(o, r) for o, r in zip(outs, ref)) < 0.02


class _PermutedBlocks(SparseMethod):
    """Test base: fixed 64-token blocks over a token order that the test can change (like semantic's
    cluster-sorted blocks), every pair selected."""

    name = "_permuted_blocks"
    Config = _RaggedConfig

    def __init__(self, sparsity, options, perm):
        super().__init__(sparsity, options)
        self.perm = perm

    def plan(self, q, k, v, ctx):
        B, H, S, _ = q.shape
        n = -(-S // BLOCK)
        mask = torch.ones(B, H, n, n, dtype=torch.bool)
        p = self.perm.expand(B, H, S)
        return BlockPlan.from_block_mask(mask, BLOCK, S, q_perm=p, k_perm=p)


def test_membership_changes_at_constant_sizes_forget_exactly_the_moved_ranges():
    from dit_sparse.methods.skip.cache import range_hashes

    q, k, v, _ = _clustered_qkv(B=1, H=1, S=512, sharp=2.0, seed=11)
    g = torch.Generator().manual_seed(0)
    # Whole 64-token tiles in a shuffled order: each plan block is one concentrated tile of the inputs.
    perm = (torch.randperm(8, generator=g)[:, None] * BLOCK + torch.arange(BLOCK)).reshape(-1)
    base = _PermutedBlocks(0.5, _RaggedConfig(), perm)
    method = SkipCache(0.5, SkipConfig(tol=0.2, recheck_every=0, drift_threshold=0.5), base=base)
    ctx = _ctx()
    _call(method, q, k, v, ctx)
    _call(method, q, k, v, ctx)
    state = method.state_of(ctx)
    before = unpack_bits(state.bits, 8)
    assert bool(before[0, 0, 2].any()) and bool(before[:, :, :, 5].any())  # skips in row 2 and column 5
    # Swap one token of block 2 with one of block 5: sizes unchanged, two ranges change membership.
    moved = perm.clone()
    moved[2 * BLOCK], moved[5 * BLOCK] = perm[5 * BLOCK], perm[2 * BLOCK]
    old_h = range_hashes(torch.arange(0, 513, BLOCK, dtype=torch.int32).view(1, 1, -1), perm.view(1, 1, -1), 512)
    new_h = range_hashes(torch.arange(0, 513, BLOCK, dtype=torch.int32).view(1, 1, -1), moved.view(1, 1, -1), 512)
    assert (old_h != new_h).nonzero()[:, -1].tolist() == [2, 5]
    base.perm = moved
    refined = method.refine(base.plan(q, k, v, ctx), state, 0.2)
    after = unpack_bits(state.bits, 8)
    assert not after[0, 0, 2].any() and not after[0, 0, 5].any()  # moved query rows forgotten
    assert not after[:, :, :, 2].any() and not after[:, :, :, 5].any()  # moved key columns forgotten
    others = [i for i in range(8) if i not in (2, 5)]
    kept = before[0, 0][others][:, others]
    assert torch.equal(after[0, 0][others][:, others], kept)  # the rest of the cache is kept
    assert bool(refined.block_mask()[0, 0, 2].all())  # the moved row runs its whole base plan
