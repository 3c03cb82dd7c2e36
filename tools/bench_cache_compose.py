"""Bundled model: a Diffusers cache hook, sparse attention, and both together (time and PSNR vs dense).

One process, same prompt and seed for every configuration; each generation follows a short warm run.
Times are whole generations on whatever device runs it (CPU or GPU), labelled with the device.

    python tools/bench_cache_compose.py --threshold 0.1 --method window3d
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch


def main(argv=None) -> int:
    from diffusers.hooks import FirstBlockCacheConfig
    from dit_sparse.eval.metrics import psnr
    from dit_sparse.pipelines.generate import DEFAULT_PROMPT
    from dit_sparse.pipelines.loading import load_model, resolve_device
    from dit_sparse.pipelines.runner import RunSettings, timed_generation

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--method", default="window3d")
    p.add_argument("--sparsity", type=float, default=0.9)
    p.add_argument("--threshold", type=float, default=0.1, help="FirstBlockCache threshold")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--device", default="auto")
    p.add_argument("--out", default=None)
    ns = p.parse_args(argv)
    device = resolve_device(ns.device)
    loaded = load_model("bundled", device)
    settings = RunSettings(steps=ns.steps)
    rows = []

    def run(label: str, sparsity: float, cache: bool) -> None:
        transformer = loaded.pipe.transformer
        if cache:
            transformer.enable_cache(FirstBlockCacheConfig(threshold=ns.threshold))
        try:
            res = timed_generation(loaded, DEFAULT_PROMPT, 0, device, ns.method if sparsity else "dense",
                                   sparsity, settings)
        finally:
            if cache:
                transformer.disable_cache()
        rows.append(dict(config=label, total_s=res.total_s, frames=res.frames))

    run("dense", 0.0, False)
    run(f"FirstBlockCache(threshold={ns.threshold})", 0.0, True)
    run(f"{ns.method} at {ns.sparsity}", ns.sparsity, False)
    run(f"{ns.method} at {ns.sparsity} + FirstBlockCache", ns.sparsity, True)
    dense = rows[0]
    name = torch.cuda.get_device_name() if device.type == "cuda" else f"cpu ({os.cpu_count()} cores)"
    print(f"\nbundled model, {ns.steps} steps, CFG, device {name}")
    print(f"{'configuration':<46} {'total s':>8} {'vs dense':>9} {'PSNR dB':>8}")
    for r in rows:
        r["speedup"] = dense["total_s"] / r["total_s"]
        r["psnr"] = None if r is dense else psnr(dense["frames"], r["frames"])
        ps = "-" if r["psnr"] is None else f"{r['psnr']:.2f}"
        print(f"{r['config']:<46} {r['total_s']:8.2f} {r['speedup']:8.2f}x {ps:>8}")
    if ns.out:
        with open(ns.out, "w") as f:
            json.dump({"device": name, "steps": ns.steps, "rows": [{k: v for k, v in r.items() if k != "frames"}
                                                                  for r in rows]}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
