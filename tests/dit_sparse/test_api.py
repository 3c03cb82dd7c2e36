import pytest
import torch
from dit_sparse.pipelines.adapters import UnsupportedModelError
from dit_sparse.pipelines.tiny_models import tiny_wan_transformer

import dit_sparse
from dit_sparse.config import ConfigError


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, 16, 3, 10, 14, generator=g), torch.tensor([700, 700]), torch.randn(2, 7, 32, generator=g)


@torch.no_grad()
def test_sparsity_zero_is_bitwise_dense_and_remove_restores_originals():
    model = tiny_wan_transformer(num_layers=3)
    x, t, e = _inputs()
    ref = model(x, t, e, return_dict=False)[0]
    originals = [b.attn1.processor for b in model.blocks]
    for method in ("dense", "full"):
        handle = dit_sparse.apply(model, method, 0.0)
        assert all(b.attn1.processor is not o for b, o in zip(model.blocks, originals))
        assert torch.equal(model(x, t, e, return_dict=False)[0], ref)
        dit_sparse.remove(model)
        assert not handle.active
        assert all(b.attn1.processor is o for b, o in zip(model.blocks, originals))
        assert torch.equal(model(x, t, e, return_dict=False)[0], ref)
    assert not hasattr(model, "_dit_sparse_handle")
    assert model._diffusers_hook.get_hook("dit_sparse_step_tracker") is None


@torch.no_grad()
def test_full_plan_through_executor_matches_dense_and_context_manager_removes():
    model = tiny_wan_transformer()
    x, t, e = _inputs(1)
    ref = model(x, t, e, return_dict=False)[0]
    with dit_sparse.sparse_attention(model, "full", 0.5, warmup_steps=0, warmup_layers=0) as handle:
        out = model(x, t, e, return_dict=False)[0]
        assert handle.stats()["sparse_calls"] == 2
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
    assert not handle.active
    assert torch.equal(model(x, t, e, return_dict=False)[0], ref)


def test_bad_inputs_raise_clear_errors():
    model = tiny_wan_transformer()
    with pytest.raises(ConfigError, match=r"\[0, 1\)"):
        dit_sparse.apply(model, "full", 1.0)
    with pytest.raises(ConfigError, match="unknown method 'nope'; available"):
        dit_sparse.apply(model, "nope", 0.5)
    with pytest.raises(ConfigError, match="unknown option"):
        dit_sparse.apply(model, "full", 0.5, colour="red")
    with pytest.raises(UnsupportedModelError, match="WanTransformer3DModel"):
        dit_sparse.apply(torch.nn.Linear(2, 2), "full", 0.5)
    with pytest.raises(ConfigError, match="pipeline"):
        dit_sparse.apply(object(), "full", 0.5)
    # A misspelt backend is refused by apply itself, not at the first attention call of a generation.
    originals = [b.attn1.processor for b in model.blocks]
    with pytest.raises(ValueError, match="unknown backend 'nope'"):
        dit_sparse.apply(model, "full", 0.5, backend="nope")
    assert [b.attn1.processor for b in model.blocks] == originals
    assert not hasattr(model, "_dit_sparse_handle")
    handle = dit_sparse.apply(model, "full", 0.5)
    with pytest.raises(ConfigError, match="already applied"):
        dit_sparse.apply(model, "full", 0.5)
    handle.remove()
    handle.remove()  # idempotent
    dit_sparse.remove(model)  # nothing applied: no-op


def test_apply_accepts_pipeline():
    from dit_sparse.pipelines.tiny_models import tiny_wan_pipeline

    pipe = tiny_wan_pipeline()
    handle = dit_sparse.apply(pipe, "full", 0.5)
    assert handle.transformer is pipe.transformer
    dit_sparse.remove(pipe)
    assert not handle.active
