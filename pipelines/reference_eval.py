"""Evaluating reference-model weights (`train_reference --eval` / `--eval-only`): prompt adherence over a
small sampling sweep, chosen on a validation set and reported on the held-out prompts, the attention
concentration of every layer, and sample videos for the grid.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch

from . import adherence
from .clip_prompts import spec_prompts
from .clip_render import render
from .clip_spec import SpecBatch
from .reference_model import ReferenceVideoPipeline, build_scheduler
from .video_data import clip_truths, heldout_prompts, heldout_specs, sample_specs
from .wan import apply_wan_rope

EVAL_SEED_BASE = 10_000  # noise seeds of the evaluation videos (sample i uses EVAL_SEED_BASE + i)
VALIDATION_SEED = 777  # prompt set used to choose sampling settings (distinct from the held-out set)


def rotated_qk(attn, hidden_states: torch.Tensor, rotary_emb) -> tuple[torch.Tensor, torch.Tensor]:
    """Queries and keys [B, S, H, D] of a Wan self-attention module, after its norms and RoPE, as its
    processor computes them."""
    q = attn.norm_q(attn.to_q(hidden_states)).unflatten(2, (attn.heads, -1))
    k = attn.norm_k(attn.to_k(hidden_states)).unflatten(2, (attn.heads, -1))
    if rotary_emb is not None:
        q, k = apply_wan_rope(q, *rotary_emb), apply_wan_rope(k, *rotary_emb)
    return q, k


class _BlockMassProcessor:
    """Wraps a Wan processor; on self-attention, records the attention mass between 64-token blocks."""

    def __init__(self, inner, block: int = 64) -> None:
        self.inner, self.block, self.masses = inner, block, []

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        if encoder_hidden_states is None:
            q, k = rotated_qk(attn, hidden_states, rotary_emb)
            b, s, h, d = q.shape
            nb = s // self.block
            out = torch.empty(b, h, nb, nb, device=q.device)
            for i in range(b):
                for j in range(h):
                    qi, ki = q[i, :, j].float(), k[i, :, j].float()
                    p = torch.softmax(qi @ ki.T / math.sqrt(d), dim=-1)  # [S, S]
                    out[i, j] = p.view(nb, self.block, nb, self.block).sum(-1).mean(1)
            self.masses.append(out.cpu())
        return self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, rotary_emb)


def concentration(mass: torch.Tensor, fractions: tuple[float, ...] = (0.05, 0.10, 0.25)) -> dict[str, float]:
    """Share of attention mass in the top fraction of key blocks per query block (mean over everything),
    and the mean fraction of key blocks needed to hold 90% of the mass."""
    nb = mass.shape[-1]
    srt = mass.sort(dim=-1, descending=True).values.cumsum(-1)
    res = {f"top{round(f * 100)}%": float(srt[..., max(1, round(f * nb)) - 1].mean()) for f in fractions}
    res["density_for_90%"] = float(((srt < 0.9).sum(-1) + 1).float().mean() / nb)
    return res


@torch.no_grad()
def attention_concentration(pipe: ReferenceVideoPipeline, n: int = 4, t: float = 0.5) -> dict[str, dict]:
    """Block-attention concentration of every layer at noise level t on held-out ground-truth clips."""
    device = pipe.transformer.device
    spec = heldout_specs().index(list(range(n)))
    x0 = render(spec.to(device), num_frames=pipe.config.num_frames).float()
    gen = torch.Generator(device=device).manual_seed(0)
    xt = (1 - t) * x0 + t * torch.randn(x0.shape, device=device, generator=gen)
    emb = pipe.encode_prompt(spec_prompts(spec), device)
    originals = {}
    procs = []
    for name, mod in pipe.transformer.named_modules():
        if name.endswith("attn1"):
            originals[name] = mod.get_processor()
            proc = _BlockMassProcessor(originals[name])
            mod.set_processor(proc)
            procs.append((name, proc))
    try:
        ts = torch.full((n,), t * 1000.0, device=device)
        pipe.transformer(hidden_states=xt.to(pipe.transformer.dtype), timestep=ts, encoder_hidden_states=emb)
    finally:
        for name, mod in pipe.transformer.named_modules():
            if name in originals:
                mod.set_processor(originals[name])
    return {name: concentration(proc.masses[0]) for name, proc in procs}


@torch.no_grad()
def generate(
    pipe: ReferenceVideoPipeline, spec: SpecBatch, guidance: float, steps: int, shift: float, chunk: int = 64
) -> np.ndarray:
    """Dense generations [B, F, H, W, 3] in [0, 1] for the prompts of `spec`, seeds EVAL_SEED_BASE + i."""
    pipe.scheduler = build_scheduler(shift)
    prompts = spec_prompts(spec)
    device = pipe.transformer.device
    outs = []
    for s in range(0, len(prompts), chunk):
        gens = [torch.Generator(device=device).manual_seed(EVAL_SEED_BASE + i) for i in range(s, min(len(prompts), s + chunk))]
        outs.append(pipe(prompts[s : s + chunk], guidance_scale=guidance, num_inference_steps=steps, generator=gens).frames)
    return np.concatenate(outs)


def evaluate(pipes: dict[str, ReferenceVideoPipeline], args: argparse.Namespace, out: Path | None) -> dict:
    """Sweep weights x guidance x shift; choose on a validation set, report the held-out set for each."""
    frames = {pipe.config.num_frames for pipe in pipes.values()}
    if len(frames) != 1:
        raise ValueError(f"pipelines to compare make clips of different lengths: {sorted(frames)} frames")
    n_frames = frames.pop()
    held = heldout_specs()
    held_truth = clip_truths(held, n_frames)
    val = sample_specs(64, torch.Generator().manual_seed(VALIDATION_SEED), exclude_prompts=heldout_prompts())
    val_truth = clip_truths(val, n_frames)
    rows = []
    best = None
    for wname, pipe in pipes.items():
        pipe.set_progress_bar_config(disable=True)
        for g in args.guidance:
            for sh in args.shift:
                t0 = time.time()
                v = adherence.score_videos(generate(pipe, val, g, args.eval_steps, sh), val_truth)
                videos = generate(pipe, held, g, args.eval_steps, sh)
                h = adherence.score_videos(videos, held_truth)
                row = {"weights": wname, "guidance": g, "shift": sh, "val_both": v["both"], "heldout": h,
                       "seconds": time.time() - t0}
                rows.append(row)
                print(f"eval {wname} g={g} shift={sh}: val both {v['both']:.3f} | held-out colour "
                      f"{h['colour']:.3f} motion {h['motion']:.3f} both {h['both']:.3f} ({row['seconds']:.0f}s)", flush=True)
                if best is None or v["both"] > best[0]["val_both"]:
                    best = (row, videos)
    assert best is not None
    chosen, videos = best
    conc = attention_concentration(pipes[chosen["weights"]])
    result = {"sweep": rows, "chosen": chosen, "attention": conc, "prompts": spec_prompts(held)}
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "eval.json").write_text(json.dumps(result, indent=1))
        np.savez_compressed(out / "samples.npz", videos=(videos * 255).round().astype(np.uint8),
                            prompts=np.array(result["prompts"]))
    return result
