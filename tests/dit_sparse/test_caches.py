"""dit-sparse composed with Diffusers' own cache hooks (`transformer.enable_cache(config)`).

Each cache hooks blocks, attention modules or the transformer's forward, never the attention processors,
so a cache and dit-sparse stack in either order. These tests run a real tiny `WanPipeline` (CFG as two
forwards, "cond" and "uncond") and a tiny CogVideoX transformer in a hand-written loop (CFG batched,
which FasterCache needs), and check: either order of apply / enable_cache, either order of undoing them,
the model exactly as before afterwards, the step counter and CFG state untouched by skipped work, and
outputs against the cache alone.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch
from diffusers import CogVideoXTransformer3DModel
from diffusers.hooks import (
    FasterCacheConfig,
    FirstBlockCacheConfig,
    MagCacheConfig,
    PyramidAttentionBroadcastConfig,
    SeaCacheConfig,
    TaylorSeerCacheConfig,
    TextKVCacheConfig,
)
from diffusers.models.embeddings import get_3d_rotary_pos_embed
from dit_sparse.pipelines.tiny_models import tiny_wan_pipeline

import dit_sparse
from dit_sparse.tracking import HOOK_NAME

STEPS = 6
LAYERS = 3

# Configurations that make each cache skip work on the tiny Wan within 6 steps (the defaults are tuned
# for 30-50 steps of real models). TaylorSeer's default module patterns ("^blocks.*attn", matched in
# full) name no Wan module (`attn1`, `attn2`), so its blocks are named explicitly.
CACHES = {
    "first_block": lambda pipe: FirstBlockCacheConfig(threshold=0.5),
    "mag": lambda pipe: MagCacheConfig(mag_ratios=[1.0] * STEPS, num_inference_steps=STEPS, threshold=0.5),
    "taylorseer": lambda pipe: TaylorSeerCacheConfig(
        cache_interval=2, disable_cache_before_step=2, taylor_factors_dtype=torch.float32,
        cache_identifiers=[r"blocks\.\d+"]),
    "taylorseer_attn": lambda pipe: TaylorSeerCacheConfig(  # hooks the sparse attention modules themselves
        cache_interval=2, disable_cache_before_step=2, taylor_factors_dtype=torch.float32,
        cache_identifiers=[r"blocks\.\d+\.attn1"]),
    "pab": lambda pipe: PyramidAttentionBroadcastConfig(
        spatial_attention_block_skip_range=2, spatial_attention_timestep_skip_range=(-1, 1001),
        current_timestep_callback=lambda: pipe.current_timestep),
    "sea": lambda pipe: SeaCacheConfig(threshold=10.0),
    "text_kv": lambda pipe: TextKVCacheConfig(),  # lossless: caches the text keys/values of cross-attention
}
# Caches that change the output here (TextKV is exact by design), so "equals the cache alone" means
# the cache really ran.
LOSSY = set(CACHES) - {"text_kv"}


@pytest.fixture(autouse=True)
def _one_thread():
    # The tensors here are tiny: on a busy 2-core machine thread hand-offs cost 100x the arithmetic.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _generate(pipe) -> torch.Tensor:
    g = torch.Generator().manual_seed(4)
    return pipe(
        prompt_embeds=torch.randn(1, 7, 32, generator=g), negative_prompt_embeds=torch.randn(1, 7, 32, generator=g),
        height=64, width=64, num_frames=5, num_inference_steps=STEPS, guidance_scale=4.0, output_type="latent",
        generator=torch.Generator().manual_seed(0),
    ).frames


def _processors(model) -> dict[str, object]:
    return {name: m.processor for name, m in model.named_modules() if hasattr(m, "set_processor")}


def _assert_pristine(model, processors: dict[str, object]) -> None:
    """Same processor objects, no hook left anywhere, and the forward is the class's own again."""
    now = _processors(model)
    assert now.keys() == processors.keys()
    assert all(now[k] is processors[k] for k in processors)
    for name, m in model.named_modules():
        registry = getattr(m, "_diffusers_hook", None)
        assert registry is None or not registry.hooks, f"hooks left on {name or 'the transformer'}"
    assert getattr(model.forward, "__func__", None) is type(model).forward
    assert not model.is_cache_enabled


