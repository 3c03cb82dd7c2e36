"""The step tracker counts steps and CFG branches through a real (tiny) Wan pipeline run."""

from dataclasses import dataclass

import torch
from dit_sparse.pipelines.tiny_models import tiny_wan_pipeline

import dit_sparse
from dit_sparse.method import SparseMethod, register_method
from dit_sparse.state import LayerState

SEEN: list[tuple] = []


@dataclass(frozen=True)
class _SpyConfig:
    pass


@dataclass
class _SpyState(LayerState):
    calls: int = 0


@register_method
class _Spy(SparseMethod):
    """Records the context of every planning call and returns dense."""

    name = "_spy"
    Config = _SpyConfig
    State = _SpyState

    def plan(self, q, k, v, ctx):
        state = self.state_of(ctx)
        state.calls += 1
        SEEN.append((ctx.layer, ctx.step, ctx.num_steps, ctx.branch, id(state), state.calls))
        return None


def _run(pipe, steps=4, guidance=3.0):
    g = torch.Generator().manual_seed(0)
    pe, ne = torch.randn(1, 6, 32, generator=g), torch.randn(1, 6, 32, generator=g)
    return pipe(prompt_embeds=pe, negative_prompt_embeds=ne, height=16, width=16, num_frames=5,
                num_inference_steps=steps, guidance_scale=guidance, output_type="pt",
                generator=torch.Generator().manual_seed(1)).frames


def test_steps_and_branches_through_wan_pipeline_with_cfg():
    pipe = tiny_wan_pipeline()
    handle = dit_sparse.apply(pipe, "_spy", 0.5, warmup_steps=0, warmup_layers=0)
    SEEN.clear()
    _run(pipe, steps=4)
    # 4 steps x 2 branches x 2 layers
    assert len(SEEN) == 16
    assert sorted({s[1] for s in SEEN}) == [0, 1, 2, 3]
    assert {s[2] for s in SEEN} == {4}
    assert {s[3] for s in SEEN} == {"cond", "uncond"}
    # state is per (layer, branch): 4 distinct states, each called once per step
    states = {(s[0], s[3]): s[4] for s in SEEN}
    assert len(set(states.values())) == 4
    assert max(s[5] for s in SEEN) == 4
    # the pipeline resets stateful hooks at the end: a second generation starts from step 0, fresh state
    SEEN.clear()
    _run(pipe, steps=3)
    assert sorted({s[1] for s in SEEN}) == [0, 1, 2]
    assert max(s[5] for s in SEEN) == 3
    handle.remove()


def test_warmup_steps_and_layers_stay_dense():
    pipe = tiny_wan_pipeline(num_layers=3)
    handle = dit_sparse.apply(pipe, "_spy", 0.5, warmup_steps=0.5, warmup_layers=1)
    SEEN.clear()
    _run(pipe, steps=4)
    assert {s[1] for s in SEEN} == {2, 3}  # first half of the steps dense
    assert {s[0] for s in SEEN} == {1, 2}  # first layer dense
    stats = handle.stats()
    assert stats["sparse_calls"] == 0 and stats["dense_calls"] == 4 * 2 * 3
    handle.remove()


def test_timestep_increase_starts_new_generation_without_pipeline():
    pipe = tiny_wan_pipeline()
    model = pipe.transformer
    handle = dit_sparse.apply(model, "_spy", 0.5, warmup_steps=0, warmup_layers=0)
    x = torch.randn(1, 16, 2, 8, 8)
    e = torch.randn(1, 4, 32)
    SEEN.clear()
    with torch.no_grad():
        for t in (900, 600, 300, 900, 450):
            model(x, torch.tensor([t]), e)
    steps = [s[1] for s in SEEN if s[0] == 0]
    assert steps == [0, 1, 2, 0, 1]
    assert [s[3] for s in SEEN][:1] == ["default"]
    assert handle.tracker.generation == 1
    handle.remove()


def test_unnamed_forwards_of_one_step_get_their_own_branches():
    from dit_sparse.tracking import StepTracker

    tr = StepTracker()
    seen = []
    for t, branch in ((900.0, None), (900.0, None), (800.0, None), (800.0, None), (800.0, None), (700.0, "cond"),
                      (700.0, "uncond"), (600.0, None), (None, None)):
        tr.begin_forward(t, branch, None, None)
        seen.append((tr.step, tr.branch))
    assert seen == [(0, "default"), (0, "default_1"), (1, "default"), (1, "default_1"), (1, "default_2"),
                    (2, "cond"), (2, "uncond"), (3, "default"), (3, "default")]
