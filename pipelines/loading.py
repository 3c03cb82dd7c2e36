"""Loading the pipeline `dit-sparse generate` runs: the bundled model, a tiny test model, a saved reference
model, or a Diffusers pipeline (local folder or Hub id)."""

from __future__ import annotations

import inspect
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .clip_render import CLIP_FRAMES

BUNDLED = "bundled"
TINY = "tiny"


class ModelLoadError(RuntimeError):
    """The requested model could not be loaded; the message says what to do."""


def assets_dir() -> Path:
    """Where the bundled assets live: $DIT_SPARSE_ASSETS, else the repository's assets/ folder."""
    env = os.environ.get("DIT_SPARSE_ASSETS")
    return Path(env) if env else Path(__file__).resolve().parents[1] / "assets"


@dataclass
class LoadedModel:
    """A pipeline plus how to call it uniformly."""

    pipe: Any
    name: str
    description: str
    call: Any  # (prompt: str, steps: int, seed: int) -> np.ndarray [F, H, W, 3] in [0, 1]


def resolve_device(device: str) -> torch.device:
    """The torch device for `--device` ("auto": CUDA when available, else CPU); ModelLoadError when the
    name is not a device or names a GPU this machine does not have."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as exc:  # torch lists every device type it knows: too long to be useful here
        raise ModelLoadError(f"--device {device!r} is not a device; use auto, cpu, cuda or cuda:N") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError(f"--device {device} asked for a GPU but CUDA is not available; use --device cpu")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ModelLoadError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s), "
                             f"numbered from 0")
    return dev


def _frames_to_numpy(frames: Any) -> np.ndarray:
    """Pipelines return video as [B, F, H, W, 3] numpy or [B, F, 3, H, W] torch in [0, 1]."""
    if isinstance(frames, torch.Tensor):
        x = frames[0]
        if x.shape[1] == 3:  # [F, 3, H, W]
            x = x.permute(0, 2, 3, 1)
        return x.float().clamp(0, 1).cpu().numpy()
    x = np.asarray(frames[0] if isinstance(frames, (list, tuple)) or np.ndim(frames) == 5 else frames)
    if x.ndim == 3:  # one image -> one frame
        x = x[None]
    return np.clip(x.astype(np.float32), 0.0, 1.0)


def load_model(model: str, device: torch.device, dtype: torch.dtype | None = None) -> LoadedModel:
    """Load `model`: "bundled" (default), "tiny", a local pipeline folder or a Hugging Face Hub id.

    A local folder whose model_index.json names our `ReferenceVideoPipeline` (what `dit-sparse
    train-reference --out <folder>` writes) loads like the bundled model; other folders go to Diffusers.
    """
    if model == BUNDLED:
        return _load_bundled(device, dtype)
    if model == TINY:
        return _load_tiny(device)
    if _looks_like_path(model) and not Path(model).expanduser().exists():
        raise ModelLoadError(f"model folder {model!r} does not exist; check the path (a Hugging Face Hub id "
                             f"looks like org/name, e.g. Wan-AI/Wan2.1-T2V-1.3B-Diffusers)")
    if is_reference_folder(model):
        return _load_reference(Path(model), device, dtype, f"reference video DiT from {model}",
                               f"reference model (ReferenceVideoPipeline) at {model}")
    return _load_diffusers(model, device, dtype)


def _looks_like_path(model: str) -> bool:
    """True for names that can only be a local path: absolute, relative with ./ ../ ~, or with two or more
    slashes (a Hub id is org/name)."""
    return model.startswith(("/", "./", "../", "~")) or model.count("/") >= 2 or model.endswith("/")


def reference_clip_frames(model: str) -> int | None:
    """Frames per clip of a reference model ("bundled" or a folder `train-reference` wrote), None for any
    other model. Read from model_index.json (older folders without the entry make CLIP_FRAMES)."""
    bundled = model == BUNDLED
    index = _model_index(assets_dir() / "reference-video-dit" if bundled else Path(model))
    if not bundled and not _names_reference_pipeline(index):
        return None
    try:
        return int(index.get("num_frames", CLIP_FRAMES))
    except (TypeError, ValueError):
        return CLIP_FRAMES if bundled else None


def _model_index(folder: str | Path) -> dict:
    """`folder`/model_index.json as a dict; {} when it is missing, unreadable, not JSON or not an object."""
    try:
        index = json.loads((Path(folder) / "model_index.json").read_text())
    except (OSError, ValueError):
        return {}
    return index if isinstance(index, dict) else {}


def pipeline_class_name(folder: str | Path) -> str | None:
    """The `_class_name` in `folder`/model_index.json, or None when there is no readable index."""
    return _model_index(folder).get("_class_name")


def _names_reference_pipeline(index: dict) -> bool:
    name = index.get("_class_name")
    if name is None:  # no index (e.g. a Hub id): nothing to import
        return False
    from .reference_model import ReferenceVideoPipeline

    return name == ReferenceVideoPipeline.__name__


def is_reference_folder(folder: str | Path) -> bool:
    """True when `folder` holds a saved `ReferenceVideoPipeline` (our class, unknown to Diffusers'
    DiffusionPipeline.from_pretrained, which looks pipeline classes up in the diffusers module)."""
    return _names_reference_pipeline(_model_index(folder))


def _load_bundled(device: torch.device, dtype: torch.dtype | None) -> LoadedModel:
    path = assets_dir() / "reference-video-dit"
    if not path.exists():
        raise ModelLoadError(
            f"the bundled reference model is missing ({path}); reinstall dit-sparse from a full checkout, "
            f"set DIT_SPARSE_ASSETS to the folder holding reference-video-dit/, or run with --model tiny"
        )
    return _load_reference(path, device, dtype, "bundled reference video DiT", f"trained reference model at {path}")


def _load_reference(path: Path, device: torch.device, dtype: torch.dtype | None, name: str,
                    description: str) -> LoadedModel:
    """A saved ReferenceVideoPipeline (bundled or written by train-reference), called like the bundled one."""
    from .reference_model import load_reference_pipeline

    if dtype is None:  # the GPU kernels run bf16/fp16; the CPU path computes in float32
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    try:
        pipe = load_reference_pipeline(path, device=device, dtype=dtype)
    except FileNotFoundError as exc:  # the message says which files are missing and how to train them
        raise ModelLoadError(str(exc)) from exc

    def call(prompt: str, steps: int, seed: int) -> np.ndarray:
        g = torch.Generator(device="cpu").manual_seed(seed)
        out = pipe(prompt=prompt, num_inference_steps=steps, generator=g, output_type="np")
        return _frames_to_numpy(out.frames)

    return LoadedModel(pipe, name, description, call)


def _load_tiny(device: torch.device) -> LoadedModel:
    from .tiny_models import tiny_wan_pipeline

    pipe = tiny_wan_pipeline().to(device)

    def call(prompt: str, steps: int, seed: int) -> np.ndarray:
        g = torch.Generator().manual_seed(seed)
        # No text encoder in a config-built model: the prompt cannot condition it, embeddings are random.
        pe, ne = torch.randn(1, 8, 32, generator=g), torch.randn(1, 8, 32, generator=g)
        out = pipe(prompt_embeds=pe.to(device), negative_prompt_embeds=ne.to(device), height=32, width=32,
                   num_frames=9, num_inference_steps=steps, guidance_scale=3.0, output_type="np",
                   generator=torch.Generator().manual_seed(seed))
        return _frames_to_numpy(out.frames)

    return LoadedModel(pipe, "tiny Wan (random weights)",
                       "a tiny WanPipeline built from a config with RANDOM weights: output is noise-like and "
                       "the prompt is ignored; it only exercises the code path", call)


# Pipelines whose inputs default to None but which cannot run from a prompt alone (they condition on an
# image or a video): recognised by their class names.
_CONDITIONED_SUFFIXES = ("VideoToWorld", "VideoToVideo", "ImageToVideo", "ImageToImage", "Img2Img", "Inpaint", "Edit")


def prompt_only_problem(pipeline_class: type) -> str | None:
    """Why `dit-sparse generate` (which calls a pipeline with a prompt, steps and a generator) cannot run
    `pipeline_class`, or None when it can."""
    name = pipeline_class.__name__
    params = inspect.signature(pipeline_class.__call__).parameters
    required = [n for n, prm in params.items() if n != "self" and prm.default is prm.empty
                and prm.kind in (prm.POSITIONAL_OR_KEYWORD, prm.KEYWORD_ONLY)]
    if required:
        return f"{name} needs {', '.join(required)} besides a prompt"
    if name.removesuffix("Pipeline").endswith(_CONDITIONED_SUFFIXES):
        return f"{name} conditions on an image or a video besides a prompt"
    return None


def _refuse_conditioned(model: str, pipeline_class: type) -> None:
    """ModelLoadError when `dit-sparse generate` cannot call `pipeline_class` with a prompt alone."""
    problem = prompt_only_problem(pipeline_class)
    if problem is not None:
        raise ModelLoadError(f"{model!r}: {problem}; `dit-sparse generate` runs text-to-video and text-to-image "
                             "pipelines: use the Python API (dit_sparse.apply(pipe, ...)) for this one")


def _pipeline_class_of(model: str) -> type | None:
    """The Diffusers pipeline class named in `model`'s model_index.json (a folder, or a Hub id: only that
    small file is fetched), or None when it cannot be read."""
    import diffusers
    from diffusers import DiffusionPipeline

    try:
        name = DiffusionPipeline.load_config(model).get("_class_name")
    except Exception:  # unreadable here: from_pretrained reports the real problem
        return None
    cls = getattr(diffusers, str(name), None)
    return cls if isinstance(cls, type) else None


def _load_diffusers(model: str, device: torch.device, dtype: torch.dtype | None) -> LoadedModel:
    from diffusers import DiffusionPipeline

    from .families import get_adapter

    # Checked before the weights load: a pipeline that needs an image or a video would only fail at the call.
    cls = _pipeline_class_of(model)
    if cls is not None:
        _refuse_conditioned(model, cls)
    kwargs: dict[str, Any] = {}
    if dtype is not None:
        kwargs["dtype"] = dtype  # `torch_dtype` is deprecated in Diffusers 0.42
    local = Path(model).exists()
    try:
        pipe = DiffusionPipeline.from_pretrained(model, **kwargs)
    except Exception as exc:  # from_pretrained raises many types; all mean "cannot load"
        where = "local folder" if local else "Hugging Face Hub id"
        hint = ("check the folder holds a Diffusers pipeline (model_index.json)" if local else
                "check the id, your network (or HF_HUB_OFFLINE with a filled cache) and `huggingface-cli login`")
        raise ModelLoadError(f"could not load {where} {model!r}: {type(exc).__name__}: {exc}; {hint}") from exc
    transformer = getattr(pipe, "transformer", None)
    if transformer is None:
        raise ModelLoadError(f"{model!r} has no `transformer` component; dit-sparse supports DiT pipelines")
    get_adapter(transformer)  # raises UnsupportedModelError naming the supported models
    _refuse_conditioned(model, type(pipe))  # when model_index.json could not be read before loading
    pipe = pipe.to(device)

    def call(prompt: str, steps: int, seed: int) -> np.ndarray:
        g = torch.Generator(device="cpu").manual_seed(seed)
        out = pipe(prompt=prompt, num_inference_steps=steps, generator=g, output_type="np")
        frames = getattr(out, "frames", None)
        return _frames_to_numpy(frames if frames is not None else out.images)

    return LoadedModel(pipe, model, f"Diffusers pipeline {type(pipe).__name__} from {model}", call)