@pytest.fixture(scope="module")
def wan():
    """(pipeline, dense output, processors, {cache: output with the cache alone})."""
    torch.set_num_threads(1)
    pipe = tiny_wan_pipeline(num_layers=LAYERS)
    pipe.set_progress_bar_config(disable=True)
    dense = _generate(pipe)
    alone = {}
    for name, make in CACHES.items():
        pipe.transformer.enable_cache(make(pipe))
        alone[name] = _generate(pipe)
        pipe.transformer.disable_cache()
    return pipe, dense, _processors(pipe.transformer), alone


def _apply_both(pipe, cache: str, sparse_first: bool, method: str = "semantic", sparsity: float = 0.0,
                **kw):
    if sparse_first:
        handle = dit_sparse.apply(pipe, method, sparsity, **kw)
        pipe.transformer.enable_cache(CACHES[cache](pipe))
    else:
        pipe.transformer.enable_cache(CACHES[cache](pipe))
        handle = dit_sparse.apply(pipe, method, sparsity, **kw)
    return handle


def _undo_both(pipe) -> None:
    if pipe.transformer.is_cache_enabled:
        pipe.transformer.disable_cache()
    dit_sparse.remove(pipe)


@pytest.mark.parametrize("remove_sparse_first", [True, False], ids=["remove-then-disable", "disable-then-remove"])
@pytest.mark.parametrize("sparse_first", [True, False], ids=["apply-then-cache", "cache-then-apply"])
@pytest.mark.parametrize("cache", list(CACHES))
def test_any_order_and_each_undo_removes_only_its_part(wan, cache, sparse_first, remove_sparse_first):
    pipe, dense, processors, alone = wan
    if cache in LOSSY:
        assert not torch.equal(alone[cache], dense)  # the configuration makes the cache skip work
    handle = _apply_both(pipe, cache, sparse_first)
    try:
        assert torch.equal(_generate(pipe), alone[cache])  # sparsity 0 + cache is the cache alone, bitwise
        if remove_sparse_first:
            dit_sparse.remove(pipe)
            assert pipe.transformer.is_cache_enabled
            assert torch.equal(_generate(pipe), alone[cache])  # the cache still fully works
            pipe.transformer.disable_cache()
        else:
            pipe.transformer.disable_cache()
            assert handle.active
            generation = handle.tracker.generation
            assert torch.equal(_generate(pipe), dense)
            assert handle.tracker.generation == generation + 1  # still tracking (reset by the pipeline)
            dit_sparse.remove(pipe)
    finally:
        _undo_both(pipe)
    _assert_pristine(pipe.transformer, processors)
    assert torch.equal(_generate(pipe), dense)


def _record(handle):
    """Step and branch at every transformer forward; the step at every attention call; (step, layer
    name, branch, state) at every plan."""
    forwards: list[tuple[int, str]] = []
    attends: list[int] = []
    plans: list[tuple[int, str, str, int]] = []
    tracker, method, core = handle.tracker, handle.method, handle.core
    begin, plan, attend = tracker.begin_forward, method.plan, core.attend

    def recording_begin(*args, **kwargs):
        begin(*args, **kwargs)
        forwards.append((tracker.step, tracker.branch))

    def recording_plan(q, k, v, ctx):
        plans.append((ctx.step, ctx.layer_name, ctx.branch, id(ctx.states)))
        return plan(q, k, v, ctx)

    def recording_attend(*args, **kwargs):
        attends.append(tracker.step)
        return attend(*args, **kwargs)

    tracker.begin_forward = recording_begin
    method.plan = recording_plan
    core.attend = recording_attend
    return forwards, attends, plans


