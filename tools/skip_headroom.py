"""How much could tile skipping skip on a reference model, and how much does the skip cache's bound lose?

For every self-attention layer and head of a reference model (a folder `dit-sparse train-reference --out`
wrote; default the bundled one) at noise level t on held-out clips, in the model's token order, with
`--block`-token query ranges and key tiles, it compares three per-(query range, key tile) estimates of the
largest attention mass any row of the range puts on the tile:

* exact: max over the rows of sum_{keys in tile} exp(s - lse_row) (what an oracle would use);
* bound: n_tile * exp(tile_max - min_row lse), the bound `"X+skip"` used until 2026-12-02;
* tile-lse: exp(max_row logsumexp_{keys in tile}(s) - min_row lse), also a rigorous bound, without the
  n_tile factor: the one `"X+skip"` uses since (the kernels return `tile_lse`; docs/tile-skip.md).

Each estimate drives the skip rule (per query range, smallest first while the summed estimates stay below
`tol`, at most `max_skip` of the tiles), and the tool reports the share of tiles skipped and the largest true
mass a row lost. The GPU kernel is not involved: float32 on the CPU, one forward of the transformer.

    python tools/skip_headroom.py --t 0.3,0.5,0.7 --tols 0.02,0.1 --out out/skip_headroom.json
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from pathlib import Path

import torch

ESTIMATES = ("exact", "bound", "tile-lse")


def capture_qk(pipe, t: float, clips: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """[(q, k)] of every self-attention call of one transformer forward at noise level t, each [N, H, S, D]."""
    from dit_sparse.pipelines.clip_prompts import spec_prompts
    from dit_sparse.pipelines.clip_render import render
    from dit_sparse.pipelines.reference_eval import rotated_qk
    from dit_sparse.pipelines.video_data import heldout_specs

    captured: list[tuple[torch.Tensor, torch.Tensor]] = []

    class Capture:
        def __init__(self, inner) -> None:
            self.inner = inner

        def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
            if encoder_hidden_states is None:
                q, k = rotated_qk(attn, hidden_states, rotary_emb)
                captured.append((q.transpose(1, 2).float(), k.transpose(1, 2).float()))
            return self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, rotary_emb)

    originals = {}
    for name, mod in pipe.transformer.named_modules():
        if name.endswith("attn1"):
            originals[name] = mod.get_processor()
            mod.set_processor(Capture(originals[name]))
    try:
        spec = heldout_specs().index(list(range(clips)))
        x0 = render(spec, num_frames=pipe.config.num_frames).float()
        noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(0))
        xt = (1 - t) * x0 + t * noise
        emb = pipe.encode_prompt(spec_prompts(spec), "cpu")
        with torch.no_grad():
            pipe.transformer(hidden_states=xt, timestep=torch.full((clips,), t * 1000.0), encoder_hidden_states=emb)
    finally:
        for name, mod in pipe.transformer.named_modules():
            if name in originals:
                mod.set_processor(originals[name])
    return captured


def estimates(q: torch.Tensor, k: torch.Tensor, block: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-row tile masses [S, NB] and the three estimates [NB, NB] for one head (q, k: [S, D], S % block == 0)."""
    S, D = q.shape
    nb = S // block
    s = (q @ k.T) / math.sqrt(D)
    lse = s.logsumexp(-1)
    row_tile = (s - lse[:, None]).exp().view(S, nb, block).sum(-1)
    min_lse = lse.view(nb, block).amin(1)[:, None]
    tile_max = s.view(nb, block, nb, block).amax(dim=(1, 3))
    tile_lse = s.view(S, nb, block).logsumexp(-1).view(nb, block, nb).amax(1)
    return row_tile, {
        "exact": row_tile.view(nb, block, nb).amax(1),
        "bound": block * (tile_max - min_lse).exp(),
        "tile-lse": (tile_lse - min_lse).exp(),
    }


def skip_set(estimate: torch.Tensor, tol: float, max_skip: float) -> torch.Tensor:
    """The skip rule of `"X+skip"` on one head: per query range, tiles smallest estimate first while the
    running sum stays below tol, at most max_skip of them. Boolean [NB, NB]."""
    srt, order = estimate.sort(-1)
    n = (srt.cumsum(-1) < tol).sum(-1).clamp(max=int(max_skip * estimate.shape[-1]))
    take = torch.arange(estimate.shape[-1])[None, :] < n[:, None]
    return torch.zeros_like(take).scatter(-1, order, take)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=None, help="reference-model folder (default: the bundled model)")
    p.add_argument("--t", default="0.5", help="comma list of noise levels in (0, 1)")
    p.add_argument("--tols", default="0.02,0.1")
    p.add_argument("--max-skip", type=float, default=0.9)
    p.add_argument("--block", type=int, default=64)
    p.add_argument("--clips", type=int, default=1)
    p.add_argument("--out", default=None, help="JSON file for the per-head figures")
    a = p.parse_args()

    from dit_sparse.pipelines.loading import assets_dir
    from dit_sparse.pipelines.reference_model import ReferenceVideoPipeline

    pipe = ReferenceVideoPipeline.from_pretrained(a.model or str(assets_dir() / "reference-video-dit"))
    pipe.transformer.float()
    tols = [float(x) for x in a.tols.split(",")]
    rows = []
    for t in (float(x) for x in a.t.split(",")):
        for layer, (q, k) in enumerate(capture_qk(pipe, t, a.clips)):
            for n in range(q.shape[0]):
                for h in range(q.shape[1]):
                    row_tile, est = estimates(q[n, h], k[n, h], a.block)
                    for tol in tols:
                        for name in ESTIMATES:
                            skip = skip_set(est[name], tol, a.max_skip)
                            lost = (row_tile.view(skip.shape[0], a.block, -1) * skip[:, None, :]).sum(-1).amax()
                            rows.append(dict(t=t, layer=layer, clip=n, head=h, tol=tol, estimate=name,
                                             skipped=float(skip.float().mean()), max_lost=float(lost)))
    print(f"model {a.model or 'bundled'}; {a.block}-token ranges and tiles; max_skip {a.max_skip}; mean over "
          "layers, heads and clips of the share of tiles skipped (largest mass a row lost)")
    print("t     tol    " + "".join(f"{name:>20}" for name in ESTIMATES))
    for t in sorted({r["t"] for r in rows}):
        for tol in tols:
            cells = []
            for name in ESTIMATES:
                sel = [r for r in rows if r["t"] == t and r["tol"] == tol and r["estimate"] == name]
                cells.append(f"{statistics.mean(r['skipped'] for r in sel):.3f} ({max(r['max_lost'] for r in sel):.3f})")
            print(f"{t:<5} {tol:<6} " + "".join(f"{c:>20}" for c in cells))
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(dict(args=vars(a), rows=rows), indent=1) + "\n")


if __name__ == "__main__":
    main()
