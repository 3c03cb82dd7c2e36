"""The bundled reference text-to-video DiT: configs, builders, a Diffusers pipeline, its saver and loader.

The transformer is Diffusers' own `WanTransformer3DModel` (so Wan attention processors and everything
built on them run unchanged) working directly in pixel space: the bundled model v2 turns 8 frames x 64 x 64
RGB with patch (1, 2, 2) into 8 x 32 x 32 = 8,192 video tokens (train-reference's defaults, the first
model's, are 16 frames with patch (1, 4, 4): 4,096 tokens). Text comes from `ReferenceTextEncoder` through
cross-attention.

Supported entry point: `load_reference_pipeline(path=None, device=None, dtype=torch.bfloat16)`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import DiffusionPipeline, FlowMatchEulerDiscreteScheduler, WanTransformer3DModel
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor

from .clip_prompts import vocabulary
from .clip_render import CLIP_FRAMES, CLIP_SIZE
from .text_encoder import ReferenceTextEncoder

DEFAULT_PATH = Path(__file__).resolve().parents[1] / "assets" / "reference-video-dit"
# The bundled model v2's recipe (assets/reference-video-dit/README.md); run it again until its 20 minutes are done.
TRAIN_COMMAND = ("python -m dit_sparse.pipelines.train_reference --frames 8 --patch 2 --layers 4 --t-mean 0.5 "
                 "--curriculum 0.2 --total-minutes 20 --max-minutes 9 --checkpoint state.pt --resume --eval "
                 "--out assets/reference-video-dit")

# train-reference's architecture defaults (the first bundled model's; v2 trains with patch 2 and 4 layers).
TRANSFORMER_CONFIG: dict[str, Any] = dict(
    patch_size=(1, 4, 4),
    num_attention_heads=4,
    attention_head_dim=64,
    in_channels=3,
    out_channels=3,
    text_dim=128,
    freq_dim=256,
    ffn_dim=1024,
    num_layers=6,
    qk_norm="rms_norm_across_heads",
    rope_max_seq_len=1024,
)
TEXT_CONFIG: dict[str, Any] = dict(dim=128, num_layers=2, num_heads=4, ffn_dim=256, max_length=32)

# Same architecture at toy size, for CPU tests (random weights).
TINY_TRANSFORMER_CONFIG: dict[str, Any] = dict(
    TRANSFORMER_CONFIG, num_attention_heads=2, attention_head_dim=16, text_dim=16, freq_dim=32, ffn_dim=32,
    num_layers=2, rope_max_seq_len=64,
)
TINY_TEXT_CONFIG: dict[str, Any] = dict(dim=16, num_layers=1, num_heads=2, ffn_dim=32, max_length=32)

# Sampling defaults chosen on the held-out prompts (docs/reference-model-notes.md).
DEFAULT_SHIFT = 3.0
DEFAULT_GUIDANCE = 3.0


def build_transformer(tiny: bool = False, **overrides: Any) -> WanTransformer3DModel:
    """A freshly initialised reference transformer (tiny=True: toy size for CPU tests)."""
    cfg = dict(TINY_TRANSFORMER_CONFIG if tiny else TRANSFORMER_CONFIG)
    cfg.update(overrides)
    return WanTransformer3DModel(**cfg)


def build_text_encoder(tiny: bool = False, **overrides: Any) -> ReferenceTextEncoder:
    """A freshly initialised text encoder over the video generator's vocabulary."""
    cfg = dict(TINY_TEXT_CONFIG if tiny else TEXT_CONFIG)
    cfg.update(overrides)
    return ReferenceTextEncoder(vocab=vocabulary(), **cfg)


def build_scheduler(shift: float = DEFAULT_SHIFT) -> FlowMatchEulerDiscreteScheduler:
    """Flow-matching Euler scheduler matching the training convention x_t = (1 - s) x0 + s eps."""
    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)


