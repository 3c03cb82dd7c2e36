"""Checkpoints of a reference-model training: the whole state, so that a later run continues exactly.

Long trainings run as several runs (`train_reference --checkpoint FILE --resume`): a checkpoint holds the
weights, the optimizer, the EMA, the data and noise generators and the step, plus the minutes trained and
the logs of the runs so far. Resuming on the same device continues bitwise as if the run had not stopped.

Without a checkpoint a training can still start from a saved pipeline (`--init-from FOLDER`, e.g. the
bundled model): its weights only, with a fresh optimizer, schedule and step (fine-tuning, not resuming).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch

from .clip_render import CLIP_FRAMES

if TYPE_CHECKING:
    from .reference_trainer import Trainer

CHECKPOINT_FORMAT = "dit-sparse/train-reference-checkpoint-v1"


def trainer_state(trainer: Trainer, minutes: float, history: list) -> dict:
    """Everything a later run needs to continue exactly where `trainer` stopped."""
    return {
        "format": CHECKPOINT_FORMAT,
        "step": trainer.step,
        "minutes": minutes,
        "history": history,
        "model": {"tiny": trainer.args.tiny, "frames": trainer.args.frames, "patch": trainer.args.patch,
                  "params": [tuple(p.shape) for p in trainer.params]},
        "params": [p.detach().cpu() for p in trainer.params],
        "ema": None if trainer.ema is None else [e.cpu() for e in trainer.ema],
        "opt": trainer.opt.state_dict(),
        "data_gen": trainer.data_gen.get_state(),
        "noise_gen": trainer.noise_gen.get_state(),
    }


def _check_same_model(trainer: Trainer, source: str, shapes: list, frames: int, patch: int, instead: str = "") -> None:
    """Raise ValueError, saying what to do, when `source` (a checkpoint, a pipeline folder) holds weights of
    other shapes or another clip geometry than `trainer` was built for."""
    if list(shapes) != [tuple(p.shape) for p in trainer.params]:
        raise ValueError(f"{source} holds another model size (--tiny, --patch, --heads, --head-dim, --ffn or --layers "
                         f"differs?): {instead}pass the options it was trained with")
    if (frames, patch) != (trainer.args.frames, trainer.args.patch):
        raise ValueError(f"{source} was trained with --frames {frames} --patch {patch}, this run asks for --frames "
                         f"{trainer.args.frames} --patch {trainer.args.patch}: pass the same clip geometry")


def load_trainer_state(trainer: Trainer, state: dict) -> None:
    """Continue `trainer` from `state` (from `trainer_state`); a checkpoint of another model size is a clear
    error."""
    if state.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"not a {CHECKPOINT_FORMAT} checkpoint (format {state.get('format')!r})")
    model = state["model"]  # older checkpoints record no clip geometry: they had the defaults
    _check_same_model(trainer, "the checkpoint", model["params"], model.get("frames", CLIP_FRAMES),
                      model.get("patch", 4), "start without --resume, or ")
    with torch.no_grad():
        for p, saved in zip(trainer.params, state["params"]):
            p.copy_(saved)
        if trainer.ema is not None and state["ema"] is not None:
            for e, saved in zip(trainer.ema, state["ema"]):
                e.copy_(saved)
    trainer.opt.load_state_dict(state["opt"])
    trainer.data_gen.set_state(state["data_gen"])
    trainer.noise_gen.set_state(state["noise_gen"])
    trainer.step = int(state["step"])


def init_from_pipeline(trainer: Trainer, folder: Path) -> None:
    """Set `trainer`'s weights and EMA to those of the pipeline saved in `folder` (as `train_reference --out`
    writes it: bf16 weights, widened to the trainer's dtype); the optimizer, schedule, step and generators
    stay fresh. A folder of another model size or clip geometry is a clear error."""
    from .reference_model import load_reference_pipeline

    pipe = load_reference_pipeline(folder, device="cpu", dtype=torch.float32)
    saved = [p for m in (pipe.transformer, pipe.text_encoder) for p in m.parameters()]
    _check_same_model(trainer, str(folder), [tuple(p.shape) for p in saved], pipe.config.num_frames,
                      tuple(pipe.transformer.config.patch_size)[-1])
    with torch.no_grad():
        for p, w in zip(trainer.params, saved):
            p.copy_(w)
        for e, w in zip(trainer.ema or [], saved):
            e.copy_(w)
    print(f"starting from the weights in {folder} (fresh optimizer and schedule)", flush=True)


def resume(trainer: Trainer, path: Path) -> tuple[float, list]:
    """Continue `trainer` from the checkpoint file at `path`; returns the minutes trained before and the
    logs of the earlier runs."""
    state = torch.load(path, map_location="cpu", weights_only=False)
    load_trainer_state(trainer, state)
    minutes_before, history = float(state["minutes"]), list(state["history"])
    print(f"resumed from {path}: step {trainer.step}, {minutes_before:.1f} min trained", flush=True)
    return minutes_before, history


def save_checkpoint(trainer: Trainer, path: Path, minutes: float, history: list) -> None:
    """Write `trainer`'s state to `path`, atomically: a run cut off while writing leaves the previous file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(trainer_state(trainer, minutes, history), tmp)
    tmp.replace(path)
