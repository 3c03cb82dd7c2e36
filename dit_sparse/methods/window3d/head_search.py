"""Per-head choice of a 3D tile pattern: online (sampled rows, every few steps) or offline (a search on
one prompt against dense attention), and the JSON file an offline search is saved to.

Both score a candidate pattern the same way: take a few query rows, compute their exact attention output
and their output under the candidate's mask, and measure the relative squared error
||o_masked - o_exact||^2 / ||o_exact||^2 per (batch, head). The online choice (Sparse VideoGen style) picks
the lowest-error candidate per head among a handful of budget-sized kinds; the offline search accumulates
errors over a whole dense generation for every window and radial pattern that fits the budget, and keeps
the best one per (layer, head).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from dit_sparse.config import ConfigError
from dit_sparse.kernels.block_sums import block_sums
from dit_sparse.layout import VideoLayout

from .patterns import TilePattern, range_mask
from .tiling import Tile, VideoTiling

Tensor = torch.Tensor
FORMAT = "dit-sparse/window3d-heads"
VERSION = 1


class HeadConfigMismatch(ConfigError):
    """A head_config file was searched for another model family or video grid."""


# ---------------------------------------------------------------------- scoring
def sample_rows(tiling: VideoTiling, count: int, seed: int = 0, device: torch.device | str = "cpu") -> Tensor:
    """int64 [R] sorted original indices of up to `count` distinct random video query tokens.

    Drawn on `device` with that device's generator (no host transfer on the GPU path), so the same seed
    picks different rows on the CPU and on a GPU.
    """
    L = tiling.layout
    g = torch.Generator(device=device).manual_seed(int(seed) & 0x7FFFFFFF)
    pick = torch.randperm(L.video_tokens, generator=g, device=device)[: min(count, L.video_tokens)]
    return pick.sort().values + L.video_start


def _device_masks(tiling: VideoTiling, patterns: list[TilePattern], device: torch.device, ordered: bool
                  ) -> tuple[Tensor, Tensor, Tensor]:
    """(bool [P, NR, NR] range masks of `patterns`, int64 [S] range of each token, int64 [S] range of each
    position of the sequence as the keys come: the tiling's order when `ordered`, else the tokens'), on
    `device`, cached."""
    key = ("device_masks", tuple(patterns), str(device), ordered)
    if key not in tiling._cache:
        masks = torch.stack([range_mask(tiling, p) for p in patterns]).to(device)
        of_token = tiling.range_of_token
        of_position = of_token[tiling.perm.cpu()] if ordered else of_token
        tiling._cache[key] = (masks, of_token.to(device), of_position.to(device))
    return tiling._cache[key]


def pattern_errors(q: Tensor, k: Tensor, v: Tensor, tiling: VideoTiling, patterns: list[TilePattern],
                   rows: Tensor, scale: float | None = None, max_elems: int = 1 << 25, ordered: bool = False
                   ) -> Tensor:
    """float32 [B, H, P] relative error of each pattern's masked attention on the sampled query `rows`.

    q, k, v: [B, H, S, D] in original token order, or in the tiling's order (`tiling.perm`) when `ordered`;
    `rows` are original token indices either way. Work is split over heads so the float32 logits never
    exceed `max_elems` elements.
    """
    B, H, S, D = q.shape
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    full, row_range, key_range = _device_masks(tiling, patterns, q.device, ordered)  # once per (tiling, patterns)
    if rows.device != q.device:
        rows = rows.to(q.device)
    row_masks = full[:, row_range[rows]]  # [P, R, NR]
    if ordered:
        rows = tiling.inverse.to(q.device)[rows]  # where those tokens sit in the sequence as it comes
    if tiling.block is not None:
        return _errors_by_block(q, k, v, tiling, row_masks, rows, scale, max_elems, ordered)
    masks = row_masks[:, :, key_range]  # [P, R, S]
    R = rows.numel()
    chunk = max(1, min(H, max_elems // max(B * R * S, 1)))
    out = torch.empty(B, H, len(patterns), dtype=torch.float32, device=q.device)
    for h0 in range(0, H, chunk):
        hs = slice(h0, min(H, h0 + chunk))
        # Products run in the inputs' dtype (float32 accumulation inside the GPU matmul): converting all of
        # K and V to float32 first would cost more than the whole classification.
        vs = v[:, hs]
        qs = q[:, hs].index_select(2, rows)
        logits = torch.matmul(qs, k[:, hs].transpose(-1, -2)).float() * scale  # [B, h, R, S]
        exact = torch.matmul(torch.softmax(logits, -1).to(vs.dtype), vs).float()
        norm = exact.square().sum((-1, -2)).clamp_min(torch.finfo(torch.float32).tiny)
        for j in range(len(patterns)):
            masked = torch.softmax(logits.masked_fill(~masks[j], -math.inf), -1)
            approx = torch.matmul(masked.to(vs.dtype), vs).float()
            out[:, hs, j] = (approx - exact).square().sum((-1, -2)) / norm
    return out


def _errors_by_block(q: Tensor, k: Tensor, v: Tensor, tiling: VideoTiling, row_masks: Tensor, rows: Tensor,
                     scale: float, max_elems: int, ordered: bool) -> Tensor:
    """`pattern_errors` for fixed-block ranges, from per-block partial sums of the sampled rows' attention.

    In the tiling's order every range is `block` consecutive keys (the last may be short), so one pass over
    the keys gives each sampled row's max logit m[r, n], mass l[r, n] and unnormalised output o[r, n] per
    block (`kernels.block_sums`: one Triton program per key block on GPUs). Any pattern's masked output is
    then sum_n mask[r, n] w[r, n] o[r, n] / sum_n mask[r, n] w[r, n] l[r, n] with w = exp(m - max_n m): small
    sums over [R, NR] instead of a masked copy and a softmax of the [R, S] logits per pattern. Keys not yet
    in the tiling's order are gathered into it.
    """
    B, H, S, D = q.shape
    P, R, NR = row_masks.shape
    m_sel = row_masks.to(torch.float32)  # [P, R, NR]
    chunk = max(1, min(H, max_elems // max(B * R * S, 1)))
    out = torch.empty(B, H, P, dtype=torch.float32, device=q.device)
    for h0 in range(0, H, chunk):
        hs = slice(h0, min(H, h0 + chunk))
        ks, vs = k[:, hs], v[:, hs]
        if not ordered:
            ks, vs = ks.index_select(2, tiling.perm), vs.index_select(2, tiling.perm)
        peak, mass, outs = block_sums(q[:, hs].index_select(2, rows), ks, vs, tiling.block, scale)
        w = torch.exp(peak - peak.amax(-1, keepdim=True))  # [B, h, R, NR]
        mass = mass * w
        outs = outs * w[..., None]  # [B, h, R, NR, D]
        exact = outs.sum(3) / mass.sum(3, keepdim=True)  # [B, h, R, D]
        norm = exact.square().sum((-1, -2)).clamp_min(torch.finfo(torch.float32).tiny)
        approx = torch.einsum("prn,bhrnd->bhprd", m_sel, outs) / torch.einsum("prn,bhrn->bhpr", m_sel, mass)[..., None]
        out[:, hs] = (approx - exact[:, :, None]).square().sum((-1, -2)) / norm[..., None]
    return out


def classify_heads(q: Tensor, k: Tensor, v: Tensor, tiling: VideoTiling, patterns: list[TilePattern],
                   rows: Tensor, ordered: bool = False) -> Tensor:
    """Index into `patterns` of the lowest-error pattern per head (errors averaged over the batch):
    int64 [H] on q's device (never read back, so classifying does not synchronise). `ordered`: q, k, v
    come in the tiling's order (see `pattern_errors`)."""
    return pattern_errors(q, k, v, tiling, patterns, rows, ordered=ordered).mean(0).argmin(-1)


