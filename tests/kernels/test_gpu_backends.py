"""Every GPU backend against a float32 reference, and warm sparse calls free of host syncs (CUDA only).

Skipped without a GPU (CI is CPU-only: the Triton kernel is covered there under TRITON_INTERPRET=1); run
on a GPU machine with `python -m pytest -q tests/kernels/test_gpu_backends.py`.
"""

import math

import pytest
import torch
from dit_sparse.kernels import (
    available_backends,
    block_sparse_attention,
    fa4_backend,
    reference_block_sparse_attention,
)

from dit_sparse.plan import TENSOR_FIELDS, BlockPlan

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _backends():
    names = [n for n in ("triton", "flex", "fa4") if n in available_backends()]
    if torch.cuda.is_available() and not fa4_backend.installed():
        names.remove("fa4")
    return names


def _plan(B, H, S, block, density, perm, seed, empty_row=True):
    g = torch.Generator(device="cuda").manual_seed(seed)
    nb = math.ceil(S / block)
    mask = torch.rand(B, H, nb, nb, device="cuda", generator=g) < density
    if empty_row:
        mask[0, 0, 1] = False  # a query block that attends nothing: output 0
    q_perm = k_perm = None
    if perm == "shared":  # one order for every head (window3d)
        q_perm = k_perm = torch.randperm(S, device="cuda", generator=g).expand(B, H, S)
    elif perm == "per-head":  # one order per (batch, head), different for q and k (semantic)
        q_perm = torch.stack([torch.randperm(S, device="cuda", generator=g) for _ in range(B * H)]).view(B, H, S)
        k_perm = torch.stack([torch.randperm(S, device="cuda", generator=g) for _ in range(B * H)]).view(B, H, S)
    return BlockPlan.from_block_mask(mask, block, S, q_perm=q_perm, k_perm=k_perm)


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("perm", ["none", "shared", "per-head"])
@pytest.mark.parametrize("block", [64, 128])
def test_backend_matches_float32_reference(backend, D, perm, block):
    if backend == "flex" and block != 128:
        pytest.skip("the flex backend takes 128-token blocks")
    B, H, S = 2, 3, 1000 + 37  # odd length: padded tail block
    g = torch.Generator(device="cuda").manual_seed(D + block)
    # Diffusers hands over [B, S, H, D]; the processors pass [B, H, S, D] views of it.
    q, k, v = (torch.randn(B, S, H, D, device="cuda", generator=g, dtype=torch.bfloat16).transpose(1, 2)
               for _ in range(3))
    plan = _plan(B, H, S, block, 0.3, perm, seed=D)
    got = block_sparse_attention(q, k, v, plan, return_lse=True, backend=backend)
    ref = reference_block_sparse_attention(q.float(), k.float(), v.float(), plan, return_lse=True)
    err = (got.out.float() - ref.out).abs().max().item()
    assert err < 2e-2, f"{backend}: max abs error {err}"
    rel = ((got.out.float() - ref.out).norm() / ref.out.norm()).item()
    assert rel < 1e-2
    empty = torch.arange(block, 2 * block, device="cuda")
    assert got.out[0, 0, plan.q_perm[0, 0, empty] if plan.q_perm is not None else empty].abs().max() == 0
    live = torch.isfinite(ref.lse)
    assert torch.allclose(got.lse[live], ref.lse[live], atol=2e-2)


@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("kind", ["fixed64", "fixed128", "ranges"])
def test_triton_tile_statistics_bound_the_float32_reference(D, kind):
    """tile_lse from the Triton kernel: never below the exact value (it bounds the skipped mass), at most
    log 2 above it (full runs and tails combined after the kernel), -inf exactly where the reference is."""
    B, H, S = 2, 3, 1000 + 37
    g = torch.Generator(device="cuda").manual_seed(D + len(kind))
    q, k, v = (torch.randn(B, S, H, D, device="cuda", generator=g, dtype=torch.bfloat16).transpose(1, 2)
               for _ in range(3))
    if kind == "ranges":  # semantic-like: variable ranges (some longer than a chunk, some empty), per-head orders
        cuts = torch.rand(B * H, 11, device="cuda", generator=g).mul(S).long().sort(-1).values
        off = torch.cat([torch.zeros_like(cuts[:, :1]), cuts, torch.full_like(cuts[:, :1], S)], -1).view(B, H, -1)
        perms = [torch.argsort(torch.rand(B, H, S, device="cuda", generator=g), -1) for _ in range(2)]
        mask = torch.rand(B, H, 12, 12, device="cuda", generator=g) < 0.5
        plan = BlockPlan.from_range_mask(mask, off, off, q_perm=perms[0], k_perm=perms[1], seq_lens=(S, S))
    else:
        plan = _plan(B, H, S, int(kind[5:]), 0.3, "per-head", seed=D)
    got = block_sparse_attention(q, k, v, plan, return_lse=True, return_tile_stats=True, backend="triton")
    ref = reference_block_sparse_attention(q.float(), k.float(), v.float(), plan, return_lse=True,
                                           return_tile_stats=True)
    fin = torch.isfinite(ref.tile_lse)
    assert fin.any() and torch.equal(torch.isfinite(got.tile_lse), fin)
    over = got.tile_lse[fin] - ref.tile_lse[fin]
    assert over.min().item() > -2e-2, "tile_lse below the exact value: the skip bound would not hold"
    assert over.max().item() < math.log(2) + 2e-2


