"""`bench call` / `bench e2e` time whole re-planning cycles: the cycle of a method spec is the least common
multiple of the periods of the methods in its chain."""

from __future__ import annotations

import pytest
from dit_sparse.eval.bench_call import _cycle


@pytest.mark.parametrize("spec,steps", [
    ("window3d", 5),  # online head choice every 5 steps
    ("window3d[pattern=spatial]", 1),
    ("window3d[classify_every=3]", 3),
    ("semantic[replan_every=3]", 3),
    ("window3d+skip[update_every=4]", 80),  # skip's idle back-off: up to 16 calls between learning calls
    ("pooled+skip[update_every=3,replan_every=2]", 48),
    ("full+skip", 16),
    ("full+skip[max_idle_interval=1,update_every=2]", 2),
])
def test_cycle_covers_every_period_of_the_chain(spec: str, steps: int) -> None:
    assert _cycle(spec) == steps
