"""Pipelines with two denoisers (Wan 2.2 A14B: `transformer` for high noise, `transformer_2` for low noise).

A real tiny `WanPipeline` with `boundary_ratio` switches experts mid-loop; every expert must get its own
processors, tracker, method state and statistics, and `remove` must restore both experts' processors.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanPipeline
from dit_sparse.pipelines.tiny_models import tiny_wan_transformer

import dit_sparse
from dit_sparse.config import ConfigError
from dit_sparse.stats import SparsityStats
from dit_sparse.tracking import HOOK_NAME, StepTracker, attach_tracker

STEPS = 4
# FlowMatch with shift 3 over 4 steps gives timesteps 1000, 900, 750, 500: a boundary at 800 hands steps
# 0-1 to `transformer` and steps 2-3 to `transformer_2`, as Wan 2.2's pipeline does.
BOUNDARY = 0.8


def _pipe(with_first: bool = True) -> WanPipeline:
    torch.manual_seed(0)
    vae = AutoencoderKLWan(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1).eval()
    return WanPipeline(
        tokenizer=None, text_encoder=None, vae=vae, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        transformer=tiny_wan_transformer(seed=1) if with_first else None,
        # Twice the heads in the second expert: its calls weigh twice as much in the combined figures.
        transformer_2=tiny_wan_transformer(heads=4, head_dim=32, seed=2), boundary_ratio=BOUNDARY,
    )


def _generate(pipe: WanPipeline) -> torch.Tensor:
    g = torch.Generator().manual_seed(4)
    return pipe(
        prompt_embeds=torch.randn(1, 7, 32, generator=g), negative_prompt_embeds=torch.randn(1, 7, 32, generator=g),
        height=64, width=64, num_frames=9, num_inference_steps=STEPS, guidance_scale=4.0, output_type="latent",
        generator=torch.Generator().manual_seed(0),
    ).frames


def _processors(model: torch.nn.Module) -> dict[str, object]:
    return {name: m.processor for name, m in model.named_modules() if hasattr(m, "set_processor")}


def _record(handle) -> list[tuple[str, int, str]]:
    """(expert, step, CFG branch) of every self-attention call from now on."""
    calls: list[tuple[str, int, str]] = []
    for name, expert in handle.experts.items():
        def recording(query, key, value, _name=name, _tracker=expert.tracker, _attend=expert.core.attend, **kw):
            calls.append((_name, _tracker.step, _tracker.branch))
            return _attend(query, key, value, **kw)

        expert.core.attend = recording
    return calls


@pytest.fixture(scope="module")
def pipe_and_dense():
    pipe = _pipe()
    return pipe, _generate(pipe)


def test_both_experts_run_sparse_and_remove_restores_both(pipe_and_dense):
    pipe, dense = pipe_and_dense
    before = {attr: _processors(getattr(pipe, attr)) for attr in ("transformer", "transformer_2")}
    handle = dit_sparse.apply(pipe, "full", 0.5, warmup_steps=1, warmup_layers=0, block_size=16, backend="cpu")
    try:
        assert list(handle.experts) == ["transformer", "transformer_2"]
        first, second = handle.experts.values()
        assert first.transformer is pipe.transformer and second.transformer is pipe.transformer_2
        assert handle.transformer is pipe.transformer and handle.core is first.core  # single-expert API kept
        assert first.core is not second.core and first.tracker is not second.tracker
        assert first.method is not second.method  # caches and plans are per expert
        for attr in ("transformer", "transformer_2"):
            for name, proc in _processors(getattr(pipe, attr)).items():
                sparse = name.endswith("attn1")
                assert (type(proc).__name__ == "WanSparseAttnProcessor") == sparse
                assert sparse or proc is before[attr][name]
        calls = _record(handle)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no dense fallback
            out = _generate(pipe)
        stats = handle.stats()
    finally:
        dit_sparse.remove(pipe)
    # Each expert ran its own steps, both CFG branches; steps are the pipeline's global index, so the
    # low-noise expert is not warmed up again.
    assert sorted(set(calls)) == [(e, s, b) for e, steps in (("transformer", (0, 1)), ("transformer_2", (2, 3)))
                                  for s in steps for b in ("cond", "uncond")]
    layers, branches = 2, 2
    per_step = layers * branches
    assert stats["experts"]["transformer"]["dense_calls"] == per_step  # step 0: warm-up
    assert stats["experts"]["transformer"]["sparse_calls"] == per_step
    assert stats["experts"]["transformer_2"]["dense_calls"] == 0
    assert stats["experts"]["transformer_2"]["sparse_calls"] == 2 * per_step
    assert stats["sparse_calls"] == 3 * per_step and stats["dense_calls"] == per_step
    torch.testing.assert_close(out, dense, atol=1e-4, rtol=1e-4)
    assert not handle.active
    for attr in ("transformer", "transformer_2"):
        model = getattr(pipe, attr)
        after = _processors(model)
        assert after.keys() == before[attr].keys() and all(after[n] is before[attr][n] for n in after)
        assert model._diffusers_hook.get_hook(HOOK_NAME) is None
        assert not hasattr(model, "_dit_sparse_handle")
    assert torch.equal(_generate(pipe), dense)


def test_combined_stats_add_pairs_not_sparsities(pipe_and_dense):
    pipe, _ = pipe_and_dense
    with dit_sparse.sparse_attention(pipe, "pooled", 0.6, warmup_steps=1, warmup_layers=0, block_size=16,
                                     backend="cpu") as handle:
        _generate(pipe)
        stats = handle.stats()
    first, second = stats["experts"]["transformer"], stats["experts"]["transformer_2"]
    assert first["sparse_calls"] == 4 and second["sparse_calls"] == 8
    assert first["dense_calls"] == 4 and second["dense_calls"] == 0
    assert 0 < first["sparsity_overall"] < second["sparsity_overall"]
    # Pairs are added up, not sparsities averaged: with P pairs per call of the first expert and 2P of
    # the second, the first expert holds 4P sparse of 8P pairs, the second 16P of 16P.
    expected = (4 * first["sparsity_in_sparse_calls"] + 16 * second["sparsity_in_sparse_calls"]) / 20
    assert stats["sparsity_in_sparse_calls"] == pytest.approx(expected)
    expected_overall = (8 * first["sparsity_overall"] + 16 * second["sparsity_overall"]) / 24
    assert stats["sparsity_overall"] == pytest.approx(expected_overall)
    assert stats["sparsity_overall"] != pytest.approx((first["sparsity_overall"] + second["sparsity_overall"]) / 2)


def test_single_transformer_stats_keep_their_keys():
    model = tiny_wan_transformer()
    with dit_sparse.sparse_attention(model, "full", 0.5, warmup_steps=0, warmup_layers=0) as handle:
        assert list(handle.experts) == ["transformer"]
        with torch.no_grad():
            model(torch.randn(1, 16, 2, 4, 4), torch.tensor([500.0]), torch.randn(1, 5, 32))
        stats = handle.stats()
    assert set(stats) == {"sparse_calls", "dense_calls", "fallback_calls", "sparsity_in_sparse_calls",
                          "sparsity_overall"}


def test_merged_stats_sum_counts():
    empty = SparsityStats.merged([SparsityStats(), SparsityStats()]).summary()
    assert empty["sparse_calls"] == 0 and empty["sparsity_overall"] == 0.0
    a, b = SparsityStats(), SparsityStats()
    a.add_dense(100)
    b.add_dense(50, fallback=True)
    merged = SparsityStats.merged([a, b])
    assert (merged.dense_calls, merged.fallback_calls, merged._dense_total) == (2, 1, 150)


def test_apply_is_all_or_nothing_and_refuses_a_second_apply():
    pipe = _pipe()
    before = _processors(pipe.transformer)
    # A stray tracker hook on the second expert makes its apply fail after the first expert was swapped.
    attach_tracker(pipe.transformer_2, StepTracker())
    with pytest.raises(RuntimeError, match="already applied"):
        dit_sparse.apply(pipe, "full", 0.5)
    after = _processors(pipe.transformer)
    assert all(after[n] is before[n] for n in before)
    assert pipe.transformer._diffusers_hook.get_hook(HOOK_NAME) is None
    assert not hasattr(pipe.transformer, "_dit_sparse_handle")
    pipe.transformer_2._diffusers_hook.remove_hook(HOOK_NAME, recurse=False)

    # One expert made sparse on its own: the pipeline as a whole is refused, and remove(pipe) undoes it.
    handle = dit_sparse.apply(pipe.transformer_2, "full", 0.5)
    with pytest.raises(ConfigError, match="already applied"):
        dit_sparse.apply(pipe, "full", 0.5)
    dit_sparse.remove(pipe)
    assert not handle.active


def test_pipeline_with_only_the_second_expert():
    pipe = _pipe(with_first=False)
    with dit_sparse.sparse_attention(pipe, "full", 0.5) as handle:
        assert list(handle.experts) == ["transformer_2"] and handle.transformer is pipe.transformer_2
    assert type(pipe.transformer_2.blocks[0].attn1.processor).__name__ == "WanAttnProcessor"
