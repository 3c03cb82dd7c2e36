"""After `remove()`, nothing of a sparse run stays alive: no module-level cache keeps the method, its state
or any tensor it built (tilings, plans, centroids, skip sets, CUDA-graph buffers would all be held there)."""

import gc
import weakref

import pytest
import torch
from dit_sparse.pipelines.tiny_models import tiny_wan_transformer

import dit_sparse


def _tensors(obj, seen=None, depth=0):
    """Every tensor reachable from obj through dicts, lists, tuples, sets and object attributes."""
    seen = set() if seen is None else seen
    if id(obj) in seen or depth > 8:
        return
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        yield obj
        if obj._base is not None:  # a view: what must be freed is the tensor that owns the memory
            yield obj._base
        return
    if isinstance(obj, dict):
        items = list(obj.keys()) + list(obj.values())
    elif isinstance(obj, (list, tuple, set, frozenset)):
        items = list(obj)
    elif hasattr(obj, "__dict__") and not isinstance(obj, (type, torch.nn.Module)):
        items = list(vars(obj).values())
    else:
        return
    for item in items:
        yield from _tensors(item, seen, depth + 1)


@pytest.mark.parametrize("name,opts", [("window3d", {}), ("window3d", {"tile": (1, 2, 2)}), ("semantic", {}),
                                       ("pooled", {}), ("window3d+skip", {})])
@torch.no_grad()
def test_remove_leaves_nothing_of_the_run_alive(name, opts):
    model = tiny_wan_transformer(num_layers=2, heads=2, head_dim=64)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 16, 3, 16, 16, generator=g)
    text = torch.randn(1, 7, 32, generator=g)
    handle = dit_sparse.apply(model, name, 0.75, warmup_steps=0, warmup_layers=0, num_steps=3, **opts)
    for t in (900.0, 600.0, 300.0):
        model(hidden_states=x, encoder_hidden_states=text, timestep=torch.tensor([t]), return_dict=False)
    assert handle.stats()["sparse_calls"] > 0
    expert = handle.experts["transformer"]
    built = list(_tensors(expert.core.method)) + list(_tensors(expert.core.tracker.states))
    assert built, "the run kept no state to check"
    refs = [weakref.ref(t) for t in built] + [weakref.ref(expert.core), weakref.ref(expert.core.method)]
    del built, expert
    handle.remove()
    del handle
    gc.collect()
    alive = [r for r in refs if r() is not None]
    assert not alive, f"{len(alive)} of {len(refs)} objects of the run are still referenced after remove()"
