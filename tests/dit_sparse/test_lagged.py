"""`LaggedFlag`: a device boolean read on the host later without a synchronisation."""

import pytest
import torch

from dit_sparse.lagged import LaggedFlag


def test_cpu_values_are_known_at_once_and_cleared():
    flag = LaggedFlag()
    assert flag.peek() is None
    flag.set(torch.tensor(True))
    assert flag.peek() is True
    flag.set(torch.tensor([False]))
    assert flag.peek() is False
    flag.clear()
    assert flag.peek() is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_value_arrives_without_a_sync():
    flag = LaggedFlag()
    x = torch.randn(4096, 4096, device="cuda")
    torch.cuda.set_sync_debug_mode("error")
    try:
        for want in (True, False, True):
            y = x @ x  # keep the stream busy so the copy is still in flight at first
            flag.set((y.sum() > -1e30) if want else (y.sum() < -1e30))
            first = flag.peek()
            assert first in (None, want)
            while flag.peek() is None:  # query only: no synchronisation
                pass
            assert flag.peek() is want
    finally:
        torch.cuda.set_sync_debug_mode(0)
