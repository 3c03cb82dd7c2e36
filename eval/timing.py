"""Timers: a wall/CUDA-event stopwatch and `AttentionTimer`, which adds up time spent inside attention
calls by name.

On CUDA, kernels run asynchronously, so a host clock around a call measures only the launch. Both timers
therefore record CUDA events on the current stream and read them after one synchronisation when the result
is asked for; on CPU they use ``time.perf_counter`` and never touch CUDA.

Usage with the sparse-attention core (which calls ``timer("attention")`` around every attention call)::

    timer = AttentionTimer(device="cuda")
    core.timer = timer.section
    with Stopwatch("cuda") as total:
        pipe(...)
    timer.totals_s()      # {"attention": seconds}
    total.elapsed_s
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch

__all__ = ["Stopwatch", "AttentionTimer", "attention_section", "active_attention_timer"]


def _is_cuda(device: str | torch.device | None) -> bool:
    return device is not None and torch.device(device).type == "cuda"


class Stopwatch:
    """Context manager timing its block: wall clock on CPU, CUDA events (one sync when read) on CUDA.

    >>> with Stopwatch() as sw:
    ...     work()
    >>> sw.elapsed_s
    """

    def __init__(
        self, device: str | torch.device | None = None, clock: Callable[[], float] = time.perf_counter
    ):
        self.cuda = _is_cuda(device)
        self._clock = clock
        self._events: tuple[Any, Any] | None = None
        self._t: tuple[float, float] | None = None
        self._elapsed: float | None = None

    def __enter__(self) -> Stopwatch:
        self._elapsed = None
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            self._events = (start, end)
        else:
            self._t = (self._clock(), 0.0)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.cuda:
            assert self._events is not None
            self._events[1].record()
        else:
            assert self._t is not None
            self._t = (self._t[0], self._clock())

    @property
    def elapsed_s(self) -> float:
        """Seconds between entering and leaving the block (synchronises the end event on CUDA)."""
        if self._elapsed is None:
            if self.cuda:
                if self._events is None:
                    raise RuntimeError("Stopwatch was never started: use it as `with Stopwatch(...) as sw:`")
                self._events[1].synchronize()
                self._elapsed = self._events[0].elapsed_time(self._events[1]) / 1000.0
            else:
                if self._t is None:
                    raise RuntimeError("Stopwatch was never started: use it as `with Stopwatch(...) as sw:`")
                self._elapsed = self._t[1] - self._t[0]
        return self._elapsed


class AttentionTimer:
    """Accumulates time spent inside named sections (attention calls), per name.

    ``section(name)`` is a context manager; the sparse-attention core accepts ``timer.section`` as its
    ``timer`` hook. Code that has no handle on the timer can use the module-level `attention_section`,
    which records into the timer of the innermost ``with AttentionTimer(...):`` block (no-op otherwise).

    On CUDA each section records two events on the current stream (no synchronisation on the hot path)
    and they are resolved with one synchronisation when totals are read. The measured time is the GPU
    time between the events, i.e. the kernels of the section when the GPU is busy. On CPU it is wall time.
    """

    _local = threading.local()

    def __init__(
        self,
        device: str | torch.device | None = None,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        # device None: CUDA events when this process already uses CUDA, wall clock otherwise.
        if device is None:
            device = "cuda" if torch.cuda.is_available() and torch.cuda.is_initialized() else "cpu"
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self._clock = clock
        self._seconds: dict[str, float] = {}
        self._counts: dict[str, int] = {}
        self._pending: list[tuple[str, Any, Any]] = []

    # -- recording -------------------------------------------------------------------------------
    @contextlib.contextmanager
    def section(self, name: str) -> Iterator[None]:
        """Time the block under ``name`` (also when it raises)."""
        self._counts[name] = self._counts.get(name, 0) + 1
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            try:
                yield
            finally:
                end.record()
                self._pending.append((name, start, end))
        else:
            t0 = self._clock()
            try:
                yield
            finally:
                self._seconds[name] = self._seconds.get(name, 0.0) + (self._clock() - t0)

    __call__ = section

    def __enter__(self) -> AttentionTimer:
        stack = getattr(self._local, "stack", None)
        if stack is None:
            stack = self._local.stack = []
        stack.append(self)
        return self

    def __exit__(self, *exc: object) -> None:
        self._local.stack.remove(self)

    # -- reading ---------------------------------------------------------------------------------
    def _resolve(self) -> None:
        if not self._pending:
            return
        torch.cuda.synchronize(self.device)  # one sync for all pending sections, whichever stream
        for name, start, end in self._pending:
            self._seconds[name] = self._seconds.get(name, 0.0) + start.elapsed_time(end) / 1000.0
        self._pending.clear()

    def totals_s(self) -> dict[str, float]:
        """Seconds per section name (synchronises once on CUDA)."""
        self._resolve()
        return dict(self._seconds)

    def counts(self) -> dict[str, int]:
        """Number of times each section was entered."""
        return dict(self._counts)

    def total_s(self, name: str | None = None) -> float:
        """Seconds in section ``name``, or in all sections when None (nested sections count twice)."""
        tot = self.totals_s()
        return tot.get(name, 0.0) if name is not None else sum(tot.values())

    def reset(self) -> None:
        """Forget everything recorded so far."""
        self._seconds.clear()
        self._counts.clear()
        self._pending.clear()


def active_attention_timer() -> AttentionTimer | None:
    """The innermost `AttentionTimer` entered with ``with`` on this thread, or None."""
    stack = getattr(AttentionTimer._local, "stack", None)
    return stack[-1] if stack else None


def attention_section(name: str = "attention") -> contextlib.AbstractContextManager[None]:
    """Time the block into the active `AttentionTimer` under ``name``; a no-op when none is active."""
    timer = active_attention_timer()
    return timer.section(name) if timer is not None else contextlib.nullcontext()
