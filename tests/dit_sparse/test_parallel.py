"""Sparse attention under Diffusers' own Ulysses context parallelism: 2 CPU processes over gloo.

The module launches itself twice (`python test_parallel.py OUTDIR` with torchrun's environment variables)
once per test session; each rank compares the CP=2 output of tiny Wan, Flux and LTX transformers with the
single-process output of an identical model, for `dit_sparse.apply` called before and after
`enable_parallelism`, and writes what it measured as JSON for the tests below to check.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from dit_sparse.layout import VideoLayout
from dit_sparse.parallel import gathered_order, ulysses_group

WORLD = 2
ATOL = 1e-5

# (name, model, method, sparsity, options, order, steps): order "before" = apply, then enable_parallelism.
CASES = [
    ("wan-full-before", "wan", "full", 0.5, {"block_size": 16}, "before", 1),
    ("wan-full-after", "wan", "full", 0.5, {"block_size": 16}, "after", 1),
    ("wan-window3d-after", "wan", "window3d", 0.75, {"pattern": "window", "tile": (1, 2, 2)}, "after", 1),
    ("wan-pooled-before", "wan", "pooled", 0.6, {"block_size": 16}, "before", 1),
    ("wan-semantic-warmup", "wan", "semantic", 0.6, {}, "before", 2),
    ("flux-window3d-before", "flux", "window3d", 0.6, {"pattern": "window", "tile": (1, 2, 2)}, "before", 1),
    ("flux-window3d-after", "flux", "window3d", 0.6, {"pattern": "window", "tile": (1, 2, 2)}, "after", 1),
    ("ltx-window3d-before", "ltx", "window3d", 0.6, {"pattern": "window", "tile": (1, 2, 2)}, "before", 1),
]


# ---------------------------------------------------------------------- worker (one per rank)
def _tiny_flux(seed: int = 0):
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(seed)
    return FluxTransformer2DModel(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1,
                                  attention_head_dim=64, num_attention_heads=4, joint_attention_dim=32,
                                  pooled_projection_dim=32, axes_dims_rope=(16, 24, 24)).eval()


def _model_and_calls(family: str, steps: int):
    """A fresh model and one forward closure per denoising step (fixed random inputs, batch 2)."""
    g = torch.Generator().manual_seed(1)
    if family == "wan":
        from dit_sparse.pipelines.tiny_models import tiny_wan_transformer

        model = tiny_wan_transformer(num_layers=2, heads=4, head_dim=64)
        x = torch.randn(2, 16, 3, 10, 12, generator=g)  # grid 3 x 5 x 6 = 90 tokens (even, ragged blocks)
        e = torch.randn(2, 7, 32, generator=g)
        ts = [torch.tensor([800.0, 800.0]), torch.tensor([600.0, 600.0])][:steps]
        return model, [lambda t=t: model(x, t, e, return_dict=False)[0] for t in ts]
    if family == "ltx":
        from diffusers import LTXVideoTransformer3DModel

        torch.manual_seed(0)
        model = LTXVideoTransformer3DModel(in_channels=8, out_channels=8, num_attention_heads=4, attention_head_dim=64,
                                           cross_attention_dim=256, num_layers=2, caption_channels=16).eval()
        frames, height, width = 3, 4, 5  # packed latents [B, 60, 8]; LTX's cp_plan splits them at the root
        x = torch.randn(2, frames * height * width, 8, generator=g)
        e = torch.randn(2, 6, 16, generator=g)
        return model, [lambda: model(x, e, torch.tensor([700.0, 700.0]), None, num_frames=frames, height=height,
                                     width=width, rope_interpolation_scale=(8 / 25, 32, 32), return_dict=False)[0]]
    model = _tiny_flux()
    rows, cols, text = 6, 5, 6  # halves of whole rows: what Flux's cp_plan hands each of 2 ranks
    x = torch.randn(2, rows * cols, 4, generator=g)
    e = torch.randn(2, text, 32, generator=g)
    pooled = torch.randn(2, 32, generator=g)
    r, c = torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij")
    img_ids = torch.stack([torch.zeros_like(r), r, c], -1).reshape(-1, 3).float()
    txt_ids = torch.zeros(text, 3)
    ts = [torch.tensor([0.8, 0.8]), torch.tensor([0.6, 0.6])][:steps]
    return model, [lambda t=t: model(hidden_states=x, encoder_hidden_states=e, pooled_projections=pooled,
                                     timestep=t, img_ids=img_ids, txt_ids=txt_ids, return_dict=False)[0]
                   for t in ts]


@torch.no_grad()
def _run_case(family, method, sparsity, options, order, steps, parallel: bool):
    import dit_sparse
    from dit_sparse.parallel import enable_ulysses

    model, calls = _model_and_calls(family, steps)
    kwargs = dict(warmup_steps=1 if steps > 1 else 0, warmup_layers=0, backend="reference", **options)
    if parallel and order == "after":
        enable_ulysses(model, WORLD)
    handle = dit_sparse.apply(model, method, sparsity, **kwargs)
    if parallel and order == "before":
        enable_ulysses(model, WORLD)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        outs = [call() for call in calls]
    state_heads = sorted({int(v.shape[1]) for _, states in handle.tracker.states.items() for st in states
                          for v in vars(st).values() if torch.is_tensor(v) and v.dim() >= 2})
    return outs, handle.stats(), [str(w.message) for w in caught if "dit-sparse" in str(w.message)], state_heads


@torch.no_grad()
def _remove_diff(order: str) -> float:
    """Largest difference from the dense single-process output after apply / enable / remove."""
    import dit_sparse
    from dit_sparse.parallel import enable_ulysses

    model, (call,) = _model_and_calls("wan", 1)
    ref = call()
    model, (call,) = _model_and_calls("wan", 1)
    if order == "after":
        enable_ulysses(model, WORLD)
    handle = dit_sparse.apply(model, "full", 0.5, warmup_steps=0, warmup_layers=0)
    if order == "before":
        enable_ulysses(model, WORLD)
    handle.remove()
    return float((call() - ref).abs().max())


def _worker(outdir: Path) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    report = {}
    for name, family, method, sparsity, options, order, steps in CASES:
        ref, ref_stats, _, _ = _run_case(family, method, sparsity, options, order, steps, parallel=False)
        out, stats, warned, state_heads = _run_case(family, method, sparsity, options, order, steps, parallel=True)
        report[name] = {
            "max_abs_diff": max(float((a - b).abs().max()) for a, b in zip(out, ref)),
            "ref_scale": max(float(b.abs().max()) for b in ref),
            "ref_stats": ref_stats,
            "stats": stats,
            "warnings": warned,
            "state_heads": state_heads,
        }
    report["remove"] = {order: _remove_diff(order) for order in ("before", "after")}
    (outdir / f"rank{rank}.json").write_text(json.dumps(report))
    dist.destroy_process_group()


# ---------------------------------------------------------------------- tests (the parent process)
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def reports(tmp_path_factory) -> list[dict]:
    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        pytest.skip("torch.distributed with the gloo backend is not available")
    outdir = tmp_path_factory.mktemp("cp")
    port = _free_port()
    procs = []
    for rank in range(WORLD):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD),
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
        procs.append(subprocess.Popen([sys.executable, __file__, str(outdir)], env=env, text=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
    logs = []
    for p in procs:
        try:
            logs.append(p.communicate(timeout=150)[0])
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            pytest.fail("context-parallel workers did not finish in 150 s")
    for rank, (p, log) in enumerate(zip(procs, logs)):
        assert p.returncode == 0, f"rank {rank} failed:\n{log[-4000:]}"
    return [json.loads((outdir / f"rank{r}.json").read_text()) for r in range(WORLD)]


@pytest.mark.parametrize("name", [c[0] for c in CASES])
def test_cp2_output_equals_single_process(reports, name):
    for rank, rep in enumerate(reports):
        case = rep[name]
        assert case["ref_scale"] > 0.1  # a real output, not zeros
        assert case["max_abs_diff"] < ATOL, f"rank {rank}: {case}"
        assert not case["warnings"], f"rank {rank} fell back: {case['warnings']}"
        stats, ref = case["stats"], case["ref_stats"]
        assert stats["sparse_calls"] == ref["sparse_calls"] > 0
        assert stats["dense_calls"] == ref["dense_calls"]
    # Each rank counts its own heads (equal shares): their mean is the single-process sparsity.
    mean = sum(rep[name]["stats"]["sparsity_in_sparse_calls"] for rep in reports) / WORLD
    assert mean == pytest.approx(reports[0][name]["ref_stats"]["sparsity_in_sparse_calls"], abs=1e-6)
    if "-full-" not in name:
        assert mean > 0.1


def test_method_state_holds_only_local_heads(reports):
    # The semantic method caches centroids [B, H, K, D]: under CP=2 each rank keeps 4 / 2 = 2 heads.
    for rep in reports:
        assert rep["wan-semantic-warmup"]["state_heads"] == [2]


def test_remove_restores_context_parallel_originals(reports):
    for rep in reports:
        assert rep["remove"]["after"] < ATOL


def test_remove_after_enable_parallelism_restores_context_parallel_originals(reports):
    for rep in reports:
        assert rep["remove"]["before"] < ATOL


def test_generate_cli_with_cp2_writes_once(tmp_path):
    out = tmp_path / "v.gif"
    port = _free_port()
    cmd = [sys.executable, "-m", "dit_sparse.pipelines.cli", "generate", "--model", "tiny", "--device", "cpu",
           "--cp", "2", "--method", "window3d", "--sparsity", "0.5", "--steps", "2", "--warmup", "0",
           "--warmup-layers", "0", "--out", str(out)]
    procs = [subprocess.Popen(cmd, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              env=dict(os.environ, RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE="2", OMP_NUM_THREADS="1",
                                       MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)))
             for r in range(WORLD)]
    logs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], logs
    assert "context parallel: Ulysses x2" in logs[0][0] and "wrote" in logs[0][0]
    assert logs[1][0] == ""  # only rank 0 reports
    assert out.stat().st_size > 0


def test_generate_cli_cp_without_torchrun_says_how_to_launch(tmp_path, monkeypatch, capsys):
    from dit_sparse.pipelines.cli import main

    for var in ("RANK", "WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    assert main(["generate", "--model", "tiny", "--cp", "2", "--out", str(tmp_path / "v.gif")]) == 2
    assert "torchrun --nproc-per-node" in capsys.readouterr().err


def test_gathered_order_restores_the_joint_sequence():
    for text_first in (True, False):
        layout = VideoLayout(1, 4, 6, text_tokens=8, text_first=text_first)  # 24 video + 8 text
        canonical = torch.arange(layout.seq_len)
        text = canonical[:8] if text_first else canonical[24:]
        video = canonical[8:] if text_first else canonical[:24]
        # Shard r holds [text_r, video_r] (or [video_r, text_r]); the exchange concatenates the shards.
        shards = [torch.cat([t, v] if text_first else [v, t]) for t, v in zip(text.chunk(WORLD), video.chunk(WORLD))]
        gathered = torch.cat(shards)
        to_canonical, to_gathered = gathered_order(layout, WORLD, torch.device("cpu"))
        assert torch.equal(gathered[to_canonical], canonical)
        assert torch.equal(canonical[to_gathered], gathered)
    assert gathered_order(VideoLayout(2, 4, 6), WORLD, torch.device("cpu")) is None


def test_unsupported_parallel_modes_name_the_reason():
    from types import SimpleNamespace

    cfg = lambda **kw: SimpleNamespace(context_parallel_config=SimpleNamespace(  # noqa: E731
        **{"ring_degree": 1, "ulysses_degree": 1, "ulysses_anything": False, **kw}))
    assert ulysses_group(None, 4) == (None, None)
    assert ulysses_group(SimpleNamespace(context_parallel_config=None), 4) == (None, None)
    assert "ring" in ulysses_group(cfg(ring_degree=2), 4)[1]
    assert "heads" in ulysses_group(cfg(ulysses_degree=3), 4)[1]
    assert "ulysses_anything" in ulysses_group(cfg(ulysses_degree=2, ulysses_anything=True), 4)[1]


if __name__ == "__main__":
    _worker(Path(sys.argv[1]))
