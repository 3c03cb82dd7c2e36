"""Benchmark 3D tile-window plans ("window3d") on one GPU at a real video grid.

For each tile shape: the budget-sized window plan's attention time on the block-sparse kernel (reading Q/K/V
through the tile-major permutation, and with the permutation applied physically), the same block structure
in identity order on pre-permuted inputs (the kernel's cost of reading through the permutation), a random
128x128 block mask at the same density (the shared kernel's baseline), cuDNN SDPA dense, the time of a
physical permutation of q, k, v plus the inverse on the output, and the planning cost (cold / cached).

    python tools/bench_patterns.py --grid 21 30 52 --heads 12 --sparsity 0.9 --out bench.json

Defaults are Wan2.1-1.3B at 480p, 81 frames (21 x 30 x 52 tokens, 12 heads, head dim 128, bf16).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import platform
import time
from functools import partial

import torch
import torch.nn.functional as F
from dit_sparse.kernels import available_backends, block_sparse_attention

from dit_sparse.context import AttentionContext
from dit_sparse.layout import VideoLayout
from dit_sparse.methods import build_method
from dit_sparse.methods.window3d.patterns import choose_pattern, plan_density
from dit_sparse.methods.window3d.plans import build_plan
from dit_sparse.methods.window3d.tiling import VideoTiling, choose_tile
from dit_sparse.plan import BlockPlan
from dit_sparse.state import LayerStates


def bench(fn, warmup: int = 10, rep: int = 50) -> float:
    """Median milliseconds of `fn` (triton's do_bench when present, else CUDA events)."""
    try:
        from triton.testing import do_bench

        return float(do_bench(fn, warmup=warmup, rep=rep, return_mode="median"))
    except ImportError:
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(rep):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            torch.cuda.synchronize()
            times.append(a.elapsed_time(b))
        return sorted(times)[len(times) // 2]


def random_block_plan(B: int, H: int, S: int, density: float, block: int, device) -> BlockPlan:
    """Fixed-size blocks, identity order, the same number of key blocks per query block (= density)."""
    nb = math.ceil(S / block)
    keep = max(1, round(density * nb))
    g = torch.Generator(device=device).manual_seed(0)
    scores = torch.rand(B, H, nb, nb, generator=g, device=device)
    top = scores.topk(keep, dim=-1).indices
    mask = torch.zeros(B, H, nb, nb, dtype=torch.bool, device=device).scatter_(-1, top, True)
    return BlockPlan.from_block_mask(mask, block, S)


def check_against_reference(device, dtype) -> float:
    """Max |triton - reference| of window plans (exact tiles and fixed blocks) on a small ragged grid with
    text (a sanity check, not timing)."""
    layout = VideoLayout(5, 9, 13, 20, True)
    g = torch.Generator(device=device).manual_seed(0)
    q, k, v = (torch.randn(2, 2, layout.seq_len, 128, generator=g, device=device, dtype=dtype) for _ in range(3))
    worst = 0.0
    for block in (None, 64):
        T = VideoTiling(layout, (2, 4, 8), device=device, block=block)
        plan = build_plan(T, (choose_pattern(T, "window", 0.3), choose_pattern(T, "radial", 0.3)), 2)
        a = block_sparse_attention(q, k, v, plan, backend="triton").out.float()
        b = block_sparse_attention(q, k, v, plan, backend="reference").out.float()
        worst = max(worst, float((a - b).abs().max()))
    return worst


def planning_cost(layout: VideoLayout, tile, block, sparsity: float, H: int, device) -> dict:
    """Seconds for a cold plan (method object, tiling, masks, indices) and a cached per-step plan call."""
    q = torch.empty(1, H, layout.seq_len, 128, device=device, dtype=torch.bfloat16)
    method, _ = build_method("window3d", sparsity, {"pattern": "window", "tile": tile, "block": block})
    states = LayerStates()
    ctx = lambda step: AttentionContext(0, "blocks.0.attn1", 30, step, 50, "cond", layout, sparsity, states)
    t0 = time.perf_counter()
    plan = method.plan(q, q, q, ctx(0))
    if q.is_cuda:
        torch.cuda.synchronize()
    cold = time.perf_counter() - t0
    t0 = time.perf_counter()
    n = 1000
    for step in range(n):
        assert method.plan(q, q, q, ctx(step)) is plan
    hot = (time.perf_counter() - t0) / n
    return {"cold_s": cold, "cached_us": hot * 1e6}


def _cell(row: dict, key: str, fmt: str = "{:.3f}") -> str:
    return fmt.format(row[key]) if key in row else "n/a"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--grid", type=int, nargs=3, default=[21, 30, 52], metavar=("F", "R", "C"))
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--sparsity", type=float, default=0.9)
    ap.add_argument("--tiles", default="auto,auto@128,2x8x8,2x8x8@128,1x8x16",
                    help="comma list of TILE[@BLOCK]: FxRxC or auto; @BLOCK cuts fixed blocks of that size")
    ap.add_argument("--kinds", default="window", help="pattern kinds per tile (comma list)")
    ap.add_argument("--out", default="bench_patterns.json")
    args = ap.parse_args()

    dev, dtype = torch.device("cuda"), torch.bfloat16
    F_, R, C = args.grid
    layout = VideoLayout(F_, R, C)
    B, H, S, D = 1, args.heads, layout.seq_len, args.head_dim
    budget = 1.0 - args.sparsity
    backends = available_backends()
    result: dict = {
        "device": torch.cuda.get_device_name(), "torch": torch.__version__, "python": platform.python_version(),
        "grid": args.grid, "heads": H, "head_dim": D, "seq_len": S, "dtype": "bfloat16",
        "sparsity": args.sparsity, "backends": backends, "rows": [],
    }
    g = torch.Generator(device=dev).manual_seed(0)
    # The processor hands the core [B, S, H, D] tensors; the kernel sees them as [B, H, S, D] views.
    qs, ks, vs = (torch.randn(B, S, H, D, generator=g, device=dev, dtype=dtype) for _ in range(3))
    q, k, v = (t.transpose(1, 2) for t in (qs, ks, vs))
    qc, kc, vc = (t.contiguous() for t in (q, k, v))

    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
        result["cudnn_sdpa_ms"] = bench(lambda: F.scaled_dot_product_attention(qc, kc, vc))
    flops_dense = 4 * B * H * S * S * D
    print(f"cuDNN SDPA dense: {result['cudnn_sdpa_ms']:.3f} ms", flush=True)

    have_triton = "triton" in backends
    if not have_triton:
        result["missing"] = "triton backend not registered: kernel rows skipped"
        print("triton backend missing; available:", backends, flush=True)
    else:
        result["triton_vs_reference_max_abs"] = check_against_reference(dev, dtype)
        print("triton vs reference max abs:", result["triton_vs_reference_max_abs"], flush=True)
        from dit_sparse.kernels.triton_backend import triton_block_sparse_attention

    for tile_s in args.tiles.split(","):
        spec, _, blk = tile_s.partition("@")
        block = int(blk) if blk else None
        tile = choose_tile(layout, block or 128) if spec == "auto" else tuple(int(x) for x in spec.split("x"))
        cost = planning_cost(layout, tile, block, args.sparsity, H, dev)  # first: measures a truly cold plan
        T = VideoTiling(layout, tile, device=dev, block=block)
        # Physical permutation in the processor's [B, S, H, D] layout: q, k, v forward + output inverse.
        perm_ms = bench(lambda T=T: (T.permute(qs, 1), T.permute(ks, 1), T.permute(vs, 1), T.unpermute(qs, 1)))
        sizes = T.unit_offsets[1:] - T.unit_offsets[:-1]
        for kind in args.kinds.split(","):
            pat = choose_pattern(T, kind, budget)
            plan = build_plan(T, (pat,) * H, B)
            dens = plan_density(T, pat)
            row = {"tile": "x".join(map(str, tile)) + (f"@{block}" if block else ""), "kind": kind, "pattern": str(pat), "density": dens,
                   "ranges": T.num_ranges, "units": T.num_units, "full_units": int((sizes == math.prod(tile)).sum()),
                   "perm_plus_inverse_ms": perm_ms, **{f"plan_{k}": v for k, v in cost.items()}}
            if have_triton:
                row["window_ms"] = bench(partial(triton_block_sparse_attention, q, k, v, plan, gather="kernel"))
                row["window_copy_ms"] = bench(partial(triton_block_sparse_attention, q, k, v, plan, gather="copy"))
                ident = dataclasses.replace(plan, q_perm=None, k_perm=None)
                pq, pk, pv = (T.permute(t, 2) for t in (q, k, v))
                row["window_identity_ms"] = bench(partial(triton_block_sparse_attention, pq, pk, pv, ident))
                rnd = random_block_plan(B, H, S, dens, 128, dev)
                row["random_density"] = rnd.density()
                row["random_ms"] = bench(partial(triton_block_sparse_attention, q, k, v, rnd))
                row["window_vs_random"] = row["window_ms"] / row["random_ms"]
                # Same ratio per unit of density (the random mask's density is rounded to whole blocks).
                row["window_vs_random_per_density"] = (row["window_ms"] / dens) / (row["random_ms"] / rnd.density())
                row["perm_read_overhead"] = row["window_ms"] / row["window_identity_ms"] - 1
                row["window_eff_tflops"] = flops_dense * dens / row["window_ms"] / 1e9
                row["speedup_vs_cudnn"] = result["cudnn_sdpa_ms"] / row["window_ms"]
            result["rows"].append(row)
            print(json.dumps(row), flush=True)
            del plan
            torch.cuda.empty_cache()

    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    # Compact table last.
    print(f"\n{result['device']}  grid {F_}x{R}x{C} ({S} tokens), H={H}, D={D}, bf16, sparsity {args.sparsity}")
    print(f"cuDNN SDPA dense {result['cudnn_sdpa_ms']:.3f} ms")
    hdr = ("tile", "pattern", "density", "window ms", "w/copy", "identity", "random", "w/rand", "w/rand per dens",
           "perm+inv", "plan hit")
    print("| " + " | ".join(hdr) + " |")
    for r in result["rows"]:
        get = partial(_cell, r)
        print("| " + " | ".join([
            r["tile"], r["pattern"], f"{r['density']:.4f}", get("window_ms"), get("window_copy_ms"),
            get("window_identity_ms"), get("random_ms"), get("window_vs_random", "{:.2f}x"),
            get("window_vs_random_per_density", "{:.2f}x"),
            get("perm_plus_inverse_ms"), get("plan_cached_us", "{:.1f} us"),
        ]) + " |")


if __name__ == "__main__":
    main()
