"""Backend selection by name: `check_backend` refuses unknown names and device/dtype mismatches early."""

import pytest
import torch
from dit_sparse.kernels import available_backends, check_backend, dispatch
from dit_sparse.kernels.dispatch import Backend


def _cuda_bf16_only(device: torch.device, dtype: torch.dtype | None) -> str | None:
    if device.type != "cuda":
        return "needs CUDA"
    if dtype is not None and dtype != torch.bfloat16:
        return "needs bfloat16"
    return None


@pytest.fixture
def fake_backend(monkeypatch):
    """A registered backend that only runs on CUDA in bfloat16 (removed again after the test)."""
    backend = Backend(name="fake", run=lambda *a, **k: None, supports=lambda q, plan: None,
                      supports_setting=_cuda_bf16_only)
    monkeypatch.setitem(dispatch._BACKENDS, "fake", backend)
    return backend


def test_auto_and_reference_run_anywhere():
    for name in ("auto", "reference"):
        assert check_backend(name, "cpu", torch.float32) == name


def test_unknown_backend_lists_the_choices():
    with pytest.raises(ValueError, match="unknown backend 'nope'") as exc:
        check_backend("nope")
    for name in ("auto", *available_backends()):
        assert repr(name) in str(exc.value)


def test_device_and_dtype_are_checked_only_when_given(fake_backend):
    assert check_backend("fake") == "fake"  # name only: the device is not known yet
    with pytest.raises(ValueError, match=r"backend 'fake' cannot run on cpu: needs CUDA; use backend 'auto'"):
        check_backend("fake", torch.device("cpu"))
    with pytest.raises(ValueError, match="cannot run on cuda in float32: needs bfloat16"):
        check_backend("fake", "cuda", torch.float32)
    assert check_backend("fake", "cuda", torch.bfloat16) == "fake"
    assert check_backend("fake", "cuda") == "fake"  # dtype not known yet ("auto")


def test_backend_without_a_setting_check_is_accepted_by_name(monkeypatch):
    monkeypatch.setitem(dispatch._BACKENDS, "plain", Backend("plain", lambda *a, **k: None, lambda q, p: None))
    assert check_backend("plain", "cpu", torch.float32) == "plain"


def test_triton_setting_check_is_the_one_its_tensor_check_uses(monkeypatch):
    tb = pytest.importorskip("dit_sparse.kernels.triton_backend")
    from dit_sparse.plan import BlockPlan

    monkeypatch.setattr(tb, "INTERPRET", False)  # TRITON_INTERPRET=1 would let it run on CPU
    q = torch.zeros(1, 2, 32, 64)
    reason = tb.supports_setting(torch.device("cpu"), torch.float32)
    assert reason is not None and "CUDA" in reason
    assert tb.supports(q, BlockPlan.dense(1, 2, 32, 16)) == reason
    assert "float32" in tb.supports_setting(torch.device("cuda"), torch.float32)
    assert tb.supports_setting(torch.device("cuda"), torch.bfloat16) is None
    with pytest.raises(ValueError, match="backend 'triton' cannot run on cpu"):
        check_backend("triton", "cpu")
