import math

import pytest
import torch
from dit_sparse.kernels import reference_block_sparse_attention

import dit_sparse
from dit_sparse.context import AttentionContext
from dit_sparse.layout import VideoLayout
from dit_sparse.methods import build_method
from dit_sparse.methods.semantic import method as sem
from dit_sparse.methods.semantic.kmeans import KMeansResult
from dit_sparse.state import LayerStates


def _ctx(layout=None, states=None):
    return AttentionContext(
        layer=1, layer_name="blocks.1.attn1", num_layers=2, step=3, num_steps=10, branch="cond",
        layout=layout, sparsity=0.9, states=LayerStates() if states is None else states,
    )


def _randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def planted_qkv(B=2, H=2, S=777, D=64, groups=6, seed=0):
    """q/k around shared per-head centres with random membership: attention is concentrated inside a
    group after sorting by cluster, while natural token order has no locality at all."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(B, H, groups, D, generator=g) * 1.5
    pick = lambda idx: torch.gather(centres, 2, idx[..., None].expand(-1, -1, -1, D))
    q = pick(torch.randint(0, groups, (B, H, S), generator=g)) + 0.3 * torch.randn(B, H, S, D, generator=g)
    k = pick(torch.randint(0, groups, (B, H, S), generator=g)) + 0.3 * torch.randn(B, H, S, D, generator=g)
    return q, k, torch.randn(B, H, S, D, generator=g)


def _dense(q, k, v):
    return torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), -1) @ v


def _rel(a, b):
    return float((a - b).norm() / b.norm())


def test_default_cluster_counts_scale_with_sequence_length():
    assert sem.default_clusters(4096) == (32, 128)
    assert sem.default_clusters(32760) == (128, 256)
    assert sem.default_clusters(200) == (8, 48)
    assert sem.default_clusters(20) == (8, 20)
    assert sem.default_clusters(10**6) == (256, 800)
    counts = [sem.default_clusters(s) for s in (1000, 4096, 17550, 32760, 75600)]
    assert counts == sorted(counts)  # monotone in S


def test_exact_cluster_layout_uses_fine_clusters_and_blocks_the_default_ones():
    assert sem.fine_clusters(4096) == (128, 512)
    assert sem.fine_clusters(200) == (8, 32) and sem.fine_clusters(20) == (8, 20)
    assert sem.fine_clusters(10**6) == (256, 1024)
    method, _ = build_method("semantic", 0.9, {})
    assert method.cluster_counts(4096) == (128, 512)  # "auto": exact clusters below 8,192 tokens
    assert method.cluster_counts(32760) == sem.default_clusters(32760)  # blocks layout above
    # 8,192-16,383 tokens (the bundled model v2): exact clusters, with the default (coarser) counts
    assert not method.blocked(8192) and method.blocked(16384) and method.blocked(32760)
    assert method.cluster_counts(8192) == sem.default_clusters(8192) == (48, 160)
    forced, _ = build_method("semantic", 0.9, {"layout": "clusters", "num_k_clusters": 300})
    assert forced.cluster_counts(32760) == (128, 300)  # explicit counts win; long sequences keep coarse ones
    clusters, _ = build_method("semantic", 0.9, {"layout": "clusters"})
    assert clusters.cluster_counts(4096) == (128, 512)
    assert clusters.cluster_counts(17550) == sem.default_clusters(17550)  # fine ones are slow there


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("sparsity", [0.75, 0.9])
def test_plan_is_valid_and_meets_the_target_on_random_inputs(dtype, sparsity):
    B, H, S, D = 2, 2, 411, 64
    q, k, v = (_randn(B, H, S, D, seed=i).to(dtype) for i in range(3))
    method, _ = build_method("semantic", sparsity, {"top_p": 1.0})
    plan = method.plan(q, k, v, _ctx())
    plan.validate()
    assert plan.q_perm.dtype == torch.int64 and plan.q_perm.shape == (B, H, S)
    nq, nk = method.cluster_counts(S)
    assert plan.num_q_blocks == nq and plan.num_k_blocks == nk
    # At most one key cluster per query cluster above the budget (the floor), and not far below it.
    k_len = (plan.k_offsets[..., 1:] - plan.k_offsets[..., :-1]).long()
    slack = (plan.q_offsets[..., 1:] - plan.q_offsets[..., :-1]).long().sum(-1) * k_len.max(-1).values
    pairs = plan.pair_counts()
    assert (pairs <= math.floor((1 - sparsity) * S * S) + slack).all()
    assert 1 - plan.density() >= sparsity - 0.02
    out = reference_block_sparse_attention(q, k, v, plan).out
    assert out.dtype == dtype and torch.isfinite(out).all()


@pytest.mark.parametrize("text_first", [True, False])
def test_text_tokens_are_attended_in_both_directions(text_first):
    B, H, D = 2, 2, 64
    layout = VideoLayout(3, 6, 10, text_tokens=21, text_first=text_first)
    S = layout.seq_len
    q, k, v = planted_qkv(B, H, S, D)
    method, _ = build_method("semantic", 0.9, {})
    plan = method.plan(q, k, v, _ctx(layout))
    plan.validate()
    tm = plan.token_mask()
    text = slice(0, 21) if text_first else slice(S - 21, S)
    assert tm[:, :, text, :].all()
    assert tm[:, :, :, text].all()
    assert not tm.all()  # the video part is still sparse
    # Text sits in its own range at the end of both orders.
    assert (plan.q_offsets[..., -2] == S - 21).all() and (plan.k_offsets[..., -2] == S - 21).all()
    assert set(plan.q_perm[0, 0, -21:].tolist()) == set(range(S)[text])


def test_semantic_error_is_much_smaller_than_pooled_on_clustered_inputs():
    q, k, v = planted_qkv()
    ref = _dense(q, k, v)
    errs = {}
    for name in ("semantic", "pooled"):
        method, _ = build_method(name, 0.8, {"top_p": 1.0})  # both spend the same budget
        plan = method.plan(q, k, v, _ctx())
        assert 1 - plan.density() >= 0.8 - 0.02
        errs[name] = _rel(reference_block_sparse_attention(q, k, v, plan).out, ref)
    assert errs["semantic"] < 0.3
    assert errs["semantic"] < 0.15 * errs["pooled"]


def test_centroids_are_cached_per_state_and_warm_started(monkeypatch):
    calls = []
    real = sem.kmeans

    def spy(x, num_clusters, iters, init="strided"):
        calls.append((iters, isinstance(init, torch.Tensor)))
        return real(x, num_clusters, iters, init=init)

    monkeypatch.setattr(sem, "kmeans", spy)
    method, _ = build_method("semantic", 0.9, {"cold_iters": 7, "warm_iters": 2})
    q, k, v = planted_qkv(B=1, H=2, S=300)
    cond, uncond = LayerStates(), LayerStates()
    method.warmup(q, k, v, _ctx(states=cond))  # dense warm-up step fills the cache
    assert calls == [(7, False), (7, False)] and cond.of(method).q_centroids is not None
    method.plan(q, k, v, _ctx(states=cond))
    assert calls[-2:] == [(2, True), (2, True)]
    method.plan(q, k, v, _ctx(states=uncond))  # another CFG branch has its own, cold, state
    assert calls[-2:] == [(7, False), (7, False)]
    method.plan(q[:, :, :250], k[:, :, :250], v[:, :, :250], _ctx(states=cond))  # new shape: cold again
    assert calls[-2:] == [(7, False), (7, False)]


def test_bad_options_raise():
    with pytest.raises(ValueError, match="top_p"):
        build_method("semantic", 0.9, {"top_p": 1.5})
    with pytest.raises(ValueError, match="num_q_clusters"):
        build_method("semantic", 0.9, {"num_q_clusters": 0})
    with pytest.raises(ValueError, match="init"):
        build_method("semantic", 0.9, {"init": "random"})


def _tiny_wan():
    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)
    return WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=64, in_channels=16, out_channels=16,
        text_dim=32, freq_dim=256, ffn_dim=32, num_layers=2, qk_norm="rms_norm_across_heads",
        rope_max_seq_len=32,
    ).eval()


@torch.no_grad()
def test_end_to_end_tiny_wan_reports_target_sparsity():
    model = _tiny_wan()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 16, 4, 16, 16, generator=g)  # 4 x 8 x 8 = 256 tokens, batch 2
    text = torch.randn(2, 7, 32, generator=g)
    dense = model(x, torch.tensor([700, 700]), text, return_dict=False)[0]
    handle = dit_sparse.apply(model, "semantic", 0.9, warmup_steps=0, warmup_layers=0)
    try:
        out = model(x, torch.tensor([700, 700]), text, return_dict=False)[0]
        out2 = model(x, torch.tensor([650, 650]), text, return_dict=False)[0]  # next step: warm centroids
        stats = handle.stats()
    finally:
        handle.remove()
    assert stats["sparse_calls"] == 4 and stats["fallback_calls"] == 0
    assert stats["sparsity_in_sparse_calls"] >= 0.9
    assert torch.isfinite(out).all() and torch.isfinite(out2).all()
    # Measured 0.032. Random weights give diffuse attention, where clusters of random members do about as
    # well (0.026): clustering quality is checked on tile-coherent attention in the next test.
    assert _rel(out, dense) < 0.05


def _random_clusters(x, num_clusters, iters, init="strided"):
    """Stand-in for `kmeans`: `num_clusters` clusters of random members, each scored by its mean."""
    B, H, S, D = x.shape
    labels = torch.randint(0, num_clusters, (B, H, S), generator=torch.Generator().manual_seed(1))
    perm = torch.sort(labels, dim=-1, stable=True).indices
    counts = torch.zeros(B, H, num_clusters, dtype=torch.int64).scatter_add_(2, labels,
                                                                          torch.ones_like(labels))
    offsets = torch.nn.functional.pad(counts.cumsum(-1), (1, 0)).int()
    sums = torch.zeros(B, H, num_clusters, D).scatter_add_(2, labels[..., None].expand(B, H, S, D), x.float())
    return KMeansResult(sums / counts.clamp_min(1)[..., None], labels.int(), perm, offsets)


@torch.no_grad()
def test_end_to_end_on_clustered_attention_beats_random_clusters(coherent_tiny_wan, monkeypatch):
    """Tiny Wan whose tokens attend their own band of rows: k-means finds the bands, so semantic at 0.9 is
    nearly exact, while the same method over clusters of random members, at the same sparsity, is not."""

    def max_error(kmeans):
        model, x, e = coherent_tiny_wan()
        ts = [900.0, 800.0]  # cold start, then warm-started centroids
        ref = [model(x, torch.tensor([t]), e, return_dict=False)[0] for t in ts]
        monkeypatch.setattr(sem, "kmeans", kmeans)
        handle = dit_sparse.apply(model, "semantic", 0.9, warmup_steps=0, warmup_layers=0)
        try:
            outs = [model(x, torch.tensor([t]), e, return_dict=False)[0] for t in ts]
            stats = handle.stats()
        finally:
            handle.remove()
        assert stats["sparse_calls"] == 2 * len(ts) and stats["sparsity_in_sparse_calls"] >= 0.9
        return max(_rel(o, r) for o, r in zip(outs, ref))

    semantic, random = max_error(sem.kmeans), max_error(_random_clusters)
    assert random > 0.01  # measured 0.024: the baseline's sparsity really costs accuracy here
    assert semantic < 1e-3  # measured 4.5e-6
    assert semantic < 0.01 * random