@pytest.mark.parametrize("sparse_first", [True, False], ids=["apply-then-cache", "cache-then-apply"])
@pytest.mark.parametrize("cache", sorted(LOSSY))
def test_skipped_work_leaves_steps_warmup_and_branches_intact(wan, cache, sparse_first):
    pipe, _, processors, alone = wan
    warmup = 2
    handle = _apply_both(pipe, cache, sparse_first, "full", 0.5, warmup_steps=warmup, warmup_layers=0,
                         block_size=16, backend="cpu")
    try:
        forwards, attends, plans = _record(handle)
        out = _generate(pipe)
        stats = handle.stats()
    finally:
        _undo_both(pipe)
    _assert_pristine(pipe.transformer, processors)
    # The counter follows the loop, one cond and one uncond forward per step, whatever the cache skipped.
    assert forwards == [(i, b) for i in range(STEPS) for b in ("cond", "uncond")]
    # Warm-up holds: the attention calls that ran (a cache may skip some) are dense before step `warmup`
    # and sparse from it on ("full" plans every call).
    assert plans and min(p[0] for p in plans) >= warmup
    assert stats["dense_calls"] == sum(step < warmup for step in attends) > 0
    assert stats["sparse_calls"] == sum(step >= warmup for step in attends) == len(plans)
    assert stats["fallback_calls"] == 0
    # The cache did skip sparse work: fewer plans than layers x branches x sparse steps.
    assert len(plans) < (STEPS - warmup) * 2 * LAYERS
    # CFG branches keep their own state, and a layer's state survives the steps a cache skips.
    state_of: dict[tuple[str, str], int] = {}
    for _, layer, branch, state in plans:
        assert state_of.setdefault((layer, branch), state) == state
    for layer in {layer for _, layer, _, _ in plans}:
        if (layer, "cond") in state_of and (layer, "uncond") in state_of:
            assert state_of[layer, "cond"] != state_of[layer, "uncond"]
    # PAB keeps one counter and one cached output per attention module, not per cache context: with CFG
    # as two forwards it computes in one branch and hands that output to the other (Diffusers' behaviour,
    # the same without dit-sparse), so here only "cond" reaches the sparse core.
    assert {branch for _, _, branch, _ in plans} == ({"cond"} if cache == "pab" else {"cond", "uncond"})
    # "full" computes every block: the same as the cache alone, up to float32 rounding.
    torch.testing.assert_close(out, alone[cache], rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------ FasterCache (batched CFG)
def _cogvideox():
    torch.manual_seed(0)
    model = CogVideoXTransformer3DModel(
        num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4, time_embed_dim=8,
        text_embed_dim=16, num_layers=2, sample_width=12, sample_height=10, sample_frames=9, patch_size=2,
        max_text_seq_length=8, use_rotary_positional_embeddings=True,
    ).eval()
    g = torch.Generator().manual_seed(0)
    cos, sin = get_3d_rotary_pos_embed(embed_dim=16, crops_coords=((0, 0), (5, 6)), grid_size=(5, 6),
                                       temporal_size=2)
    return model, torch.randn(1, 2, 4, 10, 12, generator=g), torch.randn(2, 8, 16, generator=g), (cos, sin)


@torch.no_grad()
def _cog_loop(model, x, text, rope, clock: dict) -> torch.Tensor:
    """CogVideoX's denoising loop, reduced: uncond and cond batched in one forward per step."""
    outs = []
    for t in torch.linspace(900, 100, STEPS):
        clock["t"] = float(t)
        with model.cache_context("cond_uncond"):
            out = model(hidden_states=torch.cat([x, x]), encoder_hidden_states=text, timestep=t.expand(2),
                        image_rotary_emb=rope, return_dict=False)[0]
        uncond, cond = out.chunk(2)
        x = x - 0.1 * (uncond + 3.0 * (cond - uncond))
        outs.append(x)
    model._reset_stateful_cache()  # what the pipelines' maybe_free_model_hooks does
    return torch.stack(outs)


def _faster_cache(clock: dict) -> FasterCacheConfig:
    # Skips the uncond half of the batch and approximates attention on alternate steps.
    return FasterCacheConfig(
        spatial_attention_block_skip_range=2, spatial_attention_timestep_skip_range=(-1, 901),
        unconditional_batch_skip_range=2, unconditional_batch_timestep_skip_range=(-1, 901),
        current_timestep_callback=lambda: clock["t"], tensor_format="BFCHW", attention_weight_callback=lambda _: 0.5,
    )


@pytest.mark.parametrize("remove_sparse_first", [True, False], ids=["remove-then-disable", "disable-then-remove"])
@pytest.mark.parametrize("sparse_first", [True, False], ids=["apply-then-cache", "cache-then-apply"])
def test_faster_cache_composes_on_batched_cfg(sparse_first, remove_sparse_first):
    model, x, text, rope = _cogvideox()
    clock: dict = {}
    processors = _processors(model)
    dense = _cog_loop(model, x, text, rope, clock)
    model.enable_cache(_faster_cache(clock))
    alone = _cog_loop(model, x, text, rope, clock)
    model.disable_cache()
    assert not torch.equal(alone, dense)

    for method, sparsity in (("semantic", 0.0), ("full", 0.5)):
        if sparse_first:
            handle = dit_sparse.apply(model, method, sparsity, warmup_steps=0, warmup_layers=0, backend="cpu")
            model.enable_cache(_faster_cache(clock))
        else:
            model.enable_cache(_faster_cache(clock))
            handle = dit_sparse.apply(model, method, sparsity, warmup_steps=0, warmup_layers=0, backend="cpu")
        try:
            forwards, _, _ = _record(handle)
            out = _cog_loop(model, x, text, rope, clock)
            # Timestep-tracked (no step_index in this context): one forward per step, batch kept or halved.
            assert forwards == [(i, "cond_uncond") for i in range(STEPS)]
            if sparsity == 0.0:
                assert torch.equal(out, alone)
            else:
                torch.testing.assert_close(out, alone, rtol=1e-4, atol=1e-5)
                # FasterCache skipped attention in some steps: fewer sparse calls than layers x steps.
                assert 0 < handle.stats()["sparse_calls"] < 2 * STEPS
            if remove_sparse_first:
                dit_sparse.remove(model)
                # FasterCache's denoiser hook (a `new_forward`) wraps ours: removing ours must keep it.
                assert torch.equal(_cog_loop(model, x, text, rope, clock), alone)
            else:
                model.disable_cache()
        finally:
            if model.is_cache_enabled:
                model.disable_cache()
            dit_sparse.remove(model)
        _assert_pristine(model, processors)
        assert torch.equal(_cog_loop(model, x, text, rope, clock), dense)


def test_removing_the_tracker_keeps_a_later_new_forward_hook():
    """Diffusers' remove_hook would drop the `new_forward` of the hook registered after ours."""
    from diffusers.hooks import HookRegistry, ModelHook

    class Doubling(ModelHook):
        def new_forward(self, module, *args, **kwargs):
            return self.fn_ref.original_forward(*args, **kwargs) * 2

    model = torch.nn.Linear(3, 3)
    x = torch.randn(2, 3)
    plain = model(x)
    tracker = dit_sparse.tracking.StepTracker()
    dit_sparse.tracking.attach_tracker(model, tracker, timestep_fn=lambda a, k: None)
    registry = HookRegistry.check_if_exists_or_initialize(model)
    registry.register_hook(Doubling(), "doubling")
    dit_sparse.tracking.detach_tracker(model)
    assert registry.get_hook(HOOK_NAME) is None
    calls = tracker.forward_calls
    assert torch.equal(model(x), plain * 2)
    assert tracker.forward_calls == calls  # the removed tracker is out of the chain
    registry.remove_hook("doubling")
    assert torch.equal(model(x), plain)
    assert getattr(model.forward, "__func__", None) is type(model).forward


# ------------------------------------------------------------------------ the bundled reference model
# Loose enough that the cache reuses steps on this small clip (0.3 reused none on model v2; 0.5 does).
BUNDLED_FBC_THRESHOLD = 0.8


def test_bundled_reference_pipeline_with_first_block_cache():
    from dit_sparse.pipelines.loading import load_model

    pipe = load_model("bundled", torch.device("cpu")).pipe
    pipe.set_progress_bar_config(disable=True)
    transformer = pipe.transformer
    processors = _processors(transformer)

    def run():
        return pipe("a red square moves left", num_inference_steps=STEPS, num_frames=4, height=16, width=16,
                    generator=torch.Generator().manual_seed(0), output_type="latent").frames

    dense = run()
    transformer.enable_cache(FirstBlockCacheConfig(threshold=BUNDLED_FBC_THRESHOLD))
    alone = run()
    transformer.disable_cache()
    assert not torch.equal(alone, dense)
    for sparse_first in (True, False):
        if sparse_first:
            handle = dit_sparse.apply(pipe, "semantic", 0.0)
            transformer.enable_cache(FirstBlockCacheConfig(threshold=BUNDLED_FBC_THRESHOLD))
        else:
            transformer.enable_cache(FirstBlockCacheConfig(threshold=BUNDLED_FBC_THRESHOLD))
            handle = dit_sparse.apply(pipe, "semantic", 0.0)
        try:
            forwards, _, _ = _record(handle)
            assert torch.equal(run(), alone)
            assert forwards == [(i, b) for i in range(STEPS) for b in ("cond", "uncond")]
        finally:
            _undo_both(pipe)
        _assert_pristine(transformer, processors)
    assert torch.equal(run(), dense)


# ------------------------------------------------------------------------ cache-dit (optional)
def _cache_dit_config(cache_dit):
    return cache_dit.DBCacheConfig(Fn_compute_blocks=1, Bn_compute_blocks=0, max_warmup_steps=2,
                                   residual_diff_threshold=0.5, num_inference_steps=STEPS)


@pytest.mark.skipif(importlib.util.find_spec("cache_dit") is None, reason="cache-dit is not installed")
@pytest.mark.parametrize("remove_sparse_first", [True, False], ids=["remove-then-disable", "disable-then-remove"])
def test_cache_dit_enabled_first(remove_sparse_first):
    import cache_dit

    pipe = tiny_wan_pipeline(num_layers=LAYERS)
    pipe.set_progress_bar_config(disable=True)
    processors = _processors(pipe.transformer)
    dense = _generate(pipe)
    cache_dit.enable_cache(pipe, cache_config=_cache_dit_config(cache_dit))
    alone = _generate(pipe)
    assert not torch.equal(alone, dense)
    handle = dit_sparse.apply(pipe, "semantic", 0.0)
    forwards, _, _ = _record(handle)
    assert torch.equal(_generate(pipe), alone)
    assert forwards == [(i, b) for i in range(STEPS) for b in ("cond", "uncond")]
    if remove_sparse_first:
        dit_sparse.remove(pipe)
        assert torch.equal(_generate(pipe), alone)
        cache_dit.disable_cache(pipe)
    else:
        cache_dit.disable_cache(pipe)
        dit_sparse.remove(pipe)
    _assert_pristine(pipe.transformer, processors)
    assert torch.equal(_generate(pipe), dense)


@pytest.mark.skipif(importlib.util.find_spec("cache_dit") is None, reason="cache-dit is not installed")
def test_cache_dit_enabled_after_apply_runs_but_remove_refuses():
    import cache_dit

    pipe = tiny_wan_pipeline(num_layers=LAYERS)
    pipe.set_progress_bar_config(disable=True)
    cache_dit.enable_cache(pipe, cache_config=_cache_dit_config(cache_dit))
    alone = _generate(pipe)
    cache_dit.disable_cache(pipe)
    handle = dit_sparse.apply(pipe, "semantic", 0.0)
    cache_dit.enable_cache(pipe, cache_config=_cache_dit_config(cache_dit))
    assert torch.equal(_generate(pipe), alone)
    sparse_processors = _processors(pipe.transformer)
    # cache-dit wraps the registry's forward: removing dit-sparse would drop cache-dit silently.
    with pytest.raises(RuntimeError, match="cache_dit.enable_cache"):
        dit_sparse.remove(pipe)
    assert handle.active and _processors(pipe.transformer) == sparse_processors  # nothing half-undone
