"""`dit-sparse generate`: one video with sparse attention, optionally compared with dense."""

from __future__ import annotations

import argparse
import contextlib
import io
import sys
from pathlib import Path

import torch

import dit_sparse
from dit_sparse.config import ConfigError
from dit_sparse.parallel import enable_ulysses, init_distributed

from .adapters import UnsupportedModelError
from .loading import BUNDLED, ModelLoadError, load_model, resolve_device
from .runner import RunSettings, check_applies, check_run, parse_options, timed_generation
from .video_io import VIDEO_EXTENSIONS, OutputPathError, check_video_path, write_video

DEFAULT_PROMPT = "a red disc moves right and a blue square moves up on a striped background"
# The method the committed evaluation (benchmarks/reference-eval/results.json) ranks best at sparsity 0.9
# on the bundled model (v2, 8 held-out prompts, first 30% of steps dense, H200). Semantic re-clusters every
# 5th step here: the same quality as every step at a fifth of the k-means and selection work.
DEFAULT_METHOD = "semantic[replan_every=5]"
EVAL_RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "reference-eval" / "results.json"
# Whole generations of the bundled model, sparse against dense, measured per device kind (README's figures).
MAIN_COMMAND_TIMES = Path(__file__).resolve().parents[1] / "benchmarks" / "main-command.json"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=BUNDLED,
                   help="'bundled' (default: the trained reference video DiT in assets/), 'tiny' (random "
                        "weights, code-path check only), a local pipeline folder (a Diffusers one, or one "
                        "written by `dit-sparse train-reference --out`) or a Hub id")
    p.add_argument("--prompt", default=DEFAULT_PROMPT)
    p.add_argument("--method", default=DEFAULT_METHOD,
                   help=f"one of {dit_sparse.available_methods()} or 'a+b' (default {DEFAULT_METHOD}: the best "
                        "method at 0.9 in the committed evaluation of the bundled model, benchmarks/reference-eval)")
    p.add_argument("--sparsity", type=float, default=0.9, help="fraction of query-key pairs skipped, in [0, 1)")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--warmup", type=float, default=0.2, help="dense warm-up: fraction (<1) or count of steps")
    p.add_argument("--warmup-layers", type=int, default=1)
    p.add_argument("--out", default="out/video.mp4", help=f"output video ({' or '.join(VIDEO_EXTENSIONS)})")
    p.add_argument("--compare-dense", action="store_true", help="also run dense; print PSNR/SSIM and speed-up")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--opt", action="append", default=[], metavar="KEY=VALUE",
                   help="a method option, e.g. --opt tol=0.05 --opt replan_every=5 (repeatable)")
    p.add_argument("--backend", default="auto", help="kernel backend: auto, reference, triton, flex")
    p.add_argument("--cp", type=int, default=1, metavar="N",
                   help="Ulysses context parallelism over N processes: launch with `torchrun --nproc-per-node N` "
                        "(see docs/context-parallel.md); rank 0 prints and writes the video")


def _fmt_s(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.2f} s"


def run(ns: argparse.Namespace) -> int:
    """Run `dit-sparse generate`; returns the exit code (2 with a one-line error for bad arguments)."""
    rank = 0
    try:
        # Every argument is checked before the model loads: a mistake must not cost a generation.
        if ns.cp < 1:
            raise ConfigError(f"--cp must be >= 1, got {ns.cp}")
        out_path = check_video_path(ns.out)
        settings = RunSettings(steps=ns.steps, warmup_steps=ns.warmup, warmup_layers=ns.warmup_layers,
                               backend=ns.backend, options=parse_options(ns.opt))
        device = resolve_device(ns.device)
        dtype = None if ns.dtype == "auto" else getattr(torch, ns.dtype)
        check_run(ns.method, ns.sparsity, settings, device, dtype)
        if ns.cp > 1:
            rank, world, device = init_distributed(device)
            if world != ns.cp:
                raise ConfigError(f"--cp {ns.cp} needs exactly {ns.cp} processes, torchrun started {world}: "
                                  f"use `torchrun --nproc-per-node {ns.cp}`")
        loaded = load_model(ns.model, device, dtype)
        if ns.cp > 1:
            try:
                enable_ulysses(loaded.pipe.transformer, ns.cp)
            except ValueError as exc:  # e.g. heads not divisible, or a backend without context parallelism
                raise ConfigError(f"cannot run {ns.model} with --cp {ns.cp}: {exc}") from exc
        check_applies(loaded, ns.method, ns.sparsity, settings)
    except (ConfigError, ModelLoadError, OutputPathError, UnsupportedModelError, ValueError) as exc:
        print(f"dit-sparse generate: error: {exc}", file=sys.stderr)
        _stop_distributed(ns)
        return 2
    # Every rank runs the same generation; only rank 0 reports and writes.
    if rank and hasattr(loaded.pipe, "set_progress_bar_config"):
        loaded.pipe.set_progress_bar_config(disable=True)
    quiet = contextlib.redirect_stdout(io.StringIO()) if rank else contextlib.nullcontext()
    try:
        with quiet:
            return _generate(ns, loaded, device, out_path, settings, write=rank == 0)
    finally:
        _stop_distributed(ns)


