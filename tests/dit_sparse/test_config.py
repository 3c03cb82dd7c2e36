import pytest

from dit_sparse.config import ConfigError, SparseConfig, WarmupConfig, check_sparsity


@pytest.mark.parametrize("bad", [-0.1, 1.0, 1.5, float("nan"), "x", None])
def test_sparsity_outside_range_is_rejected(bad):
    with pytest.raises(ConfigError, match=r"\[0, 1\)"):
        check_sparsity(bad)


def test_sparsity_zero_means_dense():
    assert SparseConfig(method="semantic", sparsity=0.0).is_dense
    assert not SparseConfig(method="full", sparsity=0.5).is_dense


def test_warmup_schedule():
    w = WarmupConfig(steps=0.2, layers=2)
    assert w.dense_steps(50) == 10
    assert w.is_dense(step=9, num_steps=50, layer=5)
    assert not w.is_dense(step=10, num_steps=50, layer=5)
    assert w.is_dense(step=30, num_steps=50, layer=1)
    assert WarmupConfig(steps=3).dense_steps(None) == 3
    assert WarmupConfig(steps=0.3).dense_steps(None) == 0
    with pytest.raises(ConfigError):
        WarmupConfig(steps=-1)
    with pytest.raises(ConfigError):
        WarmupConfig(layers=-1)