@dataclass
class ReferenceVideoPipelineOutput(BaseOutput):
    """`frames`: [B, F, H, W, 3] numpy (output_type="np") or [B, F, 3, H, W] tensor ("pt"), in [0, 1]."""

    frames: np.ndarray | torch.Tensor


class ReferenceVideoPipeline(DiffusionPipeline):
    """Text-to-video sampling with the reference pixel-space Wan DiT (no VAE: the DiT denoises pixels)."""

    model_cpu_offload_seq = "text_encoder->transformer"

    def __init__(
        self,
        transformer: WanTransformer3DModel,
        text_encoder: ReferenceTextEncoder,
        scheduler: FlowMatchEulerDiscreteScheduler,
        num_frames: int = CLIP_FRAMES,
        height: int = CLIP_SIZE,
        width: int = CLIP_SIZE,
    ) -> None:
        super().__init__()
        self.register_modules(transformer=transformer, text_encoder=text_encoder, scheduler=scheduler)
        # The clip size the model was trained on (saved in model_index.json): what a call makes by default.
        self.register_to_config(num_frames=num_frames, height=height, width=width)
        self._current_timestep = None
        self._guidance_scale = 1.0

    @property
    def current_timestep(self) -> torch.Tensor | None:
        """Timestep of the denoising step in progress (None outside `__call__`)."""
        return self._current_timestep

    @property
    def guidance_scale(self) -> float:
        return self._guidance_scale

    @property
    def do_classifier_free_guidance(self) -> bool:
        return self._guidance_scale > 1.0

    def encode_prompt(self, prompt: str | list[str], device: torch.device) -> torch.Tensor:
        """Prompt embeddings [B, L, text_dim] in the transformer's dtype."""
        ids = self.text_encoder.tokenize(prompt).to(device)
        emb = self.text_encoder(ids)
        return emb.to(self.transformer.dtype)

    def _predict(self, branch: str, ctx: dict[str, Any], hidden_states: torch.Tensor, timestep: torch.Tensor,
                 embeds: torch.Tensor, attention_kwargs: dict[str, Any] | None) -> torch.Tensor:
        """The transformer's prediction for one guidance branch ("cond" / "uncond"), inside that branch's
        cache context so that caching hooks keep the two branches apart."""
        with self.transformer.cache_context(branch, **ctx):
            return self.transformer(
                hidden_states=hidden_states,
                timestep=timestep,
                encoder_hidden_states=embeds,
                attention_kwargs=attention_kwargs,
                return_dict=False,
            )[0]

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str],
        negative_prompt: str | list[str] | None = None,
        num_inference_steps: int = 30,
        guidance_scale: float = DEFAULT_GUIDANCE,
        generator: torch.Generator | list[torch.Generator] | None = None,
        num_frames: int | None = None,
        height: int | None = None,
        width: int | None = None,
        latents: torch.Tensor | None = None,
        output_type: str = "np",
        return_dict: bool = True,
        attention_kwargs: dict[str, Any] | None = None,
    ) -> ReferenceVideoPipelineOutput | tuple:
        """Generate videos for `prompt` (str or list). `negative_prompt` defaults to the empty prompt,
        which is what the model saw in its 10% unconditional training. `num_frames`, `height`, `width`
        default to the clip size the model was trained on. Returns frames in [0, 1]."""
        num_frames = self.config.num_frames if num_frames is None else num_frames
        height = self.config.height if height is None else height
        width = self.config.width if width is None else width
        p_t, p_h, p_w = self.transformer.config.patch_size
        if height % p_h or width % p_w or num_frames % p_t:
            raise ValueError(f"height/width must be multiples of {p_h}/{p_w}, got {height}x{width}")
        if output_type not in ("np", "pt", "latent"):
            raise ValueError(f"output_type must be 'np', 'pt' or 'latent', got {output_type!r}")
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        batch = len(prompts)
        if negative_prompt is None:
            negative_prompt = ""
        negatives = [negative_prompt] * batch if isinstance(negative_prompt, str) else list(negative_prompt)
        if len(negatives) != batch:
            raise ValueError(f"got {len(negatives)} negative prompts for {batch} prompts")

        device = self._execution_device
        dtype = self.transformer.dtype
        self._guidance_scale = guidance_scale
        self._current_timestep = None
        prompt_embeds = self.encode_prompt(prompts, device)
        negative_embeds = self.encode_prompt(negatives, device) if self.do_classifier_free_guidance else None

        shape = (batch, self.transformer.config.in_channels, num_frames, height, width)
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=device, dtype=torch.float32)
        else:
            latents = latents.to(device=device, dtype=torch.float32)

        self.scheduler.set_timesteps(num_inference_steps, device=device)
        timesteps = self.scheduler.timesteps
        self._num_timesteps = len(timesteps)
        with self.progress_bar(total=num_inference_steps) as progress_bar:
            for i, t in enumerate(timesteps):
                self._current_timestep = t
                model_input = latents.to(dtype)
                timestep = t.expand(batch)
                ctx = {"step_index": i, "sigma": float(self.scheduler.sigmas[i]), "num_inference_steps": len(timesteps)}
                noise_pred = self._predict("cond", ctx, model_input, timestep, prompt_embeds, attention_kwargs)
                if self.do_classifier_free_guidance:
                    noise_uncond = self._predict("uncond", ctx, model_input, timestep, negative_embeds,
                                                 attention_kwargs)
                    noise_pred = noise_uncond + guidance_scale * (noise_pred - noise_uncond)
                latents = self.scheduler.step(noise_pred.float(), t, latents, return_dict=False)[0]
                progress_bar.update()
        self._current_timestep = None

        if output_type == "latent":
            frames: Any = latents
        else:
            video = ((latents.clamp(-1.0, 1.0) + 1.0) / 2.0).permute(0, 2, 1, 3, 4)  # [B, F, 3, H, W]
            frames = video if output_type == "pt" else video.permute(0, 1, 3, 4, 2).cpu().numpy()
        self.maybe_free_model_hooks()
        if not return_dict:
            return (frames,)
        return ReferenceVideoPipelineOutput(frames=frames)


