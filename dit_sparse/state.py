"""Typed method state per (layer, CFG branch), in the manner of Diffusers' hook `StateManager`.

Each method declares what it keeps between the calls of one layer and branch as a `LayerState` subclass
(`SparseMethod.State`): centroids, a reused plan, a skip cache. The `StepTracker` of an `apply()` owns one
`StateStore`, the one place where states are created (on a call's first use) and dropped (a new
generation, or `remove()`, which drops the tracker). Every method of a chain (``"window3d+skip"``) has its
own state object, so a wrapper never shares a dictionary with the method it wraps.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # typing only: the method interface imports this module
    from .method import SparseMethod


class LayerState:
    """What one method keeps for one (layer, CFG branch) across denoising steps.

    Subclasses are dataclasses whose fields all have defaults; `reset()` returns to that fresh state.
    """

    def reset(self) -> None:
        """Forget everything: back to the state a new generation starts with."""
        self.__init__()  # type: ignore[misc]


@dataclass
class NoState(LayerState):
    """State of a method that keeps nothing between calls."""


class LayerStates:
    """The states of every method of a chain for one (layer, CFG branch), each created on first use."""

    def __init__(self) -> None:
        self._by_method: dict[SparseMethod, LayerState] = {}  # methods hash by identity

    def of(self, method: SparseMethod) -> Any:
        """`method`'s state here (a new `method.State()` on first use)."""
        state = self._by_method.get(method)
        if state is None:
            state = self._by_method[method] = method.State()
        return state

    def __iter__(self) -> Iterator[LayerState]:
        return iter(self._by_method.values())

    def reset(self) -> None:
        for state in self:
            state.reset()


class StateStore:
    """Every (layer name, branch)'s `LayerStates` of one `apply()`."""

    def __init__(self) -> None:
        self._states: dict[tuple[str, str], LayerStates] = {}

    def get(self, layer_name: str, branch: str) -> LayerStates:
        """The states of one layer and branch (created empty on first use)."""
        states = self._states.get((layer_name, branch))
        if states is None:
            states = self._states[(layer_name, branch)] = LayerStates()
        return states

    def items(self) -> Iterator[tuple[tuple[str, str], LayerStates]]:
        return iter(self._states.items())

    def __len__(self) -> int:
        return len(self._states)

    def clear(self) -> None:
        """Drop every state (their tensors go with them)."""
        self._states.clear()
