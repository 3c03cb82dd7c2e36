"""Training the bundled reference DiT: the `Trainer` (model, optimizer, EMA, data stream, one step) and the
loop that runs it for a run's time budget (`train`), plus a speed check of eager vs compiled steps (`bench`).

Flow matching in pixel space: x_t = (1 - t) x0 + t eps, the transformer predicts eps - x0, t is
logit-normal; AdamW (fused), bf16 autocast, cosine learning rate, EMA of the weights, `--cfg-drop` empty
prompts for classifier-free guidance. Clips are rendered on the device every step from specs drawn on the
CPU with a seeded generator; the held-out evaluation prompts never occur in training. The settings are
the `train_reference` command's arguments.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from .clip_prompts import spec_prompts
from .clip_render import CLIP_SIZE, render
from .reference_checkpoint import init_from_pipeline, resume, save_checkpoint
from .reference_model import ReferenceVideoPipeline, build_scheduler, build_text_encoder, build_transformer
from .video_data import heldout_prompts, sample_specs

EASY_PATHS = ("left", "right", "up", "down")  # the curriculum's paths (notes: motion is learnt last)


class Trainer:
    """Model, optimizer, EMA and the on-the-fly data stream of one training run."""

    def __init__(self, args: argparse.Namespace, device: torch.device) -> None:
        self.args, self.device = args, device
        torch.manual_seed(args.seed)
        self.transformer = build_transformer(args.tiny, **transformer_overrides(args)).to(device)
        self.text_encoder = build_text_encoder(args.tiny).to(device)
        self.params = [p for m in (self.transformer, self.text_encoder) for p in m.parameters()]
        self.opt = torch.optim.AdamW(
            self.params, lr=args.lr, betas=(0.9, 0.99), weight_decay=0.01, fused=device.type == "cuda"
        )
        self.ema = [p.detach().clone() for p in self.params] if args.ema > 0 else None
        self.data_gen = torch.Generator().manual_seed(args.seed + 1)
        self.noise_gen = torch.Generator(device=device).manual_seed(args.seed + 2)
        self.exclude = heldout_prompts()
        self.empty_ids = self.text_encoder.tokenize("")[0]
        self.step = 0

    def batch(self, progress: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
        """One training batch: clips [B, 3, F, H, W] on the device and token ids [B, L] (some dropped).

        While `progress` is below `--curriculum`, only easy clips: one solid object on an axis path, no pan.
        """
        a = self.args
        if progress < a.curriculum:
            spec = sample_specs(a.batch, self.data_gen, two_object_prob=0.0, pan_prob=0.0, exclude_prompts=self.exclude,
                                paths=EASY_PATHS, textures=("solid",))
        else:
            spec = sample_specs(a.batch, self.data_gen, two_object_prob=a.two_object_prob, pan_prob=a.pan_prob,
                                exclude_prompts=self.exclude)
        ids = self.text_encoder.tokenize(spec_prompts(spec))
        drop = torch.rand(a.batch, generator=self.data_gen) < a.cfg_drop
        ids[drop] = self.empty_ids
        x0 = render(spec.to(self.device), num_frames=a.frames)
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
        x0, ids = self.batch(progress)
        b = x0.shape[0]
        # Logit-normal noise levels; --t-mean > 0 puts more steps at high noise, where motion is decided.
        t = torch.sigmoid(torch.randn(b, device=self.device, generator=self.noise_gen) + self.args.t_mean)
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

    def pipeline(self, use_ema: bool, dtype: torch.dtype = torch.bfloat16) -> ReferenceVideoPipeline:
        """A pipeline holding a copy of the current (or EMA) weights in `dtype`."""
        tr, te = build_transformer(self.args.tiny, **transformer_overrides(self.args)), build_text_encoder(self.args.tiny)
        src = self.ema if (use_ema and self.ema is not None) else [p.detach() for p in self.params]
        dst = [p for m in (tr, te) for p in m.parameters()]
        with torch.no_grad():
            for d, s in zip(dst, src):
                d.copy_(s.cpu())
        pipe = ReferenceVideoPipeline(_cast(tr, dtype), _cast(te, dtype), build_scheduler(), num_frames=self.args.frames,
                                      height=CLIP_SIZE, width=CLIP_SIZE)
        return pipe.to(self.device)


_SIZE_OPTIONS = {"heads": "num_attention_heads", "head_dim": "attention_head_dim", "ffn": "ffn_dim",
                 "layers": "num_layers"}


def transformer_overrides(args: argparse.Namespace) -> dict:
    """Transformer config entries set by the options: the patch (`--patch`) and, where given, the model size
    (`--heads`, `--head-dim`, `--ffn`, `--layers`)."""
    out: dict = {"patch_size": (1, args.patch, args.patch)}
    for opt, key in _SIZE_OPTIONS.items():
        if getattr(args, opt, None) is not None:
            out[key] = getattr(args, opt)
    return out


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
        minutes_before, history = resume(trainer, args.checkpoint)
    elif args.init_from is not None:
        init_from_pipeline(trainer, args.init_from)
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
        save_checkpoint(trainer, args.checkpoint, minutes_before + wall / 60, history + [run])
    return trainer, log
