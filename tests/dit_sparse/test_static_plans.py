"""Plans are static data and the steady-state sparse call never reads a device value on the host.

On the CPU nothing synchronises, but the same code on a GPU would: these tests forbid every way a tensor's
value reaches Python (`item`, `int()`, `float()`, `bool()`, `tolist`, `cpu`, `numpy`) during warm sparse
calls through the real attention core, for every method. The GPU twin (tests/kernels/test_gpu_backends.py)
runs under `torch.cuda.set_sync_debug_mode("error")`.
"""

import contextlib

import pytest
import torch

from dit_sparse.config import SparseConfig, WarmupConfig
from dit_sparse.core import SparseAttentionCore
from dit_sparse.layout import VideoLayout
from dit_sparse.methods import build_method, split_method_options
from dit_sparse.plan import BlockPlan
from dit_sparse.stats import SparsityStats
from dit_sparse.tracking import StepTracker

_READS = ("item", "tolist", "cpu", "numpy", "__int__", "__float__", "__bool__", "__index__")
_SAVED = {n: getattr(torch.Tensor, n) for n in _READS}


def _restore():
    for n, fn in _SAVED.items():
        setattr(torch.Tensor, n, fn)


@contextlib.contextmanager
def no_host_reads():
    """Make every tensor -> Python value conversion raise (what would be a host sync on a GPU)."""
    def forbid(name):
        def f(self, *a, **k):
            raise AssertionError(f"host read of a tensor value: Tensor.{name}")
        return f

    for n in _READS:
        setattr(torch.Tensor, n, forbid(n))
    try:
        yield
    finally:
        _restore()


def _allow_reads_in(monkeypatch, owner, name):
    """Allow value reads inside `owner.name` (forbidden again after it returns)."""
    real = getattr(owner, name)

    def allowed(*args, **kwargs):
        forbidden = {n: getattr(torch.Tensor, n) for n in _READS}
        _restore()
        try:
            return real(*args, **kwargs)
        finally:
            for n, fn in forbidden.items():
                setattr(torch.Tensor, n, fn)

    monkeypatch.setattr(owner, name, allowed)


def _executor_allowed(monkeypatch):
    """Reads allowed where they are no GPU sync: the CPU reference executor (the CPU path; GPU kernels are
    checked on a GPU) and `LaggedFlag`, which on a GPU reads pinned memory only after its copy finished
    (`dit_sparse/lagged.py`; on the CPU it reads the value at once)."""
    import dit_sparse.core as core_mod
    from dit_sparse.lagged import LaggedFlag

    _allow_reads_in(monkeypatch, core_mod, "run_backend")
    _allow_reads_in(monkeypatch, LaggedFlag, "set")
    _allow_reads_in(monkeypatch, LaggedFlag, "peek")


def test_from_range_mask_has_static_width_and_python_lengths():
    g = torch.Generator().manual_seed(0)
    mask = torch.rand(2, 3, 5, 7, generator=g) < 0.4
    mask[0, 0, 1] = False  # an empty row
    q_off = torch.tensor([0, 3, 9, 9, 20, 31], dtype=torch.int32).expand(2, 3, -1)
    k_off = torch.tensor([0, 4, 8, 15, 15, 22, 30, 31], dtype=torch.int32).expand(2, 3, -1)
    with no_host_reads():
        plan = BlockPlan.from_range_mask(mask, q_off, k_off, seq_lens=(31, 31))
    assert plan.kv_indices.shape == (2, 3, 5, 7)  # width NK, whatever the counts
    assert plan.seq_len_q == 31 and isinstance(plan.seq_len_q, int)
    assert torch.equal(plan.block_mask(), mask)
    assert int(plan.kv_counts[0, 0, 1]) == 0
    plan.validate()
    # Lengths left out are read from the offsets once, at construction.
    assert BlockPlan.from_range_mask(mask, q_off, k_off).seq_lens == (31, 31)


def test_derived_values_are_cached_per_plan_and_not_copied():
    import dataclasses

    plan = BlockPlan.dense(1, 2, 300, 64)
    a = plan.pair_counts()
    assert plan.pair_counts() is a
    other = dataclasses.replace(plan, q_perm=torch.arange(300).expand(1, 2, 300))
    assert other.derived == {}


def test_statistics_memory_stays_constant():
    stats = SparsityStats()
    plans = [BlockPlan.dense(1, 2, 100, 32), BlockPlan.dense(1, 2, 100, 64)]
    for i in range(1000):
        stats.add_sparse(plans[i % 2])
    assert len(stats._computed) == 1 and stats._computed[torch.device("cpu")].numel() == 1
    assert stats.summary()["sparsity_in_sparse_calls"] == pytest.approx(0.0)
    assert stats.sparse_calls == 1000


LAYOUT = VideoLayout(4, 8, 12, text_tokens=19, text_first=True)


@pytest.mark.parametrize("spec", [
    "full",
    "window3d[pattern=spatial]",
    "window3d[block=64]",
    "window3d",  # online per-head choice, re-classified every 2 steps below
    "semantic",
    "semantic[layout=blocks,block_size=64]",
    "pooled",
    "window3d+skip[pattern=temporal]",
    "window3d+skip[pattern=temporal,update_every=3]",  # learning and reusing calls both
    "semantic+skip",
])
def test_warm_sparse_calls_never_read_device_values(spec, monkeypatch):
    _executor_allowed(monkeypatch)
    name, opts = split_method_options(spec)
    if name == "window3d" and "pattern" not in opts:
        opts["classify_every"] = 2
    method, _ = build_method(name, 0.75, opts)
    tracker = StepTracker(num_steps=1000)
    tracker.layout = LAYOUT
    core = SparseAttentionCore(SparseConfig(name, 0.75, WarmupConfig(0, 0), None), method, tracker, 1)
    B, S, H, D = 2, LAYOUT.seq_len, 2, 32
    g = torch.Generator().manual_seed(1)
    inputs = [[torch.randn(B, S, H, D, generator=g) for _ in range(3)] for _ in range(2)]
    t = [1000.0]

    def call(i):
        t[0] -= 1.0
        tracker.begin_forward(t[0], "cond", None, None)
        q, k, v = inputs[i % 2]
        return core.attend(q, k, v, layer=0, layer_name="blocks.0.attn1", dense_fn=lambda: None, text_first=True)

    for i in range(3):  # first calls of a new shape may read values (tilings, cached pattern indices)
        call(i)
    with no_host_reads():
        outs = [call(i) for i in range(3, 8)]  # several steps: re-planning, re-classification, skip updates
    assert all(o is not None and o.shape == (B, S, H, D) and torch.isfinite(o).all() for o in outs)
    assert core.stats.fallback_calls == 0 and core.stats.sparse_calls == 8
