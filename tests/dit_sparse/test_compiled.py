"""torch.compile of a model with dit-sparse applied (CPU, `aot_eager`): the sparse call is one custom op,
so Diffusers' regional compile with fullgraph=True compiles one block for every layer and matches eager."""

import pytest
import torch
from dit_sparse.pipelines.tiny_models import tiny_wan_transformer

import dit_sparse


def _inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 16, 3, 16, 16, generator=g)  # 3 x 8 x 8 = 192 tokens after the 1x2x2 patch
    text = torch.randn(1, 7, 32, generator=g)
    return x, text


@torch.no_grad()
def _generate(model, steps: int = 4) -> list[torch.Tensor]:
    x, text = _inputs()
    outs = []
    for t in torch.linspace(900, 100, steps):
        outs.append(model(hidden_states=x, encoder_hidden_states=text, timestep=t.reshape(1), return_dict=False)[0])
    return outs


class _CountingBackend:
    """A torch.compile backend that counts the graphs it is given and runs them with aot_eager."""

    def __init__(self) -> None:
        self.graphs = 0

    def __call__(self, gm, example_inputs):
        from torch._dynamo.backends.common import aot_autograd  # noqa: F401
        from torch._dynamo.backends.debugging import aot_eager

        self.graphs += 1
        return aot_eager(gm, example_inputs)


@pytest.mark.parametrize("method,opts", [("window3d", {}), ("pooled", {}), ("semantic", {})])
def test_regional_compile_fullgraph_matches_eager_with_one_graph_for_all_layers(method, opts):
    torch._dynamo.reset()
    model = tiny_wan_transformer(num_layers=3, heads=2, head_dim=64)
    handle = dit_sparse.apply(model, method, 0.75, warmup_steps=1, warmup_layers=0, num_steps=4, **opts)
    eager = _generate(model)
    stats_eager = handle.stats()
    dit_sparse.remove(model)

    handle = dit_sparse.apply(model, method, 0.75, warmup_steps=1, warmup_layers=0, num_steps=4, **opts)
    backend = _CountingBackend()
    model.compile_repeated_blocks(fullgraph=True, backend=backend)
    compiled = _generate(model)
    assert backend.graphs == 1  # one block graph serves every layer and every step (dense warm-up included)
    for a, b in zip(eager, compiled):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)
    stats = handle.stats()
    assert stats["sparse_calls"] == stats_eager["sparse_calls"] > 0
    assert stats["sparsity_in_sparse_calls"] == pytest.approx(stats_eager["sparsity_in_sparse_calls"])


def test_whole_model_compile_and_sparsity_zero() -> None:
    torch._dynamo.reset()
    model = tiny_wan_transformer(num_layers=2, heads=2, head_dim=64)
    plain = _generate(model, steps=2)
    dit_sparse.apply(model, "window3d", 0.0)
    compiled_model = torch.compile(model, backend="aot_eager")
    for a, b in zip(plain, _generate(compiled_model, steps=2)):  # sparsity 0: Diffusers' own attention
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)
    dit_sparse.remove(model)
    torch._dynamo.reset()
    dit_sparse.apply(model, "window3d", 0.75, warmup_steps=0, warmup_layers=0, num_steps=2)
    eager = _generate(model, steps=2)
    compiled_model = torch.compile(model, backend="aot_eager")
    for a, b in zip(eager, _generate(compiled_model, steps=2)):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)


def test_the_op_reports_a_removed_core() -> None:
    from dit_sparse.compiled import attend

    q = torch.randn(1, 8, 2, 16)
    with pytest.raises(RuntimeError, match="compile the model again"):
        attend(q, q, q, torch.tensor(0), 12345, None, -1, "")