# ---------------------------------------------------------------------- saved assignments
@dataclass
class HeadAssignment:
    """Per-layer, per-head patterns found by an offline search, tied to one model family and grid."""

    model_family: str | None
    grid: tuple[int, int, int]
    tile: Tile
    sparsity: float
    heads: dict[str, list[TilePattern]]
    text_tokens: int = 0
    errors: dict[str, list[float]] = field(default_factory=dict)
    block: int | None = None  # fixed-block ranges the search was run with (None: exact tiles)

    def check(self, layout: VideoLayout, model_family: str | None = None) -> None:
        """Raise `HeadConfigMismatch` unless `layout`'s grid (and `model_family`, when known) match."""
        grid = (layout.frames, layout.rows, layout.cols)
        if model_family and self.model_family and model_family != self.model_family:
            raise HeadConfigMismatch(
                f"head_config was searched for model family {self.model_family!r} but is used with "
                f"{model_family!r}; run dit_sparse.head_search.search_heads on this model"
            )
        if grid != tuple(self.grid):
            g = "x".join(map(str, self.grid))
            raise HeadConfigMismatch(
                f"head_config was searched for the video grid {g} (frames x rows x cols) but this call has "
                f"{'x'.join(map(str, grid))}; search again at this resolution/length, or drop head_config "
                f"to choose heads online"
            )

    def patterns_for(self, layer_name: str, heads: int) -> tuple[TilePattern, ...]:
        """The pattern of each head of `layer_name` (raises a clear error for unknown layers/head counts)."""
        if layer_name not in self.heads:
            raise HeadConfigMismatch(
                f"head_config has no entry for layer {layer_name!r} (it has {len(self.heads)} layers, e.g. "
                f"{sorted(self.heads)[:3]}); it was searched on a different model"
            )
        pats = self.heads[layer_name]
        if len(pats) != heads:
            raise HeadConfigMismatch(
                f"head_config lists {len(pats)} heads for layer {layer_name!r} but the model has {heads}"
            )
        return tuple(pats)

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "version": VERSION,
            "model_family": self.model_family,
            "grid": list(self.grid),
            "text_tokens": self.text_tokens,
            "tile": list(self.tile),
            "block": self.block,
            "sparsity": self.sparsity,
            "heads": {name: [p.to_json() for p in pats] for name, pats in self.heads.items()},
            "errors": self.errors,
        }

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_json(), indent=1))

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> HeadAssignment:
        if d.get("format") != FORMAT:
            raise ConfigError(f"not a window3d head_config (format {d.get('format')!r}, expected {FORMAT!r})")
        if d.get("version") != VERSION:
            raise ConfigError(f"head_config version {d.get('version')!r} is not supported (expected {VERSION})")
        try:
            return cls(
                model_family=d.get("model_family"),
                grid=tuple(int(x) for x in d["grid"]),  # type: ignore[arg-type]
                tile=tuple(int(x) for x in d["tile"]),  # type: ignore[arg-type]
                sparsity=float(d["sparsity"]),
                heads={name: [TilePattern.from_json(p) for p in pats] for name, pats in d["heads"].items()},
                text_tokens=int(d.get("text_tokens", 0)),
                errors=d.get("errors", {}),
                block=None if d.get("block") is None else int(d["block"]),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(f"malformed window3d head_config: {exc}") from exc

    @classmethod
    def load(cls, path: str | Path, layout: VideoLayout | None = None,
             model_family: str | None = None) -> HeadAssignment:
        """Read a file written by `save`; checks grid/family when given."""
        try:
            data = json.loads(Path(path).read_text())
        except FileNotFoundError as exc:
            raise ConfigError(f"head_config file {str(path)!r} does not exist") from exc
        except json.JSONDecodeError as exc:
            raise ConfigError(f"head_config file {str(path)!r} is not JSON: {exc}") from exc
        out = cls.from_json(data)
        if layout is not None:
            out.check(layout, model_family)
        elif model_family:
            out.check(VideoLayout(*out.grid), model_family)
        return out
