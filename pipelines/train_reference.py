"""Train (and evaluate) the bundled reference text-to-video DiT on procedural clips, on one GPU.

    python -m dit_sparse.pipelines.train_reference --out assets/reference-video-dit

Flow matching in pixel space: x_t = (1 - t) x0 + t eps, the transformer predicts eps - x0, t is
logit-normal; AdamW (fused), bf16 autocast, TF32, cosine learning rate, EMA of the weights, 10% empty
prompts for classifier-free guidance. Clips are rendered on the GPU every step from specs drawn on the CPU
with a seeded generator; the held-out evaluation prompts never occur in training.

Long trainings run as several runs of at most `--max-minutes` each: `--checkpoint FILE` saves the whole
training state at the end of a run, `--resume` continues from it, and `--total-minutes` spreads the
learning-rate schedule over all runs.

`--eval-only DIR` evaluates a saved pipeline: prompt adherence on the held-out set over a small sampling
sweep, attention concentration, and sample videos for the grid.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from . import adherence
from . import video_data as vd
from .reference_model import (
    ReferenceVideoPipeline,
    build_scheduler,
    build_text_encoder,
    build_transformer,
)

CHECKPOINT_FORMAT = "dit-sparse/train-reference-checkpoint-v1"
EVAL_SEED_BASE = 10_000  # noise seeds of the evaluation videos (sample i uses EVAL_SEED_BASE + i)
VALIDATION_SEED = 777  # prompt set used to choose sampling settings (distinct from the held-out set)


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("assets/reference-video-dit"), help="pipeline folder")
    p.add_argument("--steps", type=int, default=100_000, help="upper bound on optimizer steps")
    p.add_argument(
        "--max-minutes", type=float, default=8.0,
        help="this run's training wall time (compile included)",
    )
    p.add_argument(
        "--total-minutes", type=float, default=None,
        help="training time over all runs of a resumed training; the cosine LR schedule runs over it "
        "(default: --max-minutes, one run)",
    )
    p.add_argument("--run-steps", type=int, default=None, help="stop this run after this many optimizer steps")
    p.add_argument(
        "--checkpoint", type=Path, default=None,
        help="file for the whole training state (weights, optimizer, EMA, data and noise generators, step), "
        "written at the end of the run",
    )
    p.add_argument("--resume", action="store_true", help="continue from --checkpoint when it exists")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=7e-4)
    p.add_argument("--warmup", type=int, default=200)
    p.add_argument("--min-lr-ratio", type=float, default=0.05)
    p.add_argument("--ema", type=float, default=0.999, help="EMA decay (0 disables)")
    p.add_argument("--cfg-drop", type=float, default=0.1, help="fraction of empty prompts")
    p.add_argument("--two-object-prob", type=float, default=0.3)
    p.add_argument("--pan-prob", type=float, default=0.25)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tiny", action="store_true", help="toy-size model (CPU smoke tests only)")
    p.add_argument("--compile", choices=["none", "blocks"], default="blocks", help="regional torch.compile")
    p.add_argument("--log-every", type=int, default=50)
    p.add_argument("--bench", action="store_true", help="time eager vs compiled steps, then exit")
    p.add_argument("--eval-only", type=Path, default=None, help="evaluate the pipeline saved in this folder")
    p.add_argument("--eval", action="store_true", help="evaluate right after training")
    p.add_argument("--eval-out", type=Path, default=None, help="where evaluation JSON / samples go")
    p.add_argument("--eval-steps", type=int, default=30)
    p.add_argument("--guidance", type=float, nargs="+", default=[3.0, 5.0, 8.0])
    p.add_argument("--shift", type=float, nargs="+", default=[1.0, 3.0])
    return p.parse_args(argv)


class Trainer:
    """Model, optimizer, EMA and the on-the-fly data stream of one training run."""

    def __init__(self, args: argparse.Namespace, device: torch.device) -> None:
        self.args, self.device = args, device
        torch.manual_seed(args.seed)
        self.transformer = build_transformer(args.tiny).to(device)
        self.text_encoder = build_text_encoder(args.tiny).to(device)
        self.params = [p for m in (self.transformer, self.text_encoder) for p in m.parameters()]
        self.opt = torch.optim.AdamW(
            self.params, lr=args.lr, betas=(0.9, 0.99), weight_decay=0.01, fused=device.type == "cuda"
        )
        self.ema = [p.detach().clone() for p in self.params] if args.ema > 0 else None
        self.data_gen = torch.Generator().manual_seed(args.seed + 1)
        self.noise_gen = torch.Generator(device=device).manual_seed(args.seed + 2)
        self.exclude = vd.heldout_prompts()
        self.empty_ids = self.text_encoder.tokenize("")[0]
        self.step = 0

    def batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """One training batch: clips [B, 3, F, H, W] on the device and token ids [B, L] (some dropped)."""
        a = self.args
        spec = vd.sample_specs(
            a.batch, self.data_gen, two_object_prob=a.two_object_prob, pan_prob=a.pan_prob, exclude_prompts=self.exclude
        )
        ids = self.text_encoder.tokenize(vd.spec_prompts(spec))
        drop = torch.rand(a.batch, generator=self.data_gen) < a.cfg_drop
        ids[drop] = self.empty_ids
        x0 = vd.render(spec.to(self.device))
        return x0, ids.to(self.device, non_blocking=True)

    def lr_at(self, step: int, progress: float) -> float:
        """Linear warm-up over `--warmup` steps, then cosine decay over the run's progress in [0, 1]
        (the fraction of the time budget or of `--steps` used, whichever is larger)."""
        a = self.args
        if step < a.warmup:
            return a.lr * (step + 1) / a.warmup
        prog = min(1.0, progress)
        return a.lr * (a.min_lr_ratio + (1 - a.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * prog)))

    def train_step(self, progress: float = 0.0) -> torch.Tensor:
        """One optimizer step at run progress `progress`; returns the loss as a device tensor (no sync)."""
        x0, ids = self.batch()
        b = x0.shape[0]
        t = torch.sigmoid(torch.randn(b, device=self.device, generator=self.noise_gen))
        eps = torch.randn(x0.shape, device=self.device, generator=self.noise_gen)
        tt = t.view(b, 1, 1, 1, 1)
        xt = (1 - tt) * x0 + tt * eps
        with torch.autocast(self.device.type, dtype=torch.bfloat16):
            emb = self.text_encoder(ids)
            pred = self.transformer(
                hidden_states=xt, timestep=t * 1000.0, encoder_hidden_states=emb, return_dict=False
            )[0]
        loss = F.mse_loss(pred.float(), eps - x0)
        for group in self.opt.param_groups:
            group["lr"] = self.lr_at(self.step, progress)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0, foreach=True)
        self.opt.step()
        if self.ema is not None:
            decay = min(self.args.ema, (1 + self.step) / (10 + self.step))
            torch._foreach_lerp_(self.ema, [p.detach() for p in self.params], 1 - decay)
        self.step += 1
        return loss.detach()

    # ------------------------------------------------------------------ checkpoints
    def state(self, minutes: float, history: list) -> dict:
        """Everything a later run needs to continue exactly where this one stopped."""
        a = self.args
        return {
            "format": CHECKPOINT_FORMAT,
            "step": self.step,
            "minutes": minutes,
            "history": history,
            "model": {"tiny": a.tiny, "params": [tuple(p.shape) for p in self.params]},
            "params": [p.detach().cpu() for p in self.params],
            "ema": None if self.ema is None else [e.cpu() for e in self.ema],
            "opt": self.opt.state_dict(),
            "data_gen": self.data_gen.get_state(),
            "noise_gen": self.noise_gen.get_state(),
        }

    def load_state(self, state: dict) -> None:
        """Continue from `state` (from `state()`); a checkpoint of another model size is a clear error."""
        if state.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(f"not a {CHECKPOINT_FORMAT} checkpoint (format {state.get('format')!r})")
        shapes = [tuple(p.shape) for p in self.params]
        if state["model"]["params"] != shapes:
            raise ValueError("the checkpoint holds another model size (--tiny differs?): start without --resume")
        with torch.no_grad():
            for p, saved in zip(self.params, state["params"]):
                p.copy_(saved)
            if self.ema is not None and state["ema"] is not None:
                for e, saved in zip(self.ema, state["ema"]):
                    e.copy_(saved)
        self.opt.load_state_dict(state["opt"])
        self.data_gen.set_state(state["data_gen"])
        self.noise_gen.set_state(state["noise_gen"])
        self.step = int(state["step"])

    def pipeline(self, use_ema: bool, dtype: torch.dtype = torch.bfloat16) -> ReferenceVideoPipeline:
        """A pipeline holding a copy of the current (or EMA) weights in `dtype`."""
        tr, te = build_transformer(self.args.tiny), build_text_encoder(self.args.tiny)
        src = self.ema if (use_ema and self.ema is not None) else [p.detach() for p in self.params]
        dst = [p for m in (tr, te) for p in m.parameters()]
        with torch.no_grad():
            for d, s in zip(dst, src):
                d.copy_(s.cpu())
        pipe = ReferenceVideoPipeline(_cast(tr, dtype), _cast(te, dtype), build_scheduler())
        return pipe.to(self.device)


def _cast(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """Cast to `dtype` but keep the model's `_keep_in_fp32_modules` (RoPE, time embedder, norms) in float32,
    as `from_pretrained(dtype=...)` does, so in-process evaluation matches the loaded pipeline."""
    keep = getattr(model, "_keep_in_fp32_modules", None) or []
    for p in model.parameters():
        p.data = p.data.to(dtype)
    for name, mod in model.named_modules():
        if any(k in name.split(".") for k in keep):
            for p in mod.parameters(recurse=True):
                p.data = p.data.float()
    return model


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def bench(args: argparse.Namespace, device: torch.device) -> dict[str, float]:
    """Steps per second eager vs with regional compilation (compile time reported separately)."""
    out: dict[str, float] = {}
    trainer = Trainer(args, device)
    for name in ("eager", "compiled"):
        if name == "compiled":
            t0 = time.time()
            trainer.transformer.compile_repeated_blocks(fullgraph=False)
            for _ in range(3):
                trainer.train_step()
            _sync(device)
            out["compile_s"] = time.time() - t0
        for _ in range(5):
            trainer.train_step()
        _sync(device)
        t0 = time.time()
        n = 30
        for _ in range(n):
            trainer.train_step()
        _sync(device)
        out[f"{name}_steps_per_s"] = n / (time.time() - t0)
        print(f"bench {name}: {out[f'{name}_steps_per_s']:.2f} steps/s at batch {args.batch}", flush=True)
    out["peak_mem_gb"] = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else 0.0
    return out


def train(args: argparse.Namespace, device: torch.device) -> tuple[Trainer, dict]:
    """Run training until `--steps`, the run's `--max-minutes` or `--run-steps`, or the end of the
    `--total-minutes` schedule (after `--resume`: continuing the checkpoint's step, weights, optimizer,
    EMA and generators); returns the trainer and a log dict (earlier runs of a resumed training in it)."""
    trainer = Trainer(args, device)
    minutes_before, history = 0.0, []
    if args.resume and args.checkpoint is not None and args.checkpoint.exists():
        state = torch.load(args.checkpoint, map_location="cpu", weights_only=False)
        trainer.load_state(state)
        minutes_before, history = float(state["minutes"]), list(state["history"])
        print(f"resumed from {args.checkpoint}: step {trainer.step}, {minutes_before:.1f} min trained", flush=True)
    if args.compile == "blocks":
        trainer.transformer.compile_repeated_blocks(fullgraph=False)
    losses: list[tuple[int, float]] = []
    acc, count = torch.zeros((), device=device), 0
    t0 = time.time()
    total = (args.total_minutes or args.max_minutes) * 60
    first_step = trainer.step
    progress = 0.0
    while trainer.step < args.steps and progress < 1.0:
        elapsed = time.time() - t0
        if elapsed >= args.max_minutes * 60 or (args.run_steps is not None and trainer.step - first_step >= args.run_steps):
            break
        progress = max((minutes_before * 60 + elapsed) / total, trainer.step / args.steps)
        acc += trainer.train_step(progress)
        count += 1
        if trainer.step % args.log_every == 0 or trainer.step == args.steps:
            loss = float(acc) / count
            losses.append((trainer.step, loss))
            acc, count = torch.zeros((), device=device), 0
            elapsed = time.time() - t0
            lr = trainer.opt.param_groups[0]["lr"]
            print(f"step {trainer.step} loss {loss:.4f} lr {lr:.2e} {elapsed:.0f}s", flush=True)
    if count:
        losses.append((trainer.step, float(acc) / count))
    _sync(device)
    wall = time.time() - t0
    run = {
        "steps": trainer.step,
        "run_steps": trainer.step - first_step,
        "wall_s": wall,
        "steps_per_s": (trainer.step - first_step) / wall,
        "clips_seen": trainer.step * args.batch,
        "losses": losses,
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
    }
    log = dict(run, minutes_total=minutes_before + wall / 60, earlier_runs=history)
    if args.checkpoint is not None:
        args.checkpoint.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.checkpoint.with_name(args.checkpoint.name + ".tmp")
        torch.save(trainer.state(minutes_before + wall / 60, history + [run]), tmp)
        tmp.replace(args.checkpoint)  # atomic: a run cut off while writing leaves the previous checkpoint
    return trainer, log


def save_pipeline(pipe: ReferenceVideoPipeline, out: Path) -> int:
    """Save as safetensors (weights as they are: bf16, small fp32 modules); returns the weight bytes."""
    pipe.save_pretrained(str(out), safe_serialization=True)
    return sum(f.stat().st_size for f in out.rglob("*.safetensors"))


# ----------------------------------------------------------------------------------------------- evaluation


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # Same rotation as Diffusers' WanAttnProcessor (interleaved pairs).
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    c, s = cos[..., 0::2], sin[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2] = x1 * c - x2 * s
    out[..., 1::2] = x1 * s + x2 * c
    return out


class _BlockMassProcessor:
    """Wraps a Wan processor; on self-attention, records the attention mass between 64-token blocks."""

    def __init__(self, inner, block: int = 64) -> None:
        self.inner, self.block, self.masses = inner, block, []

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        if encoder_hidden_states is None:
            q = attn.norm_q(attn.to_q(hidden_states)).unflatten(2, (attn.heads, -1))
            k = attn.norm_k(attn.to_k(hidden_states)).unflatten(2, (attn.heads, -1))
            if rotary_emb is not None:
                q, k = _rope(q, *rotary_emb), _rope(k, *rotary_emb)
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
    spec = vd.heldout_specs().index(list(range(n)))
    x0 = vd.render(spec.to(device)).float()
    gen = torch.Generator(device=device).manual_seed(0)
    xt = (1 - t) * x0 + t * torch.randn(x0.shape, device=device, generator=gen)
    emb = pipe.encode_prompt(vd.spec_prompts(spec), device)
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
    pipe: ReferenceVideoPipeline, spec: vd.SpecBatch, guidance: float, steps: int, shift: float, chunk: int = 64
) -> np.ndarray:
    """Dense generations [B, F, H, W, 3] in [0, 1] for the prompts of `spec`, seeds EVAL_SEED_BASE + i."""
    pipe.scheduler = build_scheduler(shift)
    prompts = vd.spec_prompts(spec)
    device = pipe.transformer.device
    outs = []
    for s in range(0, len(prompts), chunk):
        gens = [torch.Generator(device=device).manual_seed(EVAL_SEED_BASE + i) for i in range(s, min(len(prompts), s + chunk))]
        outs.append(pipe(prompts[s : s + chunk], guidance_scale=guidance, num_inference_steps=steps, generator=gens).frames)
    return np.concatenate(outs)


def evaluate(pipes: dict[str, ReferenceVideoPipeline], args: argparse.Namespace, out: Path | None) -> dict:
    """Sweep weights x guidance x shift; choose on a validation set, report the held-out set for each."""
    held = vd.heldout_specs()
    held_truth = vd.clip_truths(held)
    val = vd.sample_specs(64, torch.Generator().manual_seed(VALIDATION_SEED), exclude_prompts=vd.heldout_prompts())
    val_truth = vd.clip_truths(val)
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
    result = {"sweep": rows, "chosen": chosen, "attention": conc, "prompts": vd.spec_prompts(held)}
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "eval.json").write_text(json.dumps(result, indent=1))
        np.savez_compressed(out / "samples.npz", videos=(videos * 255).round().astype(np.uint8),
                            prompts=np.array(result["prompts"]))
    return result


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; see the module docstring."""
    args = _parse(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    if args.bench:
        print(json.dumps(bench(args, device)))
        return 0
    if args.eval_only is not None:
        pipe = ReferenceVideoPipeline.from_pretrained(str(args.eval_only), dtype=torch.bfloat16, local_files_only=True)
        res = evaluate({"saved": pipe.to(device)}, args, args.eval_out)
        print(json.dumps({"chosen": res["chosen"], "attention": res["attention"]}, indent=1))
        return 0
    trainer, log = train(args, device)
    pipes = {"ema": trainer.pipeline(use_ema=True), "raw": trainer.pipeline(use_ema=False)} if trainer.ema else {
        "raw": trainer.pipeline(use_ema=False)}
    log["params"] = sum(p.numel() for p in trainer.params)
    args.out.mkdir(parents=True, exist_ok=True)
    for name, pipe in pipes.items():
        folder = args.out if name == next(iter(pipes)) else args.out.parent / f"{args.out.name}-{name}"
        log[f"weight_bytes_{name}"] = save_pipeline(pipe, folder)
    (args.out / "train_log.json").write_text(json.dumps(log, indent=1))
    print(f"trained {log['steps']} steps in {log['wall_s']:.0f}s ({log['steps_per_s']:.2f}/s), saved to {args.out}")
    if args.eval:
        res = evaluate(pipes, args, args.eval_out or args.out.parent / "eval")
        if res["chosen"]["weights"] != next(iter(pipes)):
            # The raw weights won on validation: make them the saved pipeline.
            save_pipeline(pipes[res["chosen"]["weights"]], args.out)
        build_scheduler(res["chosen"]["shift"]).save_pretrained(str(args.out / "scheduler"))
        print(json.dumps({"chosen": res["chosen"], "attention": res["attention"]}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