def build_pipeline(tiny: bool = False, shift: float = DEFAULT_SHIFT) -> ReferenceVideoPipeline:
    """A pipeline with freshly initialised (random) weights; tiny=True gives the CPU test variant."""
    return ReferenceVideoPipeline(build_transformer(tiny), build_text_encoder(tiny), build_scheduler(shift))


def save_pipeline(pipe: ReferenceVideoPipeline, out: Path) -> int:
    """Save as safetensors (weights as they are: bf16, small fp32 modules); returns the weight bytes."""
    pipe.save_pretrained(str(out), safe_serialization=True)
    return sum(f.stat().st_size for f in out.rglob("*.safetensors"))


def load_reference_pipeline(
    path: str | Path | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.bfloat16,
) -> ReferenceVideoPipeline:
    """Load the trained reference pipeline (offline) from `path` (default: the bundled
    assets/reference-video-dit) onto `device` (default: CUDA if available, else CPU) in `dtype`.

    Raises FileNotFoundError, saying how to train the weights, when the folder or its weights are missing.
    """
    folder = Path(path) if path is not None else DEFAULT_PATH
    weights = folder / "transformer" / "diffusion_pytorch_model.safetensors"
    if not (folder / "model_index.json").is_file() or not weights.is_file():
        raise FileNotFoundError(
            f"no reference model weights under {folder} (need model_index.json and {weights.name} in "
            f"transformer/). Train them on a GPU with `{TRAIN_COMMAND}`, or pass path= to a saved pipeline."
        )
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    pipe = ReferenceVideoPipeline.from_pretrained(str(folder), dtype=dtype, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)
