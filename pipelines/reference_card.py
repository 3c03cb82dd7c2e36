"""Model card of a folder that `train-reference` wrote, generated from the folder's own files.

Every figure comes from what the training run and its evaluation recorded (model_index.json, the
transformer config, train_log.json, eval.json): `python -m dit_sparse.pipelines.train_reference --card DIR
[--eval-out EVAL_DIR]` writes DIR/MODEL_CARD.md (eval.json from EVAL_DIR, where `--eval` wrote it, else DIR). Sections without their file say so instead of guessing.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

from .clip_render import CLIP_FRAMES, CLIP_SIZE

DENSITY_TARGET = 0.4  # issue 15: median share of key blocks holding 90% of the attention mass
# Options that do not change the weights; --max-minutes differs per run and is listed in the runs table.
_SKIP_ARGS = {"out", "eval_only", "eval_out", "bench", "log_every", "checkpoint", "resume", "attention_only",
              "card", "max_minutes", "eval", "eval_steps", "guidance", "shift"}


def _read(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def _command(args: dict[str, Any]) -> str:
    """The training command as it was run (options that do not change the weights left out)."""
    parts = ["python -m dit_sparse.pipelines.train_reference"]
    for key, val in args.items():
        if key in _SKIP_ARGS or val is None or val is False:
            continue
        flag = "--" + key.replace("_", "-")
        if val is True:
            parts.append(flag)
        elif isinstance(val, list):
            parts.append(f"{flag} {' '.join(str(v) for v in val)}")
        else:
            parts.append(f"{flag} {val}")
    return " ".join(parts)


def _model_section(folder: Path) -> list[str]:
    index = _read(folder / "model_index.json") or {}
    cfg = _read(folder / "transformer" / "config.json")
    if cfg is None:
        return ["## Model", "", "transformer/config.json is missing.", ""]
    frames = int(index.get("num_frames", CLIP_FRAMES))
    height, width = int(index.get("height", CLIP_SIZE)), int(index.get("width", CLIP_SIZE))
    pt, ph, pw = cfg["patch_size"]
    grid = (frames // pt, height // ph, width // pw)
    tokens = grid[0] * grid[1] * grid[2]
    keys = ("num_layers", "num_attention_heads", "attention_head_dim", "ffn_dim", "text_dim", "qk_norm")
    arch = ", ".join(f"{k}={cfg[k]}" for k in keys if k in cfg)
    return ["## Model", "", "| part | value |", "|---|---|",
            f"| transformer | Diffusers `WanTransformer3DModel`, patch {tuple(cfg['patch_size'])}, {arch} |",
            f"| clip | {frames} frames x {height} x {width} RGB -> {grid[0]} x {grid[1]} x {grid[2]} = "
            f"{tokens:,} video tokens |", ""]


def _training_section(log: dict | None) -> list[str]:
    if log is None:
        return ["## Training", "", "train_log.json is missing.", ""]
    runs = [*log.get("earlier_runs", []), log]
    last_loss = log["losses"][-1] if log.get("losses") else None
    lines = ["## Training", "", "```", _command(log.get("args", {})), "```", "",
             f"Device {log.get('device')}, torch {log.get('torch')}; {log['steps']:,} optimizer steps in "
             f"{len(runs)} run(s), {log.get('minutes_total', log['wall_s'] / 60):.1f} min in all; "
             f"{log['clips_seen']:,} clips; {log.get('params', 0):,} parameters."]
    if log.get("args", {}).get("init_from"):
        lines.append(f"Started from the weights of `{log['args']['init_from']}` (fresh optimizer and schedule): "
                     "its own training comes on top of the figures here (see that folder's card).")
    if last_loss is not None:
        lines.append(f"Last logged loss {last_loss[1]:.4f} at step {last_loss[0]:,} (all of them: train_log.json).")
    if len(runs) > 1:  # a resumed training: what each run did (a slow run shared its GPU or compiled longer)
        lines += ["", "| run | steps | minutes | steps/s | device |", "|---|---|---|---|---|"]
        for i, run in enumerate(runs, 1):
            lines.append(f"| {i} | {run.get('run_steps', run['steps']):,} | {run['wall_s'] / 60:.1f} | "
                         f"{run['steps_per_s']:.2f} | {run.get('device')} |")
    return lines + [""]


def _eval_section(ev: dict | None) -> list[str]:
    if ev is None:
        return ["## Measured", "", "eval.json is missing: run `train-reference --eval-only DIR --eval-out DIR`.", ""]
    lines = ["## Measured (dense attention, held-out prompts)", "",
             "| weights | guidance | shift | validation both | colour | motion | both | 1 object | 2 objects |",
             "|---|---|---|---|---|---|---|---|---|"]
    chosen = ev.get("chosen", {})
    for row in ev.get("sweep", []):
        h = row["heldout"]
        mark = "**" if (row["guidance"], row["shift"], row["weights"]) == (
            chosen.get("guidance"), chosen.get("shift"), chosen.get("weights")) else ""
        by = h.get("by_objects", {})
        cells = [row["weights"], row["guidance"], row["shift"], _pct(row["val_both"]), _pct(h["colour"]),
                 _pct(h["motion"]), _pct(h["both"]), _pct(by.get("1_object", 0.0)), _pct(by.get("2_object", 0.0))]
        lines.append("| " + " | ".join(f"{mark}{c}{mark}" for c in cells) + " |")
    if chosen:
        lines += ["", f"Chosen on the validation set: guidance {chosen['guidance']}, shift {chosen['shift']} "
                      f"({chosen['heldout']['videos']} held-out videos)."]
        paths = chosen["heldout"].get("by_path", {})
        if paths:
            lines.append("Per path: " + ", ".join(f"{k} {_pct(v)}" for k, v in paths.items()) + ".")
    att = ev.get("attention")
    if att:
        dens = [v["density_for_90%"] for v in att.values()]
        med = statistics.median(dens)
        verdict = "meets" if med <= DENSITY_TARGET else "misses"
        lines += ["", "Attention concentration (self-attention at t = 0.5 on held-out clips, natural order, 64-token "
                      "blocks):", "", "| layer | top 5% | top 10% | top 25% | blocks for 90% |", "|---|---|---|---|---|"]
        for name, v in att.items():
            lines.append(f"| {name} | {_pct(v['top5%'])} | {_pct(v['top10%'])} | {_pct(v['top25%'])} | "
                         f"{_pct(v['density_for_90%'])} |")
        lines += ["", f"Median share of blocks for 90% of the mass: {_pct(med)} ({verdict} the target of "
                      f"{_pct(DENSITY_TARGET)})."]
    return lines + [""]


def model_card(folder: str | Path, eval_dir: str | Path | None = None) -> str:
    """The Markdown model card of a `train-reference` folder (figures read from its files; eval.json from
    `eval_dir` when given, else from the folder)."""
    folder = Path(folder)
    lines = [f"# {folder.name}: a reference text-to-video DiT trained by dit-sparse", "",
             "Generated by `python -m dit_sparse.pipelines.train_reference --card DIR` from this folder's files; "
             "every figure was recorded by the training run or its evaluation.", ""]
    lines += _model_section(folder)
    lines += _training_section(_read(folder / "train_log.json"))
    lines += _eval_section(_read(Path(eval_dir or folder) / "eval.json"))
    if (folder / "samples.png").is_file():
        lines += ["Held-out samples (one row per prompt, every frame; the evaluation's chosen sampling settings):",
                  "", "![held-out samples](samples.png)", ""]
        prompts = _read(folder / "samples.json")
        if prompts:
            lines += [f"{i + 1}. {p}" for i, p in enumerate(prompts)] + [""]
    return "\n".join(lines)


def write_samples_png(folder: str | Path, eval_dir: str | Path, rows: int = 8) -> Path | None:
    """Render the first `rows` held-out videos of eval_dir/samples.npz as folder/samples.png (one row per
    prompt, frames left to right) and their prompts as folder/samples.json; None when there is no samples.npz."""
    import imageio.v3 as iio
    import numpy as np

    src = Path(eval_dir) / "samples.npz"
    if not src.is_file():
        return None
    with np.load(src) as data:
        videos, prompts = data["videos"][:rows], [str(p) for p in data["prompts"][:rows]]
    n, f, h, w, c = videos.shape
    grid = np.full((n * (h + 2), f * (w + 2), c), 255, dtype=np.uint8)  # 2-pixel white gutters
    for i in range(n):
        for j in range(f):
            grid[i * (h + 2):i * (h + 2) + h, j * (w + 2):j * (w + 2) + w] = videos[i, j]
    out = Path(folder) / "samples.png"
    iio.imwrite(out, grid)
    (Path(folder) / "samples.json").write_text(json.dumps(prompts, indent=1))
    return out


def write_model_card(folder: str | Path, eval_dir: str | Path | None = None) -> Path:
    """Write `model_card(folder, eval_dir)` to folder/MODEL_CARD.md (replacing an earlier generated one), with
    folder/samples.png from the evaluation's samples when there are any."""
    write_samples_png(folder, eval_dir or folder)
    out = Path(folder) / "MODEL_CARD.md"
    out.write_text(model_card(folder, eval_dir))
    return out
