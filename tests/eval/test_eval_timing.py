"""Timers: accumulation by name with an injected clock (no real timing in tests), CUDA path only on GPU."""

from __future__ import annotations

import pytest
import torch
from dit_sparse.eval.timing import AttentionTimer, Stopwatch, active_attention_timer, attention_section


class FakeClock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t

    def advance(self, dt: float) -> None:
        self.t += dt


def test_attention_timer_accumulates_by_name():
    clock = FakeClock()
    timer = AttentionTimer(device="cpu", clock=clock)
    for dt in (0.5, 0.25):
        with timer.section("attn1"):
            clock.advance(dt)
        clock.advance(10.0)  # outside any section: not counted
    with timer("attn2"):  # the callable form the sparse-attention core uses
        clock.advance(2.0)
    assert timer.totals_s() == pytest.approx({"attn1": 0.75, "attn2": 2.0})
    assert timer.counts() == {"attn1": 2, "attn2": 1}
    assert timer.total_s() == pytest.approx(2.75)
    assert timer.total_s("attn1") == pytest.approx(0.75)
    assert timer.total_s("missing") == 0.0
    timer.reset()
    assert timer.totals_s() == {} and timer.counts() == {}


def test_attention_timer_records_when_block_raises():
    clock = FakeClock()
    timer = AttentionTimer(device="cpu", clock=clock)
    with pytest.raises(RuntimeError), timer.section("attn"):
        clock.advance(1.5)
        raise RuntimeError("boom")
    assert timer.totals_s() == pytest.approx({"attn": 1.5})


def test_attention_section_uses_innermost_active_timer():
    clock = FakeClock()
    with attention_section("x"):  # no active timer: a no-op
        clock.advance(1.0)
    assert active_attention_timer() is None
    outer = AttentionTimer(device="cpu", clock=clock)
    inner = AttentionTimer(device="cpu", clock=clock)
    with outer:
        with attention_section("a"):
            clock.advance(1.0)
        with inner:
            assert active_attention_timer() is inner
            with attention_section("a"):
                clock.advance(3.0)
        assert active_attention_timer() is outer
    assert active_attention_timer() is None
    assert outer.totals_s() == pytest.approx({"a": 1.0})
    assert inner.totals_s() == pytest.approx({"a": 3.0})


def test_stopwatch_cpu():
    clock = FakeClock()
    with Stopwatch("cpu", clock=clock) as sw:
        clock.advance(0.125)
    clock.advance(5.0)
    assert sw.elapsed_s == pytest.approx(0.125)
    with pytest.raises(RuntimeError, match="never started"):
        _ = Stopwatch("cpu").elapsed_s


def test_cpu_timer_never_touches_cuda(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("CUDA used on the CPU path")

    monkeypatch.setattr(torch.cuda, "synchronize", boom)
    monkeypatch.setattr(torch.cuda, "Event", boom)
    timer = AttentionTimer(device="cpu")
    with timer.section("a"):
        pass
    assert timer.counts() == {"a": 1} and timer.totals_s()["a"] >= 0
    with Stopwatch() as sw:
        pass
    assert sw.elapsed_s >= 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_timer_uses_events():
    x = torch.randn(2048, 2048, device="cuda")
    timer = AttentionTimer(device="cuda")
    with Stopwatch("cuda") as sw:
        for _ in range(3):
            with timer.section("mm"):
                x = (x @ x).tanh_()
    tot = timer.totals_s()
    assert timer.counts() == {"mm": 3} and 0 < tot["mm"] <= sw.elapsed_s + 1e-3