def _stop_distributed(ns: argparse.Namespace) -> None:
    if ns.cp > 1 and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def _generate(ns: argparse.Namespace, loaded, device: torch.device, out_path, settings: RunSettings,
              write: bool) -> int:
    print(f"model: {loaded.name} - {loaded.description}")
    print(f"device: {device}  method: {ns.method}  sparsity: {ns.sparsity}  steps: {ns.steps}  seed: {ns.seed}"
          + (f"  context parallel: Ulysses x{ns.cp} (rank 0 of {ns.cp} reports its own heads' sparsity)"
             if ns.cp > 1 else ""))

    dense = None
    if ns.compare_dense:
        dense = timed_generation(loaded, ns.prompt, ns.seed, device, "dense", 0.0, settings)
    sparse = timed_generation(loaded, ns.prompt, ns.seed, device, ns.method, ns.sparsity, settings,
                              warm_sparse=ns.compare_dense)
    written = write_video(sparse.frames, out_path) if write else out_path

    st = sparse.stats
    rest = None if sparse.attention_s is None else sparse.total_s - sparse.attention_s
    print(f"achieved sparsity: {st['sparsity_in_sparse_calls']:.3f} in sparse calls, "
          f"{st['sparsity_overall']:.3f} over all self-attention "
          f"({st['sparse_calls']} sparse, {st['dense_calls']} dense calls"
          + (f", {st['fallback_calls']} fell back to dense" if st["fallback_calls"] else "") + ")")
    print(f"time: total {_fmt_s(sparse.total_s)}, attention {_fmt_s(sparse.attention_s)}, rest {_fmt_s(rest)}")
    if dense is not None:
        print(f"dense: total {_fmt_s(dense.total_s)}, attention {_fmt_s(dense.attention_s)}")
        speed = dense.total_s / sparse.total_s
        line = f"speed-up vs dense: {speed:.2f}x end-to-end"
        if dense.attention_s and sparse.attention_s:
            line += f", {dense.attention_s / sparse.attention_s:.2f}x in attention"
        print(line + (" (CPU timings)" if device.type == "cpu" else ""))
        from dit_sparse.eval.metrics import lpips_distance, psnr, ssim

        lp = lpips_distance(dense.frames, sparse.frames)
        lp_text = f"{lp:.4f}" if isinstance(lp, float) else f"unavailable ({lp})"
        print(f"quality vs dense: PSNR {psnr(dense.frames, sparse.frames):.2f} dB, "
              f"SSIM {ssim(dense.frames, sparse.frames):.4f}, LPIPS {lp_text}")
    else:
        for committed in (committed_speed(ns.model, ns.method, ns.sparsity, device.type, ns.steps),
                          committed_quality(ns.model, ns.method, ns.sparsity)):
            if committed:
                print(committed)
    print(f"wrote {Path(written)}")
    return 0


def _same_setting(row: dict, method: str, sparsity: float) -> bool:
    """Whether a committed row (evaluation or timing) measured this method at this sparsity."""
    return row.get("method") == method and abs(float(row.get("sparsity", -1)) - sparsity) < 1e-9


def committed_quality(model: str, method: str, sparsity: float) -> str | None:
    """What the committed evaluation measured for this method and sparsity on the bundled model, labelled
    as such (None for other models, or when the evaluation has no such row or is not shipped)."""
    if model != BUNDLED or not EVAL_RESULTS.is_file():
        return None
    import json

    data = json.loads(EVAL_RESULTS.read_text())
    for row in data.get("rows", []):
        if _same_setting(row, method, sparsity) and row.get("psnr"):
            meta = data.get("meta", {})
            setup = [meta.get("device"), meta.get("date")]
            if meta.get("prompts"):
                setup.append(f"{len(meta['prompts'])} held-out prompts")
            if isinstance(meta.get("warmup_steps"), (int, float)) and meta["warmup_steps"] < 1:
                setup.append(f"first {100 * meta['warmup_steps']:.0f}% of steps dense")
            where = ", ".join(str(x) for x in setup if x)
            return (f"quality (committed evaluation{f', {where}' if where else ''}, not this run): PSNR "
                    f"{row['psnr']:.2f} dB vs dense; add --compare-dense to measure this run")
    return None


def committed_speed(model: str, method: str, sparsity: float, device_type: str, steps: int = 30) -> str | None:
    """What a committed measurement of this command (same method, sparsity and steps) found for sparse
    against dense time on this kind of device (bundled model only), labelled as such; None when there is
    none."""
    if model != BUNDLED or not MAIN_COMMAND_TIMES.is_file():
        return None
    import json

    for run in json.loads(MAIN_COMMAND_TIMES.read_text()).get("runs", []):
        if run.get("device") == device_type and run.get("steps") == steps and _same_setting(run, method, sparsity):
            ratio = run["dense_s"] / run["sparse_s"]
            verdict = f"{ratio:.2f}x faster than dense" if ratio >= 1 else f"{1 / ratio:.2f}x slower than dense"
            return (f"speed (committed measurement, {run['machine']}, {run['date']}, not this run): {verdict} end to "
                    f"end ({_fmt_s(run['sparse_s'])} vs {_fmt_s(run['dense_s'])}); add --compare-dense to measure this run")
    return None
