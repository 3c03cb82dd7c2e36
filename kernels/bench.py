"""`dit-sparse bench kernels`: block-sparse attention kernels against cuDNN SDPA and FlexAttention.

Runs on one CUDA GPU, bf16, B=1, non-causal, on the attention shapes of real video DiTs. For each shape:
cuDNN dense once, then per density ours (Triton) and FlexAttention on the same random 128x128 block mask;
on the Wan2.1-1.3B shape also variable-length clusters (sizes 16..1024, random permutations) and tile
statistics on vs off. Times are medians of `triton.testing.do_bench`; effective TFLOP/s counts only the
computed pairs (4 * S^2 * D * H * density / time). Prints a table last and writes JSON.

    python -m dit_sparse.kernels.bench --quick            # Wan-1.3B shape at 100% and 10%, < 5 min
    python -m dit_sparse.kernels.bench                    # everything
    python -m dit_sparse.kernels.bench --check-only       # correctness on the GPU only
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import torch

SHAPES = {  # name: (B, H, S, D)
    "wan1.3b-480p": (1, 12, 32760, 128),
    "wan14b-720p": (1, 40, 75600, 128),
    "hunyuan-720p": (1, 24, 119056, 128),
    "cogvideox": (1, 48, 17776, 64),
}
DENSITIES = [1.0, 0.3, 0.2, 0.1, 0.05]
BLOCK = 128
DEV = "cuda"
gen_cpu_seed = torch.Generator().manual_seed(1234)  # cluster sizes and sampled rows


def _args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="dit-sparse bench kernels", description=__doc__.split("\n")[0])
    p.add_argument("--shapes", default=",".join(SHAPES), help=f"comma list of {list(SHAPES)}")
    p.add_argument("--densities", default=",".join(map(str, DENSITIES)))
    p.add_argument("--quick", action="store_true", help="Wan-1.3B shape, densities 1.0 and 0.1, plus extras")
    p.add_argument("--no-flex", action="store_true")
    p.add_argument("--no-extras", action="store_true", help="skip variable-length / stats / gather runs")
    p.add_argument("--sweep", action="store_true", help="also time every candidate kernel config")
    p.add_argument("--check", action="store_true", help="check correctness against the reference first")
    p.add_argument("--check-only", action="store_true", help="only check correctness")
    p.add_argument("--rep", type=int, default=100, help="do_bench rep (ms)")
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/kernels-<device>.json)")
    return p.parse_args(argv)


# ---------------------------------------------------------------------------------------- inputs
def random_block_plan(B, H, S, density, gen, block=BLOCK):
    from dit_sparse.plan import BlockPlan

    nb = math.ceil(S / block)
    if density >= 1.0:
        mask = torch.ones(B, H, nb, nb, dtype=torch.bool, device=DEV)
    else:
        mask = torch.rand(B, H, nb, nb, device=DEV, generator=gen) < density
        mask |= torch.eye(nb, dtype=torch.bool, device=DEV)  # no empty rows
    return BlockPlan.from_block_mask(mask, block, S)


def random_cluster_plan(B, H, S, density, gen, lo=16, hi=1024):
    """Query and key clusters of random sizes in [lo, hi], random permutations, random selection."""
    from dit_sparse.plan import BlockPlan

    def offsets():
        sizes = torch.randint(lo, hi + 1, (S // lo + 1,), generator=gen_cpu)
        cum = sizes.cumsum(0)
        n = int((cum < S).sum()) + 1
        off = torch.cat([torch.zeros(1, dtype=torch.long), cum[: n - 1], torch.tensor([S])])
        return off

    gen_cpu = torch.Generator().manual_seed(int(torch.randint(0, 2**31, (1,), generator=gen_cpu_seed)))
    qo, ko = offsets(), offsets()
    nq, nk = qo.numel() - 1, ko.numel() - 1
    q_off = qo.to(DEV, torch.int32).expand(B, H, -1)
    k_off = ko.to(DEV, torch.int32).expand(B, H, -1)
    mask = torch.rand(B, H, nq, nk, device=DEV, generator=gen) < density
    perm = lambda: torch.stack([torch.randperm(S, device=DEV, generator=gen) for _ in range(B * H)]).view(B, H, S)
    return BlockPlan.from_range_mask(mask, q_off, k_off, q_perm=perm(), k_perm=perm())


def sampled_rel_error(q, k, v, plan, out, scale, samples=6, gen=None):
    """Relative error of `out` against float32 attention on a few query ranges (all their rows)."""
    B, H, S, D = q.shape
    num = den = 0.0
    for i in range(samples):
        b, h = i % B, (i * 7) % H
        nq = plan.num_q_blocks
        r = int(torch.randint(0, nq, (1,), generator=gen_cpu_seed))
        qo, ko = plan.q_offsets[b, h].long(), plan.k_offsets[b, h].long()
        rows = torch.arange(int(qo[r]), int(qo[r + 1]), device=DEV)
        sel = plan.kv_indices[b, h, r, : int(plan.kv_counts[b, h, r])].long()
        if rows.numel() == 0 or sel.numel() == 0:
            continue
        cols = torch.cat([torch.arange(int(ko[j]), int(ko[j + 1]), device=DEV) for j in sel.tolist()])
        if plan.q_perm is not None:
            rows = plan.q_perm[b, h, rows]
        if plan.k_perm is not None:
            cols = plan.k_perm[b, h, cols]
        s = (q[b, h, rows].float() @ k[b, h, cols].float().T) * scale
        ref = torch.softmax(s, -1) @ v[b, h, cols].float()
        num += float((out[b, h, rows].float() - ref).pow(2).sum())
        den += float(ref.pow(2).sum())
    return math.sqrt(num / max(den, 1e-30))


# ---------------------------------------------------------------------------------------- timing
def bench_ms(fn, rep):
    from triton.testing import do_bench

    return float(do_bench(fn, warmup=25, rep=rep, return_mode="median"))


def try_ms(fn, rep):
    """bench_ms, or None when the kernel config cannot run here (compile error, too much shared memory)."""
    try:
        return bench_ms(fn, rep)
    except Exception as e:
        print(f"config failed: {type(e).__name__}: {str(e)[:160]}")
        return None


def tflops(B, H, S, D, density, ms):
    return 4.0 * B * H * S * S * D * density / (ms * 1e-3) / 1e12


def cudnn_ms(q, k, v, rep):
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
        return bench_ms(lambda: F.scaled_dot_product_attention(q, k, v), rep)


# ---------------------------------------------------------------------------------------- check
def run_check() -> list[dict]:
    """GPU correctness: ours vs the reference executor (fp32) on small random plans."""
    from dit_sparse.kernels.reference import reference_block_sparse_attention
    from dit_sparse.kernels.triton_backend import _CANDIDATES, triton_block_sparse_attention

    from dit_sparse.plan import BlockPlan

    gen = torch.Generator(device=DEV).manual_seed(0)
    rows = []
    for D in (64, 128):
        for ci, cfg in enumerate(_CANDIDATES[D]):
            for ki, kind in enumerate(("fixed128", "fixed64", "var")):
                dtype = (torch.bfloat16, torch.float16)[(ci + ki) % 2]
                if True:
                    B, H, S = 2, 3, 1000 + 37
                    x = torch.randn(B, S, H, D, device=DEV, dtype=dtype, generator=gen)
                    q, k, v = (torch.randn_like(x).transpose(1, 2) for _ in range(3))
                    if kind == "var":
                        plan = random_cluster_plan(B, H, S, 0.3, gen, lo=1, hi=200)
                    else:
                        bs = int(kind[5:])
                        nb = math.ceil(S / bs)
                        mask = torch.rand(B, H, nb, nb, device=DEV, generator=gen) < 0.3
                        mask[0, 0, 1] = False
                        perm = torch.stack([torch.randperm(S, device=DEV, generator=gen) for _ in range(B * H)])
                        plan = BlockPlan.from_block_mask(mask, bs, S, q_perm=perm.view(B, H, S))
                    try:
                        got = triton_block_sparse_attention(
                            q, k, v, plan, return_lse=True, return_tile_stats=True, config=cfg
                        )
                    except Exception as e:  # e.g. a config that needs too much shared memory here
                        print(f"check: config {cfg} skipped: {type(e).__name__}: {str(e)[:120]}")
                        continue
                    ref = reference_block_sparse_attention(q, k, v, plan, return_lse=True, return_tile_stats=True)
                    fin = torch.isfinite(ref.lse)
                    tfin = torch.isfinite(ref.tile_lse)
                    # The kernel's tile_lse bounds the exact one from above, by at most log 2.
                    over = got.tile_lse[tfin] - ref.tile_lse[tfin]
                    rec = {
                        "D": D, "dtype": str(dtype)[6:], "plan": kind, "config": cfg.__dict__,
                        "out_rel": float((got.out.float() - ref.out.float()).norm() / ref.out.float().norm()),
                        "lse_abs": float((got.lse[fin] - ref.lse[fin]).abs().max()),
                        "lse_inf_match": bool(torch.equal(torch.isfinite(got.lse), fin)),
                        "tl_below": float((-over).clamp(min=0).max()) if tfin.any() else 0.0,
                        "tl_over": float(over.max()) if tfin.any() else 0.0,
                        "tl_inf_match": bool(torch.equal(torch.isfinite(got.tile_lse), tfin)),
                        "finite": bool(torch.isfinite(got.out.float()).all()),
                    }
                    rec["ok"] = (rec["out_rel"] < 1e-2 and rec["lse_abs"] < 2e-2 and rec["tl_below"] < 5e-2
                                 and rec["tl_over"] < math.log(2) + 5e-2
                                 and rec["lse_inf_match"] and rec["tl_inf_match"] and rec["finite"])
                    rows.append(rec)
    bad = [r for r in rows if not r["ok"]]
    print(f"check: {len(rows) - len(bad)}/{len(rows)} ok; worst out_rel "
          f"{max(r['out_rel'] for r in rows):.2e}, lse {max(r['lse_abs'] for r in rows):.2e}, "
          f"tile_lse below exact {max(r['tl_below'] for r in rows):.2e}, above {max(r['tl_over'] for r in rows):.2e}")
    for r in bad:
        print("CHECK FAIL", json.dumps(r))
    return rows


# ---------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    args = _args(argv)
    if not torch.cuda.is_available():
        print("bench kernels needs a CUDA GPU", file=sys.stderr)
        return 2
    torch._dynamo.config.cache_size_limit = 64
    dev_name = torch.cuda.get_device_name()
    results: dict = {"device": dev_name, "torch": torch.__version__, "cases": [], "check": None}
    import triton

    results["triton"] = triton.__version__
    if args.check or args.check_only:
        results["check"] = run_check()
        if not all(r["ok"] for r in results["check"]):
            print("correctness check failed: no benchmark")
            return 1
    shapes = ["wan1.3b-480p"] if args.quick else args.shapes.split(",")
    if args.check_only:
        shapes = []
    gen = torch.Generator(device=DEV).manual_seed(0)
    rows = results["cases"]

    def record(**kw):
        rows.append(kw)
        print(json.dumps(kw), flush=True)

    for name in shapes:
        _bench_shape(args, name, gen, record)
        torch.cuda.empty_cache()

    _print_table(results)
    out = args.out or os.path.join("benchmarks", f"kernels-{dev_name.replace(' ', '_')}.json")
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    with open(out, "w") as f:
        json.dump(results, f, indent=1, default=str)
    print(f"wrote {out}")
    return 0 if not results["check"] or all(r["ok"] for r in results["check"]) else 1


def _bench_shape(args, name, gen, record):
    """cuDNN dense, then ours and Flex per density on one shape (plus extras on Wan-1.3B)."""
    from dit_sparse.kernels import triton_backend as tb
    from dit_sparse.kernels.triton_flex import flex_block_mask, flex_block_sparse_attention

    B, H, S, D = SHAPES[name]
    dens = [1.0, 0.1] if args.quick else [float(x) for x in args.densities.split(",")]
    q, k, v = (torch.randn(B, H, S, D, device=DEV, dtype=torch.bfloat16, generator=gen) for _ in range(3))
    scale = 1.0 / math.sqrt(D)
    t_cudnn = cudnn_ms(q, k, v, args.rep)
    record(shape=name, kernel="cudnn-dense", density=1.0, ms=t_cudnn, tflops=tflops(B, H, S, D, 1.0, t_cudnn))
    fixed10 = None
    for d in dens:
        plan = random_block_plan(B, H, S, d, gen)
        real = plan.density()
        t0 = time.time()
        ours = lambda plan=plan: tb.triton_block_sparse_attention(q, k, v, plan)
        out = ours().out  # compiles and prepares the plan
        setup_s = time.time() - t0
        t_ours = bench_ms(ours, args.rep)
        err = sampled_rel_error(q, k, v, plan, out, scale)
        rec = dict(shape=name, kernel="triton", density=d, real_density=real, ms=t_ours,
                   tflops=tflops(B, H, S, D, real, t_ours), rel_err=err,
                   vs_cudnn_scaled=t_cudnn * real / t_ours, first_call_s=setup_s,
                   config=tb.LAST_CONFIG.__dict__)
        if args.sweep:
            rec["sweep"] = {
                ",".join(map(str, c.__dict__.values())): try_ms(
                    lambda c=c, plan=plan: tb.triton_block_sparse_attention(q, k, v, plan, config=c), args.rep)
                for c in tb.candidate_configs(D, plan)
            }
        if not args.no_flex:
            bm = flex_block_mask(plan, S, S)
            fl = lambda plan=plan, bm=bm: flex_block_sparse_attention(q, k, v, plan, block_mask=bm)
            try:
                fout = fl().out
                t_flex = bench_ms(fl, args.rep)
                rec["flex_ms"] = t_flex
                rec["flex_tflops"] = tflops(B, H, S, D, real, t_flex)
                rec["vs_flex"] = t_flex / t_ours
                rec["flex_rel_err"] = sampled_rel_error(q, k, v, plan, fout, scale)
            except Exception as e:  # report, keep going
                rec["flex_error"] = f"{type(e).__name__}: {str(e)[:200]}"
        _fa4_row(rec, q, k, v, plan, scale, args.rep)
        record(**rec)
        if abs(d - 0.1) < 1e-9:
            fixed10 = plan
    if name == "wan1.3b-480p" and not args.no_extras:
        _extras(args, q, k, v, scale, gen, fixed10, record)


def _fa4_row(rec, q, k, v, plan, scale, rep):
    """flash-attn-4 on the same plan, when installed and supported (its first call compiles)."""
    from dit_sparse.kernels import fa4_backend

    reason = fa4_backend.supports(q, plan)
    if reason is not None:
        rec["fa4_error"] = reason
        return
    fn = lambda: fa4_backend.fa4_block_sparse_attention(q, k, v, plan)
    try:
        out = fn().out
        rec["fa4_ms"] = bench_ms(fn, rep)
        rec["fa4_rel_err"] = sampled_rel_error(q, k, v, plan, out, scale)
        rec["fa4_vs_triton"] = rec["ms"] / rec["fa4_ms"]
    except Exception as e:  # report, keep going
        rec["fa4_error"] = f"{type(e).__name__}: {str(e)[:200]}"


def _extras(args, q, k, v, scale, gen, fixed10, record):
    """Variable-length clusters, permutation strategy, tile statistics and plan-preparation cost."""
    from dit_sparse.kernels import triton_backend as tb
    from dit_sparse.kernels.triton_prep import key_chunks, query_tiles

    B, H, S, D = q.shape
    runs = {}
    var = random_cluster_plan(B, H, S, 0.1, gen)
    var_real = var.density()
    fixed_plan = fixed10 if fixed10 is not None else random_block_plan(B, H, S, 0.1, gen)
    fixed_real = fixed_plan.density()
    perm = torch.stack([torch.randperm(S, device=DEV, generator=gen) for _ in range(B * H)]).view(B, H, S)
    from dataclasses import replace

    fixed_perm = replace(fixed_plan, q_perm=perm, k_perm=perm.flip(-1))
    cases = [
        ("fixed10", fixed_plan, fixed_real, {}),
        ("fixed10-perm-kernel", fixed_perm, fixed_real, {"gather": "kernel"}),
        ("fixed10-perm-copy", fixed_perm, fixed_real, {"gather": "copy"}),
        ("fixed10-stats", fixed_plan, fixed_real, {"return_lse": True, "return_tile_stats": True}),
        ("var10-perm-kernel", var, var_real, {"gather": "kernel"}),
        ("var10-perm-copy", var, var_real, {"gather": "copy"}),
        ("var10-stats", var, var_real, {"return_lse": True, "return_tile_stats": True}),
    ]
    for label, plan, real, kw in cases:
        fn = lambda plan=plan, kw=kw: tb.triton_block_sparse_attention(q, k, v, plan, **kw)
        out = fn().out
        ms = bench_ms(fn, args.rep)
        runs[label] = ms
        rec = dict(shape="wan1.3b-480p", kernel="triton-" + label, density=0.1, real_density=real, ms=ms,
                   tflops=tflops(B, H, S, D, real, ms), rel_err=sampled_rel_error(q, k, v, plan, out, scale))
        if args.sweep:
            rec["sweep"] = {
                ",".join(map(str, c.__dict__.values())): try_ms(
                    lambda c=c, plan=plan, kw=kw: tb.triton_block_sparse_attention(q, k, v, plan, config=c, **kw),
                    args.rep)
                for c in tb.candidate_configs(D, plan)
            }
        record(**rec)
    # Plan preparation from scratch (what a method producing a new plan every call pays).
    cfg = tb._CANDIDATES[D][0]
    for label, plan in (("fixed10", fixed_plan), ("var10", var)):
        for stats in (False, True):
            def prep(plan=plan, stats=stats):
                ch = key_chunks(plan, S, cfg.block_n, stats)
                return query_tiles(plan, S, cfg.block_m, ch)

            record(shape="wan1.3b-480p", kernel=f"prep-{label}" + ("-stats" if stats else ""), ms=bench_ms(prep, args.rep))
    tpt = lambda lbl, real: tflops(B, H, S, D, real, runs[lbl])
    record(shape="wan1.3b-480p", kernel="summary",
           var_vs_fixed_throughput=tpt("var10-perm-kernel", var_real) / tpt("fixed10", fixed_real),
           stats_overhead_fixed=runs["fixed10-stats"] / runs["fixed10"] - 1,
           stats_overhead_var=runs["var10-stats"] / runs["var10-perm-kernel"] - 1,
           perm_kernel_vs_copy_fixed=runs["fixed10-perm-copy"] / runs["fixed10-perm-kernel"],
           perm_kernel_vs_copy_var=runs["var10-perm-copy"] / runs["var10-perm-kernel"])


def _print_table(results: dict) -> None:
    print()
    print(f"device: {results['device']}  torch {results['torch']}  triton {results['triton']}  (bf16, B=1, medians)")
    hdr = f"{'shape':<14} {'kernel':<27} {'dens':>5} {'real':>6} {'ms':>9} {'TFLOP/s':>8} {'flex ms':>9} {'vs flex':>7} {'fa4 ms':>8} {'vs cuDNN*d':>10} {'rel err':>8}"
    print(hdr)
    print("-" * len(hdr))
    for r in results["cases"]:
        if r["kernel"] == "summary":
            continue
        f = lambda key, fmt, r=r: format(r[key], fmt) if r.get(key) is not None else "-"
        print(f"{r['shape']:<14} {r['kernel']:<27} {f('density', '5.2f'):>5} {f('real_density', '6.3f'):>6} "
              f"{f('ms', '9.3f'):>9} {f('tflops', '8.1f'):>8} {f('flex_ms', '9.3f'):>9} {f('vs_flex', '7.2f'):>7} "
              f"{f('fa4_ms', '8.3f'):>8} "
              f"{f('vs_cudnn_scaled', '10.2f'):>10} {f('rel_err', '8.1e'):>8}")
    for r in results["cases"]:
        if r["kernel"] == "summary":
            print("summary:", {k: round(v, 3) for k, v in r.items() if isinstance(v, float)})


if __name__ == "__main__":
    sys.exit(main())
