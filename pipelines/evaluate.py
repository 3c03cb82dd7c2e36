"""`dit-sparse eval`: dense plus each method x sparsity over prompts and seeds, with a report.

Every sparse video is compared with the dense video of the same prompt and seed (PSNR, SSIM, LPIPS when
available), plus no-reference VBench-style metrics and, on the bundled model, prompt adherence against
the prompt's exact ground truth. Writes results.json, report.md, report.html and pareto.png.
"""

from __future__ import annotations

import argparse
import datetime
import math
import sys
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from dit_sparse.config import ConfigError, check_sparsity
from dit_sparse.methods import split_method_list, split_method_options

from .adapters import UnsupportedModelError
from .loading import BUNDLED, ModelLoadError, load_model, reference_clip_frames, resolve_device
from .runner import RunSettings, check_applies, check_run, parse_options, timed_generation

FRAME_INDICES = 4  # frames shown side by side in the report


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=BUNDLED, help="'bundled' (default), 'tiny', a local folder or Hub id")
    p.add_argument("--methods", default="semantic,pooled,window3d",
                   help="comma list; 'a+b' composes; options in brackets: 'window3d[pattern=spatial]'")
    p.add_argument("--sparsities", default="0.75,0.9,0.95")
    p.add_argument("--prompts", type=int, default=8,
                   help="number of held-out prompts of the bundled model's evaluation set")
    p.add_argument("--prompt", action="append", default=None, help="explicit prompt(s) (repeatable)")
    p.add_argument("--seeds", default="0", help="comma list of seeds")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=float, default=0.2)
    p.add_argument("--warmup-layers", type=int, default=1)
    p.add_argument("--out", default="out/eval", help="report folder")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--opt", action="append", default=[], metavar="KEY=VALUE",
                   help="a method option, e.g. --opt tol=0.05 --opt replan_every=5 (repeatable)")
    p.add_argument("--backend", default="auto")
    p.add_argument("--lpips-weights", default=None, help="local LPIPS backbone checkpoint (file or folder)")


def _prompt_set(ns: argparse.Namespace) -> tuple[list[str], list[Any] | None]:
    """Prompts, and their ground truths when the bundled model's held-out set is used."""
    if ns.prompt:
        return list(ns.prompt), None
    frames = reference_clip_frames(ns.model)
    if frames is None:  # not one of our reference models: no ground truth to score against
        from .generate import DEFAULT_PROMPT

        return [DEFAULT_PROMPT], None
    from .clip_prompts import spec_prompts
    from .video_data import clip_truths, heldout_specs

    specs = heldout_specs()
    n = min(ns.prompts, len(spec_prompts(specs)))
    idx = list(range(n))
    sub = specs.index(idx)
    return spec_prompts(sub), clip_truths(sub, frames)


def _int_list(text: str, flag: str) -> list[int]:
    """'0,1,2' -> [0, 1, 2]; ConfigError naming `flag` unless it is a non-empty comma list of integers."""
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        values = []
    if not values:
        raise ConfigError(f"{flag} must be a comma list of integers such as 0,1,2; got {text!r}")
    return values


def _mean(xs: list[float]) -> float | None:
    xs = [x for x in xs if x is not None and not (isinstance(x, float) and math.isnan(x))]
    return float(np.mean(xs)) if xs else None


def _aggregate(per: dict, truths: list | None) -> list[dict[str, Any]]:
    from dit_sparse.eval.metrics import Unavailable

    rows = []
    for (method, s), recs in per.items():
        if not recs:
            continue
        row: dict[str, Any] = dict(method=method, sparsity=s,
                                   achieved_sparsity=_mean([r["sparsity"] for r in recs]),
                                   achieved_sparsity_overall=_mean([r["sparsity_overall"] for r in recs]),
                                   attention_time_s=_mean([r["attention_s"] for r in recs]),
                                   total_time_s=_mean([r["total_s"] for r in recs]))
        if method != "dense":
            row["psnr"] = _mean([r["psnr"] for r in recs])
            row["ssim"] = _mean([r["ssim"] for r in recs])
            lp = [r["lpips"] for r in recs]
            row["lpips"] = lp[0] if isinstance(lp[0], Unavailable) else _mean(lp)
        keys = recs[0]["vbench"].keys()
        row["vbench"] = {k: _mean([r["vbench"][k] for r in recs if isinstance(r["vbench"][k], (int, float))])
                         for k in keys}
        if truths is not None:
            row["adherence"] = _mean([r["adherence"] for r in recs])
        rows.append(row)
    return rows


