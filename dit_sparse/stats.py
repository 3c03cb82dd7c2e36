"""Running account of what sparse attention actually skipped, without host syncs on the hot path."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch

from .plan import BlockPlan


@dataclass
class SparsityStats:
    """Pairs computed vs possible, split into sparse calls and dense (warm-up / fallback) calls.

    Computed pairs accumulate in one device counter per device (added in place, never read on the hot
    path), so a run of any length keeps the statistics' memory constant; `summary` syncs once.
    """

    sparse_calls: int = 0
    dense_calls: int = 0
    fallback_calls: int = 0
    _sparse_total: int = 0
    _dense_total: int = 0

    def __post_init__(self) -> None:
        self._computed: dict[torch.device, torch.Tensor] = {}

    def add_sparse(self, plan: BlockPlan) -> None:
        self.sparse_calls += 1
        pairs = plan.cached("pairs_total", lambda: plan.pair_counts().sum())
        acc = self._computed.get(pairs.device)
        if acc is None:
            self._computed[pairs.device] = pairs.detach().clone()
        else:
            acc.add_(pairs)
        self._sparse_total += plan.batch * plan.heads * plan.seq_len_q * plan.seq_len_k

    def add_dense(self, pairs: int, fallback: bool = False) -> None:
        self.dense_calls += 1
        self.fallback_calls += int(fallback)
        self._dense_total += pairs

    def summary(self) -> dict[str, float | int]:
        """Achieved sparsity over sparse calls and over all self-attention calls (syncs once)."""
        computed = float(sum(int(t) for t in self._computed.values()))
        sparse = 1.0 - computed / self._sparse_total if self._sparse_total else 0.0
        total = self._sparse_total + self._dense_total
        overall = 1.0 - (computed + self._dense_total) / total if total else 0.0
        return {
            "sparse_calls": self.sparse_calls,
            "dense_calls": self.dense_calls,
            "fallback_calls": self.fallback_calls,
            "sparsity_in_sparse_calls": sparse,
            "sparsity_overall": overall,
        }

    @classmethod
    def merged(cls, parts: Iterable[SparsityStats]) -> SparsityStats:
        """One account of several (e.g. the experts of a Wan 2.2 pipeline): counts and pairs added up.

        The device counters are added, not read, so merging costs no host sync (`summary` syncs once).
        """
        out = cls()
        for part in parts:
            out.sparse_calls += part.sparse_calls
            out.dense_calls += part.dense_calls
            out.fallback_calls += part.fallback_calls
            out._sparse_total += part._sparse_total
            out._dense_total += part._dense_total
            for device, computed in part._computed.items():
                acc = out._computed.get(device)
                out._computed[device] = computed.clone() if acc is None else acc + computed
        return out

    def reset(self) -> None:
        self.sparse_calls = self.dense_calls = self.fallback_calls = 0
        self._sparse_total = self._dense_total = 0
        self._computed = {}
