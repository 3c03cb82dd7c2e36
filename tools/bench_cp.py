"""Sparse attention under Ulysses context parallelism: one Wan2.1-14B 720p forward on 1 and 2 GPUs.

Launch (2 GPUs of one host; the NVLink-multicast switches are also set below, before torch.distributed):

    NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 \\
        torchrun --nproc-per-node 2 tools/bench_cp.py [--methods semantic,window3d] [--sparsity 0.9]

Real config, random weights, bf16, B=1, 21x45x80 = 75,600 tokens (model and inputs from
`dit_sparse.eval.bench_e2e`, seeded identically on every rank). Phase 1: rank 0 alone, no context
parallelism (rank 1 waits). Phase 2: both ranks with `ContextParallelConfig(ulysses_degree=2)`.
Each row: dense (cuDNN SDPA; Diffusers' own Ulysses under CP) or a method at the sparsity, median
forward time (slowest rank), speed-up vs dense on the same GPU count and vs dense on 1 GPU, and the
largest difference of the first forward's output from the 1-GPU output of the same configuration.
Rank 0 prints a table and writes JSON.
"""

from __future__ import annotations

import os

# NVLink multicast (NVLS / symmetric memory) stays off on the lent machines: set before torch.distributed.
os.environ["NCCL_NVLS_ENABLE"] = "0"
os.environ["TORCH_SYMM_MEM_DISABLE_MULTICAST"] = "1"
os.environ["NVSHMEM_DISABLE_NVLS"] = "1"

import argparse  # noqa: E402
import datetime  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from typing import Any  # noqa: E402

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

MODEL_KEY = "wan14b-720p"


def _timed(fn: Callable[[], Any], reps: int, group_size: int) -> float:
    """Median over `reps` of the slowest participating rank's wall time, in ms."""
    times = []
    for _ in range(reps):
        torch.cuda.synchronize()
        if group_size > 1:
            dist.barrier()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        ms = (time.perf_counter() - t0) * 1000
        if group_size > 1:
            slowest = torch.tensor([ms], device="cuda")
            dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
            ms = float(slowest)
        times.append(ms)
    times.sort()
    return times[len(times) // 2]


def _measure(model, kwargs: dict, configs: list[tuple[str, float]], reps: int, gpus: int,
             backend: str) -> list[dict]:
    """One row per (method, sparsity); "dense" is the model's own attention."""
    import dit_sparse

    rows = []
    t = {"t": 999.0}

    def forward(fixed: bool = False):
        # A decreasing timestep advances the step tracker as a denoising loop does.
        t["t"] = 999.0 if fixed else max(t["t"] - 1.0, 1.0)
        kwargs["timestep"] = torch.full_like(kwargs["timestep"], t["t"])
        return model(**kwargs, return_dict=False)[0]

    for method, sparsity in configs:
        row: dict[str, Any] = dict(gpus=gpus, method=method, sparsity=sparsity)
        handle = None
        try:
            if method != "dense":
                handle = dit_sparse.apply(model, method, sparsity, warmup_steps=0, warmup_layers=0, backend=backend)
            row["first_out"] = forward(fixed=True).float().cpu()  # cold caches, fixed timestep: comparable
            forward()
            if handle is not None:
                handle.core.stats.reset()
            row["ms"] = _timed(forward, reps, gpus)
            if handle is not None:
                row["achieved_sparsity_rank0"] = round(handle.stats()["sparsity_in_sparse_calls"], 4)
        except Exception as exc:  # report and continue: one failing method must not hide the rest
            row["error"] = f"{type(exc).__name__}: {exc}"[:300]
        finally:
            dit_sparse.remove(model)
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", default="semantic,window3d")
    p.add_argument("--sparsity", type=float, default=0.9)
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--backend", default="auto", help="dit-sparse kernel backend")
    p.add_argument("--skip-single", action="store_true", help="skip the 1-GPU phase")
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/cp-<gpu>.json)")
    ns = p.parse_args(argv)
    if not torch.cuda.is_available() or "WORLD_SIZE" not in os.environ:
        print("tools/bench_cp.py: needs CUDA GPUs and a torchrun launch (see the module docstring)")
        return 2

    from dit_sparse.eval.bench_e2e import CASES

    from dit_sparse.parallel import enable_ulysses

    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    torch.cuda.set_device(local_rank)
    dist.init_process_group("nccl", timeout=datetime.timedelta(minutes=30))
    rank, world = dist.get_rank(), dist.get_world_size()
    case = CASES[MODEL_KEY]()
    torch.manual_seed(0)  # identical random weights and inputs on every rank
    with torch.device("cuda"):
        model = case.build().to(torch.bfloat16).eval()
    model.set_attention_backend("_native_cudnn")  # dense reference, and Diffusers' Ulysses backend under CP
    torch.manual_seed(1)
    kwargs = case.inputs(model)
    configs = [("dense", 0.0)] + [(m, ns.sparsity) for m in ns.methods.split(",") if m]

    rows: list[dict] = []
    with torch.no_grad():
        if not ns.skip_single:
            if rank == 0:
                rows += _measure(model, kwargs, configs, ns.reps, 1, ns.backend)
            dist.barrier()
        enable_ulysses(model, world)
        rows += _measure(model, kwargs, configs, ns.reps, world, ns.backend)

    if rank == 0:
        _report(rows, case.shape, world, ns)
    dist.barrier()
    dist.destroy_process_group()
    return 0


def _report(rows: list[dict], shape: str, world: int, ns: argparse.Namespace) -> None:
    device = torch.cuda.get_device_name()
    dense = {r["gpus"]: r.get("ms") for r in rows if r["method"] == "dense"}
    first = {(r["method"], r["gpus"]): r.pop("first_out", None) for r in rows}
    for r in rows:
        if r.get("ms"):
            if dense.get(r["gpus"]):
                r["speedup_same_gpus"] = round(dense[r["gpus"]] / r["ms"], 3)
            if dense.get(1):
                r["speedup_vs_1gpu_dense"] = round(dense[1] / r["ms"], 3)
        ref, out = first.get((r["method"], 1)), first.get((r["method"], r["gpus"]))
        if r["gpus"] > 1 and ref is not None and out is not None:
            r["max_abs_diff_vs_1gpu"] = float((out - ref).abs().max())
    print(f"\ndevice: {world} x {device}; Wan2.1-14B 720p ({shape}), one forward, B=1, bf16, random weights")
    hdr = f"{'gpus':>4} {'method':<10} {'spars':>6} {'achvd r0':>8} {'ms':>9} {'x same':>7} {'x 1gpu':>7} {'diff vs 1gpu':>13}"
    print(hdr)
    print("-" * len(hdr))
    for r in rows:
        ms = f"{r['ms']:.1f}" if r.get("ms") else "ERR"
        diff = r.get("max_abs_diff_vs_1gpu")
        print(f"{r['gpus']:>4} {r['method']:<10} {r['sparsity']:>6} {r.get('achieved_sparsity_rank0', ''):>8} {ms:>9} "
              f"{r.get('speedup_same_gpus', ''):>7} {r.get('speedup_vs_1gpu_dense', ''):>7} "
              f"{'' if diff is None else f'{diff:.3g}':>13}")
        if r.get("error"):
            print(f"    error: {r['error']}")
    out = ns.out or os.path.join("benchmarks", f"cp-{device.replace(' ', '_')}.json")
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    with open(out, "w") as f:
        json.dump({"device": device, "gpus": world, "torch": torch.__version__, "model": MODEL_KEY,
                   "shape": shape, "rows": rows}, f, indent=1)
    print(f"wrote {out}")


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