def test_auto_prefers_flash_attn_4_for_fixed_blocks_and_triton_for_ranges_and_statistics():
    from dit_sparse.kernels import select_backend

    q = torch.randn(1, 2, 512, 128, device="cuda", dtype=torch.bfloat16)
    fixed = _plan(1, 2, 512, 128, 0.5, "none", 0)
    want = "fa4" if fa4_backend.installed() and torch.cuda.get_device_capability()[0] in (9, 10) else "triton"
    assert select_backend(q, fixed)[0] == want
    assert select_backend(q, fixed, tile_stats=True)[0] == "triton"
    off = torch.tensor([0, 100, 300, 512], dtype=torch.int32, device="cuda").expand(1, 2, -1)
    ranges = BlockPlan.from_range_mask(torch.ones(1, 2, 3, 3, dtype=torch.bool, device="cuda"), off, off)
    assert select_backend(q, ranges)[0] == "triton"
    # float32 on the GPU: no fast kernel; the core then runs the model's own dense attention.
    name, why = select_backend(q.float(), fixed)
    assert name == "" and "dtype" in why


def test_float32_cuda_inputs_run_the_models_dense_attention_with_one_warning():
    from dit_sparse.config import SparseConfig, WarmupConfig
    from dit_sparse.core import SparseAttentionCore
    from dit_sparse.methods import build_method
    from dit_sparse.tracking import StepTracker

    method, _ = build_method("pooled", 0.9, {})
    core = SparseAttentionCore(SparseConfig("pooled", 0.9, WarmupConfig(0, 0), None), method, StepTracker(10), 1)
    q, k, v = (torch.randn(1, 1024, 2, 64, device="cuda") for _ in range(3))
    sentinel = torch.full_like(q, 7.0)
    with pytest.warns(UserWarning, match="no fast kernel"):
        out = core.attend(q, k, v, layer=0, layer_name="a", dense_fn=lambda: sentinel)
    assert out is sentinel and core.stats.fallback_calls == 1


@pytest.mark.parametrize("spec", ["full", "window3d", "window3d[block=128]", "semantic", "semantic[layout=clusters]",
                                  "pooled", "window3d+skip", "window3d+skip[update_every=3]"])
