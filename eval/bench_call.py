"""`dit-sparse bench call`: one whole sparse self-attention call per method, planning included.

What a user's model pays per attention layer and denoising step: the real `SparseAttentionCore` call
(method planning, backend choice, kernel, statistics) on [B, S, H, D] inputs laid out as Diffusers hands
them over, in the same process as cuDNN SDPA dense on the same inputs. Every method runs for whole
re-planning cycles: each timed step is a new denoising step (the step tracker advances and new q/k/v
arrive), so a method that re-plans every `replan_every` steps pays its planning in the mean exactly as
often as in a generation. Also reported per method: planning alone (the method's `plan` on fresh
inputs), the backend that ran, the achieved sparsity, tile efficiency (selected pairs / pairs the
kernel computes), and whether a warm call is free of host synchronisation
(`torch.cuda.set_sync_debug_mode("error")`). Prints a table last and writes JSON.

    python -m dit_sparse.eval.bench_call                       # Wan-1.3B and CogVideoX-5B (CFG) shapes
    python -m dit_sparse.eval.bench_call --shapes wan1.3b-480p --methods semantic,pooled
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass

import torch

from dit_sparse.methods import method_configs, split_method_list, split_method_options
from dit_sparse.methods.skip import SkipConfig
from dit_sparse.methods.window3d import Window3DConfig

from .bench_cli import add_output_options, bench_each, cuda_device_name, write_results


@dataclass(frozen=True)
class CallShape:
    batch: int
    heads: int
    head_dim: int
    grid: tuple[int, int, int]
    text: int = 0
    text_first: bool = False
    reorders: bool = False  # the model's adapter runs its sequence in a method's order (pipelines.reorder)


SHAPES = {
    "wan1.3b-480p": CallShape(1, 12, 128, (21, 30, 52), reorders=True),
    "cogvideox-5b-cfg": CallShape(2, 48, 64, (13, 30, 45), text=226, text_first=True),
    "wan14b-720p": CallShape(1, 40, 128, (21, 45, 80), reorders=True),
    "bundled": CallShape(1, 4, 64, (8, 32, 32), reorders=True),  # the bundled model v2 (one CFG branch per call)
}
METHODS = "window3d,window3d[block=128],semantic,semantic[layout=clusters],pooled,window3d+skip"


def _inputs(shape: CallShape, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Three [B, S, H, D] bf16 tensors with some cluster structure (random centres plus noise)."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    B, H, D = shape.batch, shape.heads, shape.head_dim
    S = shape.grid[0] * shape.grid[1] * shape.grid[2] + shape.text
    out = []
    for _ in range(3):
        centres = torch.randn(B, 64, H, D, device="cuda", generator=g) * 2.0
        pick = torch.randint(0, 64, (B, S), device="cuda", generator=g)
        x = torch.gather(centres, 1, pick[..., None, None].expand(B, S, H, D))
        out.append((x + torch.randn(B, S, H, D, device="cuda", generator=g)).to(torch.bfloat16))
    return out[0], out[1], out[2]


def kernel_pairs(plan, tile: int = 128) -> float:
    """Query-key pairs a kernel computes for `plan`, summed over (B, H): whole blocks for fixed-block
    plans; for variable ranges, whole `tile` x `tile` tiles (a range's rows padded to the tile, its key
    spans cut into tile-wide chunks, as the Triton kernel runs them)."""
    if plan.block_size is not None:
        bq, bk = plan.block_size
        return float(plan.kv_counts.double().sum()) * bq * bk
    from dit_sparse.kernels.triton_prep import key_chunks

    chunks = key_chunks(plan, plan.seq_len_k, tile, False)
    q_len = (plan.q_offsets[..., 1:] - plan.q_offsets[..., :-1]).double()
    tiles = torch.ceil(q_len / tile).reshape(-1, plan.num_q_blocks)
    return float((tiles * chunks.counts.double().sum(-1)).sum()) * tile * tile


@dataclass
class SteppedCall:
    """One layer's sparse attention through the real core, each call a new denoising step (the tracker
    advances, so re-planning happens as often as in a generation). Call it with the step index."""

    core: object
    method: object
    tracker: object
    layout: object
    call: Callable[[int], torch.Tensor]


def stepped_call(spec: str, shape: CallShape, sets: list, sparsity: float, backend: str = "auto",
                 dense_fn: Callable[[int], torch.Tensor] | None = None, reorder: bool = True) -> SteppedCall:
    """The attention core for method `spec` on `shape`, calling it on input set `i % len(sets)`.

    With `reorder` and a shape whose model runs in a method's token order (Wan), the calls see that order
    as in a generation (`ctx.token_order`; the inputs are random, so which order they come in is moot)."""
    from dit_sparse.config import SparseConfig, WarmupConfig
    from dit_sparse.core import SparseAttentionCore
    from dit_sparse.layout import VideoLayout
    from dit_sparse.methods import build_method
    from dit_sparse.tracking import StepTracker

    name, opts = split_method_options(spec)
    method, _ = build_method(name, sparsity, opts)
    tracker = StepTracker(num_steps=10_000)
    tracker.layout = VideoLayout(*shape.grid, text_tokens=shape.text, text_first=shape.text_first)
    core = SparseAttentionCore(SparseConfig(name, sparsity, WarmupConfig(0, 0), None), method, tracker, 1,
                               backend=backend)
    t = [1e6]
    ordered = reorder and shape.reorders

    def call(i: int) -> torch.Tensor:
        t[0] -= 1.0  # a new denoising step: the tracker advances, caches see a new step
        tracker.begin_forward(t[0], "cond", None, None)
        q, k, v = sets[i % len(sets)]
        # What the tracking hook does once per forward (a dictionary lookup after the first).
        tracker.token_order = method.model_order(tracker.layout, q.device) if ordered else None
        return core.attend(q, k, v, layer=0, layer_name="blocks.0.attn1",
                           dense_fn=(lambda: dense_fn(i)) if dense_fn is not None else (lambda: None),
                           text_first=shape.text_first if shape.text else None)

    return SteppedCall(core, method, tracker, tracker.layout, call)


def _cycle(spec: str) -> int:
    """Steps of one re-planning cycle of a method spec: the least common multiple of its replan_every,
    window3d's classify_every and skip's update_every and max_idle_interval (each method of a chain repeats with
    its own period)."""
    chain, opts = split_method_options(spec)  # options apply to the whole chain ("window3d+skip[tol=0.1]")
    n = 1
    for cfg in method_configs(chain, opts):  # the options as the methods read them, defaults included
        n = math.lcm(n, getattr(cfg, "replan_every", 1))
        if isinstance(cfg, Window3DConfig) and cfg.pattern == "auto" and cfg.head_config is None and cfg.window is None:
            n = math.lcm(n, cfg.classify_every)  # the online head choice
        if isinstance(cfg, SkipConfig):  # learning every update_every calls, or max_idle_interval while idle
            n = math.lcm(n, cfg.update_every, cfg.max_idle_interval)
    return n


def bench_shape(key: str, methods: list[str], sparsity: float, steps: int, backend: str, reorder: bool = True
                ) -> list[dict]:
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    shape = SHAPES[key]
    sets = [_inputs(shape, seed) for seed in range(2)]
    B, S, H, D = sets[0][0].shape
    rows: list[dict] = []

    def dense(i: int) -> torch.Tensor:
        q, k, v = (t.transpose(1, 2) for t in sets[i % 2])
        with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
            return F.scaled_dot_product_attention(q, k, v).transpose(1, 2)

    dense_ms = _time_steps(dense, steps)
    base = dict(shape=key, B=B, H=H, S=S, D=D, sparsity=sparsity)
    rows.append(dict(base, method="dense (cuDNN SDPA)", ms=dense_ms, backend="cudnn"))
    for spec in methods:
        row = dict(base, method=spec)
        try:
            name, _ = split_method_options(spec)
            sc = stepped_call(spec, shape, sets, sparsity, backend, dense, reorder)
            core, method, tracker, call, layout = sc.core, sc.method, sc.tracker, sc.call, sc.layout
            cycle = _cycle(spec)
            n = cycle * max(1, math.ceil(steps / cycle))
            for i in range(2 * cycle):  # cold start: compile, first plans, warm k-means
                call(i)
            core.stats.reset()
            row["ms"] = _time_steps(call, n)
            row["timed_steps"] = n
            row["replan_cycle"] = cycle
            row["model_order"] = tracker.token_order is not None
            row["achieved_sparsity"] = round(core.stats.summary()["sparsity_in_sparse_calls"], 4)
            row["fallback_calls"] = core.stats.fallback_calls
            # The plan and backend of the last call, for the tile efficiency.
            q, k, v = (t.transpose(1, 2) for t in sets[0])
            ctx = tracker.context(0, "blocks.0.attn1", 1, sparsity, layout)
            plan = method.plan(q, k, v, ctx)
            from dit_sparse.kernels import select_backend

            chosen, _ = select_backend(q, plan, backend, method.wants_tile_stats)
            row["backend"] = chosen or "dense fallback"
            selected = float(plan.pair_counts().double().sum())
            row["tile_efficiency"] = round(selected / max(kernel_pairs(plan), 1.0), 3)
            row["kernel_ms"] = peer_kernels(q, k, v, plan, method.wants_tile_stats, steps)
            # Planning alone on fresh inputs (new step each time: no plan reuse).
            if name in ("semantic", "pooled"):
                fresh = {"t": 0}

                def plan_only(i: int, method=method, tracker=tracker, fresh=fresh, layout=layout) -> None:
                    fresh["t"] += 1
                    c = tracker.context(0, "blocks.0.attn1", 1, sparsity, layout)
                    c.step = 10**6 + fresh["t"] * 1000  # every call a new step: always re-plans
                    qq, kk, vv = (t.transpose(1, 2) for t in sets[i % 2])
                    method.plan(qq, kk, vv, c)

                row["plan_ms"] = _time_steps(plan_only, steps)
            row["sync_free"] = sync_free(core, lambda call=call: call(10**6))
        except Exception as exc:  # one failing method must not hide the others
            row["error"] = f"{type(exc).__name__}: {exc}"[:400]
        rows.append(row)
        torch.cuda.empty_cache()
    for r in rows:
        r["dense_ms"] = dense_ms
        if r.get("ms"):
            r["speedup"] = round(dense_ms / r["ms"], 3)
    return rows


def peer_kernels(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan, tile_stats: bool, steps: int
                 ) -> dict[str, float]:
    """The attention kernel alone on `plan` (no planning), ms per call on every GPU backend that runs it:
    flash-attn-4, Triton and FlexAttention side by side on the same plan (permutations included)."""
    from dit_sparse.kernels import available_backends, run_backend, select_backend

    out = {}
    for name in ("fa4", "triton", "flex"):
        if name not in available_backends():
            continue
        try:
            select_backend(q, plan, name, tile_stats)
        except ValueError:  # this backend does not run the plan (e.g. flex on variable ranges)
            continue
        fn = lambda i, name=name: run_backend(name, q, k, v, plan, return_tile_stats=tile_stats)
        out[name] = round(_time_steps(fn, steps), 3)
    return out


def sync_free(core, fn) -> str:
    """'yes' when every attention call `core` makes while `fn` runs passes under
    `torch.cuda.set_sync_debug_mode("error")`, else the first error a host synchronisation raised.

    Only the attention calls are checked: the one marked sync of a sparse forward (the step tracker
    reading the timestep, once per forward) and the model's own code are outside them.
    """
    inner = core.attend

    def checked(*args, **kwargs):
        torch.cuda.set_sync_debug_mode("error")
        try:
            return inner(*args, **kwargs)
        finally:
            torch.cuda.set_sync_debug_mode("default")

    torch.cuda.synchronize()
    core.attend = checked
    try:
        fn()
        return "yes"
    except RuntimeError as exc:
        return f"no: {str(exc).splitlines()[0][:160]}"
    finally:
        del core.attend  # the instance attribute shadowed the method
        torch.cuda.synchronize()


def _time_steps(fn, n: int) -> float:
    """Mean ms per call over `n` consecutive calls, timed as one block with CUDA events (after 2 warm-ups)."""
    fn(0)
    fn(1)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for i in range(n):
        fn(i)
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / n


def print_table(rows: list[dict], device: str) -> None:
    print(f"\ndevice: {device}; one sparse self-attention call (planning included, mean over whole re-planning"
          " cycles), bf16")
    hdr = (f"{'shape':<17} {'method':<30} {'backend':<9} {'achvd':>6} {'ms':>8} {'speedup':>7} {'plan ms':>8} "
           f"{'tile eff':>8} {'sync-free':>9}")
    print(hdr)
    print("-" * len(hdr))
    for r in rows:
        f = lambda key, fmt, r=r: format(r[key], fmt) if r.get(key) is not None else "-"
        sync = r.get("sync_free", "-")
        name = r["method"] + (" (model order)" if r.get("model_order") else "")
        print(f"{r['shape']:<17} {name:<30} {r.get('backend', '-'):<9} {f('achieved_sparsity', '6.3f'):>6} "
              f"{f('ms', '8.3f'):>8} {f('speedup', '7.2f'):>7} {f('plan_ms', '8.3f'):>8} "
              f"{f('tile_efficiency', '8.3f'):>8} {sync[:9]:>9}")
        if r.get("kernel_ms"):
            print("    kernel alone on this plan: " + ", ".join(f"{b} {ms:.3f} ms" for b, ms in r["kernel_ms"].items()))
        if r.get("error"):
            print(f"    error: {r['error']}")
        if sync.startswith("no"):
            print(f"    sync: {sync}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="dit-sparse bench call", description=__doc__.split("\n")[0])
    p.add_argument("--shapes", default="wan1.3b-480p,cogvideox-5b-cfg", help=f"comma list of {list(SHAPES)}")
    p.add_argument("--methods", default=METHODS, help="method specs, options in brackets")
    p.add_argument("--sparsity", type=float, default=0.9)
    p.add_argument("--steps", type=int, default=20, help="timed steps per method (rounded up to whole cycles)")
    p.add_argument("--backend", default="auto")
    add_output_options(p, "call", "methods permute q, k, v in every call even where the model could run in "
                       "their order")
    ns = p.parse_args(argv)
    device = cuda_device_name(p.prog)
    if device is None:
        return 2
    rows = bench_each(ns.shapes, list(SHAPES), "shape", lambda key: bench_shape(
        key, split_method_list(ns.methods), ns.sparsity, ns.steps, ns.backend, reorder=not ns.no_reorder))
    if rows is None:
        return 2
    from dit_sparse.kernels import auto_order

    write_results(ns.out, "call", device, {"auto_order": auto_order(), "rows": rows})
    print_table(rows, device)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
