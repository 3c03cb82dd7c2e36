"""`dit_sparse.graphs` on the CPU: results rebuilt from a graph's flat outputs, and CPU inputs that run the
planning function directly (the capture itself is tested on the GPU: tests/kernels/test_gpu_backends.py)."""

import pytest
import torch

from dit_sparse import graphs
from dit_sparse.plan import BlockPlan


def _plan() -> BlockPlan:
    g = torch.Generator().manual_seed(0)
    mask = torch.rand(2, 3, 4, 4, generator=g) < 0.5
    perm = torch.stack([torch.randperm(50, generator=g) for _ in range(6)]).view(2, 3, 50)
    return BlockPlan.from_block_mask(mask, 16, 50, q_perm=perm, k_perm=None)


def test_results_are_rebuilt_from_flat_tensors() -> None:
    plan = graphs._with_pair_counts(_plan())  # the statistics' pair counts travel with the plan
    extra = torch.randn(2, 3)
    tensors: list[torch.Tensor] = []
    spec = graphs._flatten((plan, extra, None), tensors)
    assert all(isinstance(t, torch.Tensor) for t in tensors) and len(tensors) == 7  # 5 plan, counts, extra
    rebuilt, rebuilt_extra, none = graphs._build(spec, [t.clone() for t in tensors])
    assert none is None and torch.equal(rebuilt_extra, extra)
    assert rebuilt.block_size == plan.block_size and rebuilt.seq_lens == plan.seq_lens and rebuilt.k_perm is None
    for f in ("q_offsets", "k_offsets", "kv_indices", "kv_counts", "q_perm"):
        assert torch.equal(getattr(rebuilt, f), getattr(plan, f))
    assert torch.equal(rebuilt.derived["pair_counts"], plan._pair_counts())
    with pytest.raises(TypeError, match="may return tensors"):
        graphs._flatten({"a": extra}, [])


def test_cpu_inputs_run_the_function_itself() -> None:
    pg = graphs.PlanGraphs()
    calls = []

    def fn(x):
        calls.append(1)
        return x * 2

    x = torch.randn(4)
    for _ in range(3):
        assert torch.equal(pg.run("double", fn, (x,)), x * 2)
    assert len(calls) == 3 and pg.replays == 0 and not pg._entries


def test_environment_switch(monkeypatch) -> None:
    monkeypatch.setenv("DIT_SPARSE_CUDA_GRAPHS", "0")
    assert not graphs.enabled()
    monkeypatch.setenv("DIT_SPARSE_CUDA_GRAPHS", "1")
    assert graphs.enabled()
