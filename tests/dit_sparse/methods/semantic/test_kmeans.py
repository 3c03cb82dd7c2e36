import os
import subprocess
import sys
import textwrap

import pytest
import torch

from dit_sparse.methods.semantic import kmeans as km


def _planted(B=2, H=3, S=301, D=16, groups=5, spread=0.05, seed=0):
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(B, H, groups, D, generator=g) * 3.0
    truth = torch.randint(0, groups, (B, H, S), generator=g)
    x = torch.gather(centers, 2, truth[..., None].expand(-1, -1, -1, D))
    return x + spread * torch.randn(B, H, S, D, generator=g), truth


def _pure(labels, truth, groups):
    """Every found cluster holds points of a single planted group."""
    for lab, tru in zip(labels.reshape(-1, labels.shape[-1]), truth.reshape(-1, truth.shape[-1])):
        for c in lab.unique():
            if tru[lab == c].unique().numel() != 1:
                return False
    return True


def test_lloyd_step_matches_float64_brute_force():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 37, 3, 24, generator=g).transpose(1, 2)  # [2, 3, 37, 24] strided view
    c = km.strided_init(x, 6) + 0.1 * torch.randn(2, 3, 6, 24, generator=g)
    res = km.lloyd_step(x, c)
    d = torch.cdist(x.double(), c.double())
    assert torch.equal(res.labels.long(), d.argmin(-1))
    for b in range(2):
        for h in range(3):
            for j in range(6):
                members = x[b, h][res.labels[b, h] == j].double()
                assert res.counts[b, h, j] == members.shape[0]
                want = members.mean(0) if members.shape[0] else c[b, h, j].double()
                torch.testing.assert_close(res.centroids[b, h, j].double(), want, atol=1e-5, rtol=1e-5)


def test_kmeanspp_recovers_planted_clusters_exactly():
    x, truth = _planted()
    res = km.kmeans(x, 5, iters=10, init="kmeans++")
    assert _pure(res.labels, truth, 5)
    assert (res.counts > 0).all()  # 5 clusters for 5 groups: none merged, none empty


def test_strided_init_over_clustered_gives_pure_clusters_and_bf16_works():
    # Strided seeds can miss a small group entirely (then two groups share a cluster); with 6x more
    # clusters than groups every group gets a seed here and Lloyd separates them.
    x, truth = _planted(S=400, seed=3)
    res = km.kmeans(x, 30, iters=10)
    assert _pure(res.labels, truth, 5)
    res16 = km.kmeans(x.to(torch.bfloat16), 30, iters=10)
    assert res16.centroids.dtype == torch.float32 and res16.labels.dtype == torch.int32
    assert _pure(res16.labels, truth, 5)


def test_warm_start_beats_cold_start_on_drifting_data():
    g = torch.Generator().manual_seed(4)
    x, _ = _planted(S=500, D=32, groups=64, spread=1.0, seed=4)  # overlapping groups: no easy optimum
    res = km.kmeans(x, 16, iters=20)
    for _ in range(3):  # slow drift, two warm iterations per "denoising step"
        x = x + 0.05 * torch.randn(x.shape, generator=g)
        res = km.kmeans(x, 16, iters=2, init=res.centroids)
    warm = km.inertia(x, res)
    cold20 = km.inertia(x, km.kmeans(x, 16, iters=20))
    cold2 = km.inertia(x, km.kmeans(x, 16, iters=2))
    # Local minima differ per problem, so compare totals over all (batch, head) problems with 20 cold
    # iterations, and every problem with the same budget of 2 cold iterations.
    assert warm.sum() <= cold20.sum() * 1.005
    assert (warm < cold2).all()


def test_sort_by_label_groups_tokens_and_offsets_match_counts():
    x, _ = _planted(S=123)
    res = km.kmeans(x, 7, iters=3)
    perm, off = res.perm, res.offsets
    p2, off2 = km.sort_by_label(res.labels, 7)
    assert torch.equal(perm, p2) and torch.equal(off, off2)
    sorted_labels = torch.gather(res.labels, 2, perm)
    assert (sorted_labels[..., 1:] >= sorted_labels[..., :-1]).all()
    assert off.dtype == torch.int32 and off.shape == (2, 3, 8)
    assert (off[..., -1] == 123).all()
    assert torch.equal((off[..., 1:] - off[..., :-1]), torch.nn.functional.one_hot(res.labels.long(), 7).sum(2).int())
    assert torch.equal(perm.sort(-1).values, torch.arange(123).expand(2, 3, 123))


def test_bad_arguments_raise():
    x = torch.randn(1, 2, 10, 8)
    with pytest.raises(ValueError, match="num_clusters"):
        km.kmeans(x, 11, 2)
    with pytest.raises(ValueError, match="iters"):
        km.kmeans(x, 3, 0)
    with pytest.raises(ValueError, match=r"\[B, H, S, D\]"):
        km.kmeans(x[0], 3, 2)
    with pytest.raises(ValueError, match="init"):
        km.kmeans(x, 3, 2, init="random")


_TRITON_CHECK = textwrap.dedent(
    """
    import torch
    from dit_sparse.methods.semantic import kmeans as km
    from dit_sparse.kernels.kmeans import assign, segment_sum
    g = torch.Generator().manual_seed(0)
    for dtype, S, K, D in ((torch.float32, 77, 10, 32), (torch.float16, 50, 21, 16)):
        x = torch.randn(2, S, 3, D, generator=g).transpose(1, 2).to(dtype)  # strided [2, 3, S, D]
        c = km.strided_init(x, K) + 0.05 * torch.randn(2, 3, K, D, generator=g)
        c[:, :, 3] = 50.0  # far from every point: an empty cluster
        lab = assign(x, c, block_s=32, block_k=16, num_warps=4)
        lab2 = km._assign_torch(x, c)
        assert torch.equal(lab, lab2), (dtype, (lab != lab2).sum())
        perm, off = km.sort_by_label(lab, K)
        assert (off[..., 4] == off[..., 3]).all()
        cnt = (off[..., 1:] - off[..., :-1])[..., None].float()
        new = torch.where(cnt > 0, segment_sum(x, perm, lab, K, block_r=16) / cnt.clamp_min(1), c)
        new2 = km._mean_torch(x, lab, off[..., 1:] - off[..., :-1], c)
        torch.testing.assert_close(new, new2, atol=1e-3 if dtype == torch.float16 else 1e-5, rtol=1e-4)
    # One cluster holding most tokens (chunks inside it), two empty clusters, a labels-only sort.
    lab = torch.randint(0, 7, (2, 3, 90), generator=g, dtype=torch.int32)
    lab[:, :, :60] = 2
    perm, off = km.sort_by_label(lab, 9)
    x = torch.randn(2, 90, 3, 32, generator=g).transpose(1, 2)
    cnt = (off[..., 1:] - off[..., :-1])[..., None].float()
    want = km._mean_torch(x, lab, off[..., 1:] - off[..., :-1], torch.zeros(2, 3, 9, 32)) * cnt
    torch.testing.assert_close(segment_sum(x, perm, lab, 9, block_r=16), want, atol=1e-4, rtol=1e-5)
    print("ok")
    """
)


def test_triton_assign_and_segment_sums_match_torch_under_interpreter():
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1")
    out = subprocess.run([sys.executable, "-c", _TRITON_CHECK], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr[-2000:]
