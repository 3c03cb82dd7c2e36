"""`WarnOnce`: a `UserWarning` issued the first time each distinct message comes up, not on every call."""

from __future__ import annotations

import warnings


class WarnOnce:
    """Warns `prefix + message` once per distinct `message`; one instance per owner (a core, a method,
    a module), which keeps its own record of what it has said.

    Call the instance where a helper function would call `warnings.warn`, with the `stacklevel` that
    call would take: 1 is the instance's own call, 2 the code that calls the instance, 3 its caller...
    """

    def __init__(self, prefix: str = "", stacklevel: int = 2) -> None:
        self.prefix = prefix
        self.stacklevel = stacklevel
        self.seen: set[str] = set()

    def __call__(self, message: str) -> None:
        if message not in self.seen:
            self.seen.add(message)
            warnings.warn(f"{self.prefix}{message}", stacklevel=self.stacklevel)
