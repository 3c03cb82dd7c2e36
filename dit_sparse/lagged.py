"""A device boolean the host reads a little later, without waiting for the GPU.

The hot path may not synchronise (`docs/architecture.md`), yet some decisions only need to know what an
earlier call found, e.g. whether the skip cache holds anything. `LaggedFlag.set` starts a non-blocking
copy of a one-element device tensor into pinned host memory and records a CUDA event; `peek` returns the
value once that event has completed and None before, so a caller decides conservatively until it knows.
On the CPU the value is read at once (there is nothing to wait for).
"""

from __future__ import annotations

import torch


class LaggedFlag:
    """One boolean computed on the device, readable on the host without a sync once it is ready."""

    def __init__(self) -> None:
        self._host: torch.Tensor | None = None  # pinned bool [1], reused
        self._event: torch.cuda.Event | None = None
        self._value: bool | None = None

    def set(self, flag: torch.Tensor) -> None:
        """Start reading `flag` (a one-element bool tensor) back to the host; forgets the previous value."""
        flag = flag.reshape(1)
        if not flag.is_cuda:
            self._value, self._event = bool(flag.item()), None  # CPU tensor: no device to wait for
            return
        if torch.cuda.is_current_stream_capturing():  # an event query would break a user's graph capture
            self.clear()
            return
        if self._host is None:
            self._host = torch.empty(1, dtype=torch.bool, pin_memory=True)
        with torch.cuda.device(flag.device):  # copy and event on the flag's device's current stream
            self._host.copy_(flag, non_blocking=True)
            self._event = torch.cuda.Event()
            self._event.record()
        self._value = None

    def peek(self) -> bool | None:
        """The last value set, or None while its copy is still in flight (or nothing was set)."""
        if self._value is None and self._event is not None and self._event.query():
            assert self._host is not None
            self._value, self._event = bool(self._host[0]), None  # pinned memory, already written
        return self._value

    def clear(self) -> None:
        """Forget the value (peek returns None until the next `set`)."""
        self._value = self._event = None