def run(ns: argparse.Namespace) -> int:
    """Run `dit-sparse eval`; returns the exit code (2 with a one-line error for bad arguments)."""
    from dit_sparse.eval.metrics import Unavailable, find_lpips_backbone, lpips_distance, psnr, ssim
    from dit_sparse.eval.report import OutputDirError, ensure_writable, write_report
    from dit_sparse.eval.vbench_style import video_metrics

    try:
        # Every argument is checked before the model loads: a mistake must not cost an evaluation.
        sparsities = [check_sparsity(s) for s in ns.sparsities.split(",") if s]
        if not sparsities:
            raise ConfigError(f"--sparsities needs at least one value in [0, 1), got {ns.sparsities!r}")
        methods = [m for m in split_method_list(ns.methods) if m != "dense"]  # dense always runs
        seeds = _int_list(ns.seeds, "--seeds")
        if ns.prompts < 1:
            raise ConfigError(f"--prompts must be >= 1, got {ns.prompts}")
        settings = RunSettings(steps=ns.steps, warmup_steps=ns.warmup, warmup_layers=ns.warmup_layers,
                               backend=ns.backend, options=parse_options(ns.opt))
        device = resolve_device(ns.device)
        dtype = None if ns.dtype == "auto" else getattr(torch, ns.dtype)
        # "full" ignores the sparsity target (e.g. "full+skip" = skip caching alone): run it once.
        configs = [("dense", 0.0)] + [(m, s) for m in methods
                                      for s in (sparsities[:1] if split_method_options(m)[0].split("+")[0] == "full"
                                                else sparsities)]
        for m, s in configs:
            check_run(m, s, settings, device, dtype)
        if ns.lpips_weights is not None:  # an explicit path that is wrong is a mistake, not "unavailable"
            found = find_lpips_backbone(lpips_weights=ns.lpips_weights)
            if isinstance(found, Unavailable):
                raise ConfigError(f"--lpips-weights: {found.reason}; {found.how_to_fix}")
        try:
            out = ensure_writable(ns.out)
        except OutputDirError as exc:
            raise OutputDirError(f"--out: {exc}") from exc
        loaded = load_model(ns.model, device, dtype)
        for m, s in configs:
            check_applies(loaded, m, s, settings)
    except (ConfigError, ModelLoadError, UnsupportedModelError, OSError, ValueError) as exc:
        print(f"dit-sparse eval: error: {exc}", file=sys.stderr)
        return 2
    if hasattr(loaded.pipe, "set_progress_bar_config"):
        loaded.pipe.set_progress_bar_config(disable=True)
    prompts, truths = _prompt_set(ns)
    videos = [(i, p, seed) for i, p in enumerate(prompts) for seed in seeds]
    per: dict[tuple[str, float], list[dict[str, Any]]] = {c: [] for c in configs}
    dense_frames: dict[tuple[int, int], np.ndarray] = {}
    side_by_side = []
    meta = dict(model=loaded.name, device=str(device) if device.type == "cpu" else torch.cuda.get_device_name(),
                date=datetime.datetime.now(datetime.timezone.utc).date().isoformat(), prompts=prompts, seeds=seeds,
                steps=ns.steps, warmup_steps=ns.warmup, warmup_layers=ns.warmup_layers,
                commands=["dit-sparse eval " + " ".join(sys.argv[2:])])
    bar = tqdm(total=len(configs) * len(videos), desc="eval", unit="video")
    for method, s in configs:
        for vi, (i, prompt, seed) in enumerate(videos):
            res = timed_generation(loaded, prompt, seed, device, method, s, settings, warm_run=vi == 0,
                                  warm_sparse=True)
            rec: dict[str, Any] = dict(total_s=res.total_s, attention_s=res.attention_s,
                                       sparsity=res.stats["sparsity_in_sparse_calls"],
                                       sparsity_overall=res.stats["sparsity_overall"])
            if method == "dense":
                dense_frames[(i, seed)] = res.frames
            else:
                ref = dense_frames[(i, seed)]
                rec["psnr"] = psnr(ref, res.frames, max_db=100.0)
                rec["ssim"] = ssim(ref, res.frames)
                rec["lpips"] = lpips_distance(ref, res.frames, lpips_weights=ns.lpips_weights)
                if vi == 0:
                    idx = np.linspace(0, len(ref) - 1, FRAME_INDICES).round().astype(int).tolist()
                    side_by_side.append(dict(title=f"{method} @ {s}: {prompt}", dense=ref, sparse=res.frames,
                                             indices=idx))
            vm = video_metrics(res.frames)
            rec["vbench"] = {k: (v.get("value") if isinstance(v, dict) else v) for k, v in vm.items()}
            if truths is not None:
                from .adherence import check_video

                rec["adherence"] = float(check_video(res.frames, truths[i]).ok)
            per[(method, s)].append(rec)
            bar.update(1)
        # Rewrite the report after every configuration: a long run that is stopped keeps what it measured.
        write_report(dict(meta=meta, rows=_aggregate(per, truths), frames=side_by_side), out)
    bar.close()
    rows = _aggregate(per, truths)

    try:
        paths = write_report(dict(meta=meta, rows=rows, frames=side_by_side), out)
    except OutputDirError as exc:
        print(f"dit-sparse eval: error: {exc}", file=sys.stderr)
        return 2
    print(f"\n{'method':<18} {'sparsity':>8} {'achieved':>8} {'PSNR':>7} {'SSIM':>7} {'adher.':>6} "
          f"{'attn s':>8} {'total s':>8}")
    for r in rows:
        f = lambda v, fmt: "-" if v is None else format(v, fmt)
        print(f"{r['method']:<18} {r['sparsity']:>8} {f(r['achieved_sparsity'], '.3f'):>8} "
              f"{f(r.get('psnr'), '.2f'):>7} {f(r.get('ssim'), '.4f'):>7} {f(r.get('adherence'), '.2f'):>6} "
              f"{f(r['attention_time_s'], '.2f'):>8} {f(r['total_time_s'], '.2f'):>8}")
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0
