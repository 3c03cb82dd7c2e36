"""The whole Wan transformer run in window3d's tile order (`pipelines.reorder`) instead of permuting q, k, v
and the output in every attention call: same outputs, plans without permutations, nothing left behind
by `remove`, and no reordering where it is not asked for (dense, methods without one order, other
families). Tiny random Wan models on the CPU, float32.
"""

from __future__ import annotations

import pytest
import torch
from diffusers import WanTransformer3DModel
from diffusers.hooks import HookRegistry
from dit_sparse.pipelines.reorder import HOOK_NAME

import dit_sparse
from dit_sparse.methods.window3d.method import Window3DState

TINY = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4,
            text_dim=16, freq_dim=32, ffn_dim=32, num_layers=3, rope_max_seq_len=64)


def _model(seed: int = 0) -> WanTransformer3DModel:
    torch.manual_seed(seed)
    return WanTransformer3DModel(**TINY).eval()


def _inputs(seed: int, batch: int = 2, frames: int = 5, height: int = 18, width: int = 14) -> dict:
    g = torch.Generator().manual_seed(seed)
    return dict(hidden_states=torch.randn(batch, 4, frames, height, width, generator=g),
                encoder_hidden_states=torch.randn(batch, 7, 16, generator=g))


def _run(model, inputs: dict, timesteps, method: str = "window3d", sparsity: float = 0.7, reorder: bool = True,
         **opts):
    handle = dit_sparse.apply(model, method, sparsity, warmup_steps=1, warmup_layers=1, reorder_tokens=reorder,
                              **opts)
    outs, plans = [], []
    with torch.no_grad():
        for t in timesteps:
            outs.append(model(**inputs, timestep=t, return_dict=False)[0])
            plans += [st.plan for st in _window3d_states(handle) if st.plan is not None]
    handle.remove()
    return outs, plans


def _window3d_states(handle) -> list[Window3DState]:
    """window3d's state of every (layer, branch) of the handle's run."""
    return [st for _, states in handle.tracker.states.items() for st in states if isinstance(st, Window3DState)]


def _steps(batch: int = 2):
    return [torch.full((batch,), t) for t in (900.0, 800.0, 700.0)]


@pytest.mark.parametrize("method,opts", [
    ("window3d", dict(tile=(1, 4, 4), classify_every=1)),  # online per-head choice among candidates
    ("window3d", dict(pattern="spatial", tile=(1, 4, 4), block=32)),  # fixed blocks over the tile order
    ("window3d+skip", dict(tile=(1, 4, 4), pattern="window")),
])
def test_reordered_model_matches_per_call_permutations(method, opts):
    model, inputs = _model(), _inputs(1, height=26, width=22)  # grid 5 x 13 x 11: ragged edge tiles
    ours, plans = _run(model, inputs, _steps(), method, 0.6, reorder=True, **opts)
    ref, ref_plans = _run(model, inputs, _steps(), method, 0.6, reorder=False, **opts)
    assert plans and all(p.q_perm is None and p.k_perm is None for p in plans)
    assert ref_plans and all(p.q_perm is not None for p in ref_plans)
    for a, b in zip(ours, ref):
        # Only the dense warm-up step's key order differs (a softmax summed in another order).
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert not torch.equal(ours[-1], _dense(model, inputs, _steps()[-1]))  # sparse steps did run sparse


def _dense(model, inputs: dict, t) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs, timestep=t, return_dict=False)[0]


def test_classification_on_reordered_tokens_picks_the_same_heads():
    model, inputs = _model(3), _inputs(4, batch=1, frames=6, height=32, width=32)
    chosen = {}
    for reorder in (True, False):
        handle = dit_sparse.apply(model, "window3d", 0.6, warmup_steps=0, warmup_layers=0, tile=(1, 4, 4),
                                  reorder_tokens=reorder)
        with torch.no_grad():
            model(**inputs, timestep=torch.tensor([900.0]), return_dict=False)
        chosen[reorder] = [st.classified[2][1] for st in _window3d_states(handle)]
        cands = [st.classified[2][0] for st in _window3d_states(handle)]
        handle.remove()
    assert len(cands[0]) >= 2  # a real choice between candidates was made
    assert all(torch.equal(a, b) for a, b in zip(chosen[True], chosen[False]))


def test_per_token_timesteps_follow_the_tokens():
    """Wan 2.2 TI2V: one timestep per token ([B, S]); the per-token modulation must move with its token."""
    model, inputs = _model(5), _inputs(6)
    S = 5 * 9 * 7
    g = torch.Generator().manual_seed(7)
    base = torch.rand(2, S, generator=g) * 100
    steps = [base + t for t in (900.0, 800.0, 700.0)]
    ours, plans = _run(model, inputs, steps, pattern="window", tile=(1, 4, 4))
    ref, _ = _run(model, inputs, steps, pattern="window", tile=(1, 4, 4), reorder=False)
    assert plans and plans[0].q_perm is None
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_no_reordering_when_dense_or_without_one_order():
    model, inputs = _model(), _inputs(2)
    t = torch.full((2,), 900.0)
    dense = _dense(model, inputs, t)
    handle = dit_sparse.apply(model, "window3d", 0.0)
    assert torch.equal(_dense(model, inputs, t), dense)  # sparsity 0: bitwise Diffusers
    handle.remove()
    _, plans = _run(model, inputs, _steps(), "semantic", 0.7)  # one order per head and call: none for the model
    assert plans == [] or all(p.q_perm is not None for p in plans)
    handle = dit_sparse.apply(model, "semantic", 0.7)
    seen = []
    orig = handle.core.attend

    def spy(*args, **kwargs):
        seen.append(handle.tracker.token_order)
        return orig(*args, **kwargs)

    handle.core.attend = spy
    with torch.no_grad():
        model(**inputs, timestep=t, return_dict=False)
    # A method without one order for the model gets no reorder hooks at all (nothing to check per forward).
    assert not any(getattr(m, "_diffusers_hook", None) is not None and m._diffusers_hook.get_hook(HOOK_NAME)
                   for m in model.modules())
    handle.remove()
    assert seen and all(o is None for o in seen)
    for spec, hooked in (("window3d", True), ("semantic+skip", False), ("window3d+skip", True)):
        handle = dit_sparse.apply(model, spec, 0.7)
        expert = next(iter(handle.experts.values()))
        assert (expert.remove_reorder is not None) == hooked, spec
        handle.remove()


def test_remove_takes_the_hooks_away():
    model, inputs = _model(), _inputs(3)
    t = torch.full((2,), 900.0)
    dense = _dense(model, inputs, t)
    handle = dit_sparse.apply(model, "window3d", 0.7, warmup_steps=0, warmup_layers=0, tile=(1, 4, 4))
    hooked = [name for name, m in model.named_modules()
              if getattr(m, "_diffusers_hook", None) is not None and m._diffusers_hook.get_hook(HOOK_NAME)]
    assert sorted(hooked) == ["condition_embedder", "patch_embedding", "proj_out", "rope"]
    _dense(model, inputs, t)
    assert handle.tracker.token_order is None  # cleared after the forward: standalone submodule calls unaffected
    handle.remove()
    for _, m in model.named_modules():
        registry = getattr(m, "_diffusers_hook", None)
        assert registry is None or registry.get_hook(HOOK_NAME) is None
    assert torch.equal(_dense(model, inputs, t), dense)
    registry = HookRegistry.check_if_exists_or_initialize(model.rope)
    assert registry.get_hook(HOOK_NAME) is None
