"""GPU benchmark of the "semantic" method at the Wan2.1-1.3B attention shape (B=1, 12 heads, 32,760 tokens, D=128).

Measures (CUDA events, median of repeated calls after warm-up):
  * the Triton k-means kernels (assignment, segment sum) for a few launch configurations, plus the
    label sort (labels checked against PyTorch);
  * warm k-means (Q and K, default cluster counts, 2 iterations) and the whole `plan()` call;
  * the sparse attention call (plan + Triton block-sparse kernel) at sparsity 0.9, next to cuDNN SDPA;
  * an ablation over cluster counts -> time and output error vs dense attention on synthetic clustered q/k;
  * the "pooled" baseline at the same target.

    python tools/bench_semantic.py --out benchmarks/semantic.json
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time

import torch
import torch.nn.functional as F
from dit_sparse.kernels import available_backends, block_sparse_attention

from dit_sparse.context import AttentionContext
from dit_sparse.methods import build_method
from dit_sparse.methods.semantic import kmeans as km

SMOKE = False  # --smoke: tiny CPU run that only checks the script end to end


class Rows(list):
    """Table rows, also printed as they come (a run cut short still shows what it measured)."""

    def append(self, row: str) -> None:
        print(row, flush=True)
        super().append(row)


def timed(fn, reps: int = 20, warmup: int = 3) -> float:
    """Median milliseconds of fn() between CUDA events (host syncs inside fn are included)."""
    if SMOKE:
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def clustered_qkv(B, H, S, D, groups, seed=0, dtype=torch.bfloat16):
    """q/k drawn around shared per-head centres (attention concentrates within a group) in [B, S, H, D]
    layout viewed as [B, H, S, D], like the model processors pass them; group membership is random, so
    natural token order carries no locality."""
    dev = "cpu" if SMOKE else "cuda"
    g = torch.Generator(device=dev).manual_seed(seed)
    centres = torch.randn(B, H, groups, D, device=dev, generator=g)
    gq = torch.randint(0, groups, (B, H, S), device=dev, generator=g)
    gk = torch.randint(0, groups, (B, H, S), device=dev, generator=g)
    pick = lambda idx: torch.gather(centres, 2, idx[..., None].expand(-1, -1, -1, D))
    q = pick(gq) + 0.5 * torch.randn(B, H, S, D, device=dev, generator=g)
    k = pick(gk) + 0.5 * torch.randn(B, H, S, D, device=dev, generator=g)
    v = torch.randn(B, H, S, D, device=dev, generator=g)
    return [t.to(dtype).transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k, v)]


def dense_sdpa(q, k, v):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.MATH if SMOKE else SDPBackend.CUDNN_ATTENTION):
        return F.scaled_dot_product_attention(q, k, v)


def rel_err(a, b) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def ctx() -> AttentionContext:
    return AttentionContext(1, "blocks.1.attn1", 30, 10, 50, "cond", None, 0.9)


def bench_kmeans_kernels(q, rows):
    """Assignment and segment-sum kernels: launch configs, label agreement with the PyTorch path."""
    from dit_sparse.kernels.kmeans import assign, segment_sum

    nq, nk = (16, 64) if SMOKE else (152, 608)
    out = []
    for K in (nq, nk):
        c = km.kmeans(q, K, iters=3).centroids
        if SMOKE:
            continue
        agree = float((km._assign_torch(q[:, :2], c[:, :2]) == assign(q[:, :2], c[:, :2])).float().mean())
        for bs, bk, w in ((128, 64, 8), (128, 64, 4), (64, 64, 4), (128, 128, 8), (64, 128, 4)):
            t = timed(lambda bs=bs, bk=bk, w=w, c=c: assign(q, c, bs, bk, w), reps=10)
            out.append({"kernel": "assign", "K": K, "block_s": bs, "block_k": bk, "warps": w, "ms": t,
                        "label_agreement": agree})
            rows.append(f"assign K={K:4d} bs={bs:3d} bk={bk:3d} w={w}: {t:.3f} ms (agree {agree:.4f})")
        lab = assign(q, c)
        t = timed(lambda lab=lab, K=K: km.sort_by_label(lab, K), reps=10)
        out.append({"kernel": "sort_by_label", "K": K, "ms": t})
        rows.append(f"sort_by_label K={K:4d}: {t:.3f} ms")
        perm, off = km.sort_by_label(lab, K)
        t = timed(lambda K=K, perm=perm, lab=lab: segment_sum(q, perm, lab, K), reps=10)
        out.append({"kernel": "segment_sum", "K": K, "ms": t})
        rows.append(f"segment_sum K={K:4d}: {t:.3f} ms")
    return out


def bench_plan_stages(q, k, v, method, c, rows):
    """Time of each planning stage after warm k-means (centroid logits -> selection -> BlockPlan)."""
    import dit_sparse.methods.semantic.method as sem
    from dit_sparse.methods.budget import select_blocks
    from dit_sparse.plan import BlockPlan

    S, D = q.shape[2], q.shape[3]
    nq, nk = method.cluster_counts(S)
    st = method.state_of(c)
    qr, kr = km.kmeans(q, nq, 2, init=st.q_centroids), km.kmeans(k, nk, 2, init=st.k_centroids)
    o = method.options
    mb = max(1, math.ceil(o.min_kc_ratio * nk))
    logits = torch.matmul(qr.centroids, kr.centroids.transpose(-1, -2)) / D**0.5
    sel = lambda f: f(logits, qr.counts, kr.counts, 0.9, top_p=o.top_p, min_blocks=mb)
    mask = sel(select_blocks)
    out = {
        "logits_ms": timed(lambda: torch.matmul(qr.centroids, kr.centroids.transpose(-1, -2))),
        "select_blocks_ms": timed(lambda: sel(select_blocks)),
        "from_range_mask_ms": timed(lambda: BlockPlan.from_range_mask(mask, qr.offsets, kr.offsets,
                                                                      q_perm=qr.perm, k_perm=kr.perm)),
    }
    if not SMOKE:
        try:
            compiled = torch.compile(select_blocks, dynamic=False)
            sel(compiled)
            out["select_blocks_compiled_ms"] = timed(lambda: sel(compiled))
            out["select_blocks_compiled_same"] = bool(torch.equal(sel(compiled), mask))
            orig = sem.select_blocks
            sem.select_blocks = compiled
            try:
                out["plan_with_compiled_select_ms"] = timed(lambda: method.plan(q, k, v, c))
            finally:
                sem.select_blocks = orig
        except Exception as exc:  # report, do not fail the benchmark
            out["compile_error"] = repr(exc)[:300]
    rows.append("plan stages: " + ", ".join(f"{k_} {v_:.3f}" if isinstance(v_, float) else f"{k_} {v_}"
                                            for k_, v_ in out.items()))
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="benchmarks/semantic.json")
    ap.add_argument("--groups", type=int, default=64)
    ap.add_argument("--smoke", action="store_true", help="tiny CPU run (reference kernel) to check the script")
    args = ap.parse_args()
    global SMOKE
    SMOKE = args.smoke
    torch.manual_seed(0)
    B, H, S, D = (1, 2, 1000, 128) if SMOKE else (1, 12, 32760, 128)
    dev = "cpu (smoke)" if SMOKE else torch.cuda.get_device_name()
    backends = available_backends()
    kernel = "reference" if SMOKE else ("triton" if "triton" in backends else None)
    res: dict = {"device": dev, "torch": torch.__version__, "shape": [B, H, S, D], "dtype": "bfloat16",
                 "backends": backends, "groups": args.groups}
    rows = Rows()
    rows.append(f"device {dev}, torch {torch.__version__}, backends {backends}")
    q, k, v = clustered_qkv(B, H, S, D, args.groups)
    ref = dense_sdpa(q, k, v)
    res["dense_cudnn_ms"] = timed(lambda: dense_sdpa(q, k, v))
    rows.append(f"dense cuDNN SDPA: {res['dense_cudnn_ms']:.3f} ms")

    res["kmeans_kernels"] = bench_kmeans_kernels(q, rows)

    # Defaults: warm k-means and planning.
    method, _ = build_method("semantic", 0.9, {})
    c = ctx()
    t0 = time.perf_counter()
    method.plan(q, k, v, c)  # cold start (20 iterations)
    if not SMOKE:
        torch.cuda.synchronize()
    res["cold_plan_ms_once"] = (time.perf_counter() - t0) * 1e3
    nq, nk = method.cluster_counts(S)
    st = method.state_of(c)
    res["clusters"] = [nq, nk]
    res["warm_kmeans_ms"] = timed(
        lambda: (km.kmeans(q, nq, 2, init=st.q_centroids), km.kmeans(k, nk, 2, init=st.k_centroids))
    )
    res["warm_plan_ms"] = timed(lambda: method.plan(q, k, v, c))
    rows.append(f"defaults q={nq} k={nk}: warm k-means {res['warm_kmeans_ms']:.3f} ms, "
                f"whole plan() {res['warm_plan_ms']:.3f} ms (cold first call {res['cold_plan_ms_once']:.0f} ms)")
    res["plan_stages"] = bench_plan_stages(q, k, v, method, c, rows)

    def attention_rows(label, opts, method_name="semantic"):
        m, _ = build_method(method_name, 0.9, opts)
        cc = ctx()
        plan = m.plan(q, k, v, cc)
        entry = {"label": label, "options": opts, "method": method_name,
                 "sparsity": 1.0 - plan.density(), "plan_ms": timed(lambda: m.plan(q, k, v, cc))}
        if kernel is not None:
            run = lambda p: block_sparse_attention(q, k, v, p, backend=kernel).out
            out = run(plan)
            entry["err_vs_dense"] = rel_err(out, ref)
            entry["kernel_ms_cached_plan"] = timed(lambda: run(plan))
            entry["call_ms"] = timed(lambda: run(m.plan(q, k, v, cc)))
        else:
            entry["err_vs_dense"] = None
        rows.append(
            f"{label:34s} sp={entry['sparsity']:.3f} plan {entry['plan_ms']:.3f} ms"
            + (f" kernel {entry['kernel_ms_cached_plan']:.3f} ms call {entry['call_ms']:.3f} ms"
               f" err {entry['err_vs_dense']:.4f}" if kernel else " (no GPU kernel)")
        )
        return entry

    res["calls"] = [
        attention_rows("semantic defaults", {}),
        attention_rows("semantic top_p=1 (budget filled)", {"top_p": 1.0}),
        attention_rows("semantic top_p=0.95", {"top_p": 0.95}),
        attention_rows("pooled defaults", {}, "pooled"),
        attention_rows("pooled top_p=1", {"top_p": 1.0}, "pooled"),
    ]
    res["ablation"] = []
    for nq_ in (5, 10) if SMOKE else (50, 100, 200, 400):
        for nk_ in (25, 50) if SMOKE else (250, 500, 1000):
            res["ablation"].append(attention_rows(f"ablation top_p=1 q={nq_} k={nk_}",
                                                  {"num_q_clusters": nq_, "num_k_clusters": nk_, "top_p": 1.0}))
    if kernel is None:
        rows.append("block-sparse Triton kernel missing: attention times not measured")
    with open(args.out, "w") as fh:
        json.dump(res, fh, indent=1)
    print("---- summary ----")
    print("\n".join(rows))
    print(f"flops check: dense 4*S*S*D*H = {4 * S * S * D * H / 1e12:.2f} TFLOP, "
          f"{4 * S * S * D * H / res['dense_cudnn_ms'] / 1e9:.0f} TFLOP/s")
    print("done" if kernel else "kernel missing")


if __name__ == "__main__":
    main()