def test_warm_sparse_calls_do_not_synchronise(spec):
    from dit_sparse.config import SparseConfig, WarmupConfig
    from dit_sparse.core import SparseAttentionCore
    from dit_sparse.layout import VideoLayout
    from dit_sparse.methods import build_method, split_method_options
    from dit_sparse.tracking import StepTracker

    name, opts = split_method_options(spec)
    method, _ = build_method(name, 0.9, opts)
    tracker = StepTracker(num_steps=1000)
    tracker.layout = VideoLayout(5, 30, 52)
    core = SparseAttentionCore(SparseConfig(name, 0.9, WarmupConfig(0, 0), None), method, tracker, 1)
    S = tracker.layout.seq_len
    q, k, v = (torch.randn(1, S, 4, 128, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    t = [1000.0]

    def call():
        t[0] -= 1.0
        tracker.begin_forward(t[0], "cond", None, None)
        return core.attend(q, k, v, layer=0, layer_name="l0", dense_fn=lambda: None)

    for _ in range(6):  # first calls of a shape may sync (tilings, compilation, cached indices)
        call()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(6):  # a whole re-classification cycle of window3d's online choice
            call()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    assert core.stats.fallback_calls == 0


@pytest.mark.parametrize("spec", ["pooled", "semantic", "semantic[layout=clusters]"])
def test_graphed_planning_replays_the_eager_plan(spec, monkeypatch):
    from dit_sparse.context import AttentionContext
    from dit_sparse.layout import VideoLayout
    from dit_sparse.methods import build_method, split_method_options

    name, opts = split_method_options(spec)
    layout = VideoLayout(5, 30, 52, text_tokens=77)  # joint attention: text ranges forced both ways
    S = layout.seq_len
    g = torch.Generator(device="cuda").manual_seed(11)
    q, k, v = (torch.randn(2, S, 4, 128, device="cuda", generator=g, dtype=torch.bfloat16).transpose(1, 2)
               for _ in range(3))
    plans = {}
    for graphs in ("1", "0"):
        monkeypatch.setenv("DIT_SPARSE_CUDA_GRAPHS", graphs)
        method, _ = build_method(name, 0.9, opts)
        ctx = AttentionContext(0, "l0", 1, 0, 10, "cond", layout, 0.9)
        for step in range(4):  # cold start, first warm call (eager, then recorded), two replays
            ctx.step = step
            plan = method.plan(q, k, v, ctx)
        plans[graphs] = (plan, method.state_of(ctx))
        # pooled records on its first call; semantic's first call is a cold start that is not graphed
        assert method.graphs.replays == (0 if graphs == "0" else 3 if name == "pooled" else 2)
    assert "pair_counts" in plans["1"][0].derived  # computed inside the graph
    assert torch.equal(plans["1"][0].pair_counts(), plans["1"][0]._pair_counts())
    (gp, gs), (ep, es) = plans["1"], plans["0"]
    gp.validate()
    assert gp.block_size == ep.block_size and gp.seq_lens == ep.seq_lens
    if name == "pooled":  # deterministic maths: the same plan bit for bit
        for f in ("q_offsets", "k_offsets", "kv_indices", "kv_counts"):
            assert torch.equal(getattr(gp, f), getattr(ep, f)), f
    else:  # k-means sums use atomics: centroids agree to rounding, plans to a few tokens
        torch.testing.assert_close(gs.q_centroids, es.q_centroids, atol=1e-3, rtol=1e-3)
        assert abs(gp.density() - ep.density()) < 0.01


@pytest.mark.parametrize("kind", ["fixed", "ranges"])
@pytest.mark.parametrize("stats", [False, True])
def test_graphed_launch_metadata_matches_the_eager_one(kind, stats):
    """Kernel preparation of a new plan replays a CUDA graph per plan signature: a second plan of the same
    signature (other ranges, other selection, other permutations) must get exactly its own eager metadata."""
    from dit_sparse.kernels import triton_backend as tb

    g = torch.Generator(device="cuda").manual_seed(5 + stats)
    B, H, S = 2, 3, 1000

    def plan():
        if kind == "fixed":
            return BlockPlan.from_block_mask(torch.rand(B, H, 16, 16, device="cuda", generator=g) < 0.4, 64, S)
        # 8 query and 16 key ranges (n - 1 inner cuts each; equal cuts give empty ranges)
        cuts = [torch.rand(B * H, n - 1, device="cuda", generator=g).mul(S).long().sort(-1).values for n in (8, 16)]
        qo, ko = (torch.cat([torch.zeros_like(c[:, :1]), c, torch.full_like(c[:, :1], S)], -1).view(B, H, -1).int()
                  for c in cuts)
        perms = [torch.argsort(torch.rand(B, H, S, device="cuda", generator=g), -1) for _ in range(2)]
        mask = torch.rand(B, H, 8, 16, device="cuda", generator=g) < 0.5
        return BlockPlan.from_range_mask(mask, qo, ko, q_perm=perms[0], k_perm=perms[1], seq_lens=(S, S))

    cfg = tb.KernelConfig(64, 64, 4, 2)
    before = tb._PREP_GRAPHS.replays
    for _ in range(3):  # eager and recorded, then replays
        p = plan()
        chunks, tiles, perms = tb.prepare(p, S, S, cfg, stats)
    assert tb._PREP_GRAPHS.replays >= before + 2  # fixed plans ignore `stats`: its second case finds the graph
    want = tb._prepare_tensors(*(getattr(p, n) for n in TENSOR_FIELDS if getattr(p, n) is not None),
                               names=tuple(n for n in TENSOR_FIELDS if getattr(p, n) is not None),
                               block_size=p.block_size, seq_lens=p.seq_lens, sq=S, sk=S, block_m=64, block_n=64,
                               stats=stats and kind != "fixed")
    got = (chunks.starts, chunks.ends, chunks.slots, chunks.counts, tiles.tiles, tiles.q_offsets, perms["q"], perms["k"])
    for name, x, y in zip(("starts", "ends", "slots", "counts", "tiles", "q_offsets", "q", "k"), got, want):
        assert (x is None) == (y is None), name
        assert x is None or torch.equal(x, y), name


@pytest.mark.parametrize("D", [64, 128])
def test_block_sums_kernel_matches_float32(D):
    """window3d's head-choice sums on the GPU: bf16 inputs in Diffusers' layout, a short last block."""
    from dit_sparse.kernels.block_sums import _block_sums_torch, block_sums

    g = torch.Generator(device="cuda").manual_seed(D)
    S = 4 * 128 + 77
    k, v = (torch.randn(2, S, 3, D, device="cuda", generator=g, dtype=torch.bfloat16).transpose(1, 2)
            for _ in range(2))
    q = torch.randn(2, 64, 3, D, device="cuda", generator=g, dtype=torch.bfloat16).transpose(1, 2)
    got = block_sums(q, k, v, 128, D ** -0.5)
    want = _block_sums_torch(q.float(), k.float(), v.float(), 128, D ** -0.5)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-2)
