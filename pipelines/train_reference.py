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
from pathlib import Path

import torch

# This module is the command: its arguments and `main`. The training is in `reference_trainer`, its
# checkpoints in `reference_checkpoint`, the evaluation in `reference_eval`.
from .clip_render import CLIP_FRAMES
from .reference_card import write_model_card
from .reference_eval import attention_concentration, evaluate
from .reference_model import ReferenceVideoPipeline, build_scheduler, save_pipeline
from .reference_trainer import bench, train


def _positive_int(text: str) -> int:
    """argparse type of the model-size options: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return value


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
    p.add_argument("--init-from", type=Path, default=None, metavar="FOLDER",
                   help="start from the weights of a saved pipeline (e.g. assets/reference-video-dit) with a fresh "
                        "optimizer and schedule; a checkpoint that --resume finds takes precedence")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=7e-4)
    p.add_argument("--warmup", type=int, default=200)
    p.add_argument("--min-lr-ratio", type=float, default=0.05)
    p.add_argument("--ema", type=float, default=0.999, help="EMA decay (0 disables)")
    p.add_argument("--cfg-drop", type=float, default=0.1, help="fraction of empty prompts")
    p.add_argument("--curriculum", type=float, default=0.0,
                   help="fraction of the training (by progress) on easy clips only: one solid object, axis paths, "
                        "no pan")
    p.add_argument("--t-mean", type=float, default=0.0,
                   help="location of the logit-normal noise levels, t = sigmoid(N(t_mean, 1)); > 0 trains more at "
                        "high noise, where a clip's motion is decided")
    p.add_argument("--two-object-prob", type=float, default=0.3)
    p.add_argument("--pan-prob", type=float, default=0.25)
    p.add_argument("--frames", type=int, default=CLIP_FRAMES,
                   help="frames per clip (tokens = frames x (64 / patch)^2; 16 -> 4,096 with patch 4)")
    p.add_argument("--patch", type=int, default=4, choices=[1, 2, 4, 8], help="spatial patch size of the transformer")
    for flag, what in (("--heads", "attention heads"), ("--head-dim", "head dim"), ("--ffn", "MLP width"),
                       ("--layers", "transformer blocks")):
        p.add_argument(flag, type=_positive_int, default=None,
                       help=f"{what} (default: the bundled model's; see reference_model)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tiny", action="store_true", help="toy-size model (CPU smoke tests only)")
    p.add_argument("--compile", choices=["none", "blocks"], default="blocks", help="regional torch.compile")
    p.add_argument("--log-every", type=int, default=50)
    p.add_argument("--bench", action="store_true", help="time eager vs compiled steps, then exit")
    p.add_argument("--eval-only", type=Path, default=None, help="evaluate the pipeline saved in this folder")
    p.add_argument("--attention-only", action="store_true",
                   help="with --eval-only: measure the attention concentration only (no adherence sweep)")
    p.add_argument("--card", type=Path, default=None,
                   help="write the model card of this saved folder (MODEL_CARD.md, figures from its files and "
                        "--eval-out's eval.json), then exit")
    p.add_argument("--eval", action="store_true", help="evaluate right after training")
    p.add_argument("--eval-out", type=Path, default=None, help="where evaluation JSON / samples go")
    p.add_argument("--eval-steps", type=int, default=30)
    p.add_argument("--guidance", type=float, nargs="+", default=[3.0, 5.0, 8.0])
    p.add_argument("--shift", type=float, nargs="+", default=[1.0, 3.0])
    args = p.parse_args(argv)
    if not 0.0 <= args.curriculum <= 1.0:
        p.error(f"--curriculum is a fraction of the training in [0, 1], got {args.curriculum}")
    if args.frames < 2:
        p.error(f"--frames must be at least 2 (motion needs frames), got {args.frames}")
    if args.init_from is not None and not (args.init_from / "model_index.json").is_file():
        p.error(f"--init-from: {args.init_from} is not a saved pipeline folder (no model_index.json)")
    return args


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; see the module docstring."""
    args = _parse(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    if args.card is not None:
        print(f"wrote {write_model_card(args.card, args.eval_out)}")
        return 0
    if args.bench:
        print(json.dumps(bench(args, device)))
        return 0
    if args.eval_only is not None:
        pipe = ReferenceVideoPipeline.from_pretrained(str(args.eval_only), dtype=torch.bfloat16, local_files_only=True)
        if args.attention_only:  # the quick probe of model v2's candidates: density for 90% of the mass per layer
            print(json.dumps({"attention": attention_concentration(pipe.to(device))}, indent=1))
            return 0
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
