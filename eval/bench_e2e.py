"""`dit-sparse bench e2e`: one transformer forward at real model sizes (real configs, random weights).

For each model: dense with cuDNN SDPA, the non-attention floor (self-attention replaced by a zero-cost
stub after the projections, norms and RoPE), and each method x sparsity, all in one process on one GPU.
Prints a table (device, shapes, ms, speed-up, Amdahl bound) and writes JSON. Also estimates a whole
50-step generation with the dense warm-up: warm-up steps at the dense time, the rest at the sparse time.
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from dit_sparse.methods import split_method_list

from .bench_call import _cycle, sync_free
from .bench_cli import add_output_options, bench_each, cuda_device_name, write_results

WAN_13B = dict(patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128, in_channels=16,
               out_channels=16, text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=30, cross_attn_norm=True,
               qk_norm="rms_norm_across_heads", eps=1e-6)
WAN_14B = dict(WAN_13B, num_attention_heads=40, ffn_dim=13824, num_layers=40)


@dataclass
class ModelCase:
    name: str
    build: Callable[[], torch.nn.Module]
    inputs: Callable[[torch.nn.Module], dict[str, Any]]
    shape: str


def _wan_case(name: str, cfg: dict, latent: tuple[int, ...]) -> ModelCase:
    def build():
        from diffusers import WanTransformer3DModel

        return WanTransformer3DModel(**cfg)

    def inputs(m):
        return dict(hidden_states=torch.randn(*latent, device="cuda", dtype=torch.bfloat16),
                    encoder_hidden_states=torch.randn(1, 512, 4096, device="cuda", dtype=torch.bfloat16),
                    timestep=torch.tensor([500.0], device="cuda"))

    f, h, w = latent[2], latent[3] // 2, latent[4] // 2
    return ModelCase(name, build, inputs, f"{cfg['num_attention_heads']} heads x {f}x{h}x{w}={f * h * w} tokens")


def _hunyuan_case() -> ModelCase:
    def build():
        from diffusers import HunyuanVideoTransformer3DModel

        return HunyuanVideoTransformer3DModel()  # defaults are HunyuanVideo's released config

    def inputs(m):
        return dict(hidden_states=torch.randn(1, 16, 33, 90, 160, device="cuda", dtype=torch.bfloat16),
                    timestep=torch.tensor([500.0], device="cuda"),
                    encoder_hidden_states=torch.randn(1, 256, 4096, device="cuda", dtype=torch.bfloat16),
                    encoder_attention_mask=torch.ones(1, 256, device="cuda", dtype=torch.bool),
                    pooled_projections=torch.randn(1, 768, device="cuda", dtype=torch.bfloat16),
                    guidance=torch.tensor([6000.0], device="cuda"))

    return ModelCase("hunyuanvideo-720p-129f", build, inputs, "24 heads x 33x45x80=118800 + 256 text tokens")


def _cogvideox_case(batch: int = 1) -> ModelCase:
    def build():
        from diffusers import CogVideoXTransformer3DModel

        return CogVideoXTransformer3DModel(num_attention_heads=48, attention_head_dim=64, num_layers=42,
                                           use_rotary_positional_embeddings=True)

    def inputs(m):
        from diffusers.models.embeddings import get_3d_rotary_pos_embed

        cos, sin = get_3d_rotary_pos_embed(embed_dim=64, crops_coords=((0, 0), (30, 45)), grid_size=(30, 45),
                                           temporal_size=13, device="cuda")
        return dict(hidden_states=torch.randn(batch, 13, 16, 60, 90, device="cuda", dtype=torch.bfloat16),
                    encoder_hidden_states=torch.randn(batch, 226, 4096, device="cuda", dtype=torch.bfloat16),
                    timestep=torch.tensor([500] * batch, device="cuda"), image_rotary_emb=(cos, sin))

    name = "cogvideox-5b-49f" + ("-cfg" if batch == 2 else "")
    return ModelCase(name, build, inputs, f"B={batch}, 48 heads (d64) x 13x30x45=17550 + 226 text tokens")


CASES: dict[str, Callable[[], ModelCase]] = {
    "wan1.3b-480p": lambda: _wan_case("wan2.1-1.3b-480p-81f", WAN_13B, (1, 16, 21, 60, 104)),
    "wan14b-720p": lambda: _wan_case("wan2.1-14b-720p-81f", WAN_14B, (1, 16, 21, 90, 160)),
    "hunyuan-720p": _hunyuan_case,
    "cogvideox-5b": _cogvideox_case,
    "cogvideox-5b-cfg": lambda: _cogvideox_case(batch=2),  # CFG as the pipeline runs it: both branches batched
}


def _time_ms(fn: Callable[[], Any], reps: int) -> float:
    """Median wall time of `reps` synchronised calls, in ms."""
    times = []
    for _ in range(reps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1000)
    times.sort()
    return times[len(times) // 2]


def _time_block_ms(fn: Callable[[], Any], n: int) -> float:
    """Mean ms per call over `n` consecutive calls timed as one block (what a run of steps costs)."""
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) * 1000 / n


def bench_model(case: ModelCase, methods: list[str], sparsities: list[float], reps: int,
                backend: str, compile: bool = False, reorder: bool = True) -> list[dict]:
    """Rows of forward times for dense, the attention-free floor and each method; with `compile`, Diffusers'
    regional compile (`compile_repeated_blocks(fullgraph=True)`) runs for all of them."""
    from diffusers.models.attention_dispatch import attention_backend

    import dit_sparse
    from dit_sparse.methods import split_method_options

    with torch.device("cuda"):
        model = case.build().to(torch.bfloat16).eval()
    kwargs = case.inputs(model)
    rows: list[dict] = []
    tag = " (compiled)" if compile else ""
    order_tag = "" if reorder else " (per-call perms)"
    if compile:  # the same compiled block class serves dense, floor and every method (each recompiles once)
        model.compile_repeated_blocks(fullgraph=True)
    step = {"t": 999.0}

    def forward():
        # A decreasing timestep makes the step tracker advance, as in a real denoising loop.
        step["t"] = max(step["t"] - 1.0, 1.0)
        kwargs["timestep"] = torch.full_like(kwargs["timestep"], step["t"])
        return model(**kwargs, return_dict=False)

    with torch.no_grad(), attention_backend("_native_cudnn"):
        forward()
        dense = _time_ms(forward, reps)
        rows.append(dict(model=case.name, shape=case.shape, method="dense (cuDNN SDPA)" + tag, sparsity=0.0,
                         ms=dense))
        # Zero-cost self-attention: the floor. A non-zero sparsity keeps the compiled path on the sparse op.
        handle = dit_sparse.apply(model, "full", 0.5)
        handle.core.attend = lambda q, k, v, **kw: torch.empty_like(v)
        forward()
        floor = _time_ms(forward, reps)
        handle.remove()
        rows.append(dict(model=case.name, shape=case.shape, method="floor (self-attn stubbed)" + tag, sparsity=None,
                         ms=floor))
        for method in methods:
            for s in sparsities:
                row = dict(model=case.name, shape=case.shape, method=method + tag + order_tag, sparsity=s)
                name, opts = split_method_options(method)
                try:
                    handle = dit_sparse.apply(model, name, s, warmup_steps=0, warmup_layers=0, backend=backend,
                                              reorder_tokens=reorder, **opts)
                    # Whole re-planning cycles, each forward a new denoising step: planning is paid in the
                    # mean as often as in a generation (replan_every / window3d's classify_every).
                    cycle = _cycle(method)
                    for _ in range(2 * cycle):  # cold caches, kernel compilation, warm k-means
                        forward()
                    handle.core.stats.reset()
                    n = cycle * max(1, math.ceil(reps / cycle))
                    row["ms"] = _time_block_ms(forward, n)
                    row["timed_steps"] = n
                    row["achieved_sparsity"] = round(handle.stats()["sparsity_in_sparse_calls"], 4)
                    row["fallback_calls"] = handle.stats()["fallback_calls"]
                    row["sync_free"] = sync_free(handle.core, forward)
                    handle.remove()
                    if compile:  # another processor set would compile once more: no 50-step estimate
                        rows.append(row)
                        continue
                    # the same method with the default dense first layer, for the 50-step estimate
                    handle = dit_sparse.apply(model, name, s, warmup_steps=0, warmup_layers=1, backend=backend,
                                              reorder_tokens=reorder, **opts)
                    forward()
                    row["ms_warmup_layer"] = _time_ms(forward, max(1, reps // 2))
                    handle.remove()
                except Exception as exc:  # report and continue: one failing method must not hide the rest
                    row["error"] = f"{type(exc).__name__}: {exc}"[:300]
                    dit_sparse.remove(model)
                rows.append(row)
    attn = dense - floor
    for r in rows:
        r["dense_ms"] = dense
        r["floor_ms"] = floor
        if r.get("ms"):
            r["speedup"] = round(dense / r["ms"], 3)
        if r.get("sparsity"):
            r["amdahl_bound"] = round(dense / (floor + (1 - r["sparsity"]) * attn), 3)
        if r.get("ms_warmup_layer"):
            warm = math.ceil(0.2 * 50)
            r["est_50_steps_s"] = round((warm * dense + (50 - warm) * r["ms_warmup_layer"]) / 1000, 2)
            r["est_50_steps_speedup"] = round(50 * dense / (warm * dense + (50 - warm) * r["ms_warmup_layer"]), 3)
    return rows


def print_table(rows: list[dict], device: str) -> None:
    print(f"\ndevice: {device}; one transformer forward, B=1, bf16, random weights from real configs")
    hdr = f"{'model':<24} {'method':<37} {'spars':>6} {'achvd':>6} {'ms':>9} {'speedup':>8} {'bound':>6} {'50-step est':>12}"
    print(hdr)
    print("-" * len(hdr))
    for r in rows:
        ms = f"{r['ms']:.1f}" if r.get("ms") else "ERR"
        print(f"{r['model']:<24} {r['method']:<37} {'' if r['sparsity'] is None else r['sparsity']:>6} "
              f"{r.get('achieved_sparsity', ''):>6} {ms:>9} {r.get('speedup', ''):>8} {r.get('amdahl_bound', ''):>6} "
              f"{str(r.get('est_50_steps_speedup', '')) + ('x' if r.get('est_50_steps_speedup') else ''):>12}")
        if r.get("error"):
            print(f"    error: {r['error']}")
        if str(r.get("sync_free", "yes")).startswith("no"):
            print(f"    sync: {r['sync_free']}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="dit-sparse bench e2e", description=__doc__)
    p.add_argument("--models", default="wan1.3b-480p", help=f"comma list of {sorted(CASES)}")
    p.add_argument("--methods", default="semantic,window3d,pooled",
                   help="method specs, options in brackets: 'semantic[replan_every=5],pooled'")
    p.add_argument("--sparsities", default="0.9,0.95")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--backend", default="auto")
    p.add_argument("--compile", action="store_true",
                   help="Diffusers' regional compile (compile_repeated_blocks(fullgraph=True)) for every row")
    add_output_options(p, "e2e", "keep per-call permutations where the model could run in a method's token "
                       "order")
    ns = p.parse_args(argv)
    device = cuda_device_name(p.prog, " (real model sizes)")
    if device is None:
        return 2

    def bench(key: str) -> list[dict]:
        rows = bench_model(CASES[key](), split_method_list(ns.methods),
                           [float(s) for s in ns.sparsities.split(",")], ns.reps, ns.backend, ns.compile,
                           reorder=not ns.no_reorder)
        torch.cuda.empty_cache()  # the model of that case is gone with bench_model's frame
        return rows

    rows = bench_each(ns.models, sorted(CASES), "model", bench)
    if rows is None:
        return 2
    write_results(ns.out, "e2e", device, {"rows": rows})
    print_table(rows, device)
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
