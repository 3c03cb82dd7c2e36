"""Running account of what sparse attention actually skipped, without host syncs on the hot path."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .plan import BlockPlan


@dataclass
class SparsityStats:
    """Pairs computed vs possible, split into sparse calls and dense (warm-up / fallback) calls."""

    sparse_calls: int = 0
    dense_calls: int = 0
    fallback_calls: int = 0
    _computed: list[torch.Tensor] = field(default_factory=list)
    _sparse_total: int = 0
    _dense_total: int = 0

    def add_sparse(self, plan: BlockPlan) -> None:
        self.sparse_calls += 1
        self._computed.append(plan.pair_counts().sum())
        self._sparse_total += plan.batch * plan.heads * plan.seq_len_q * plan.seq_len_k

    def add_dense(self, pairs: int, fallback: bool = False) -> None:
        self.dense_calls += 1
        self.fallback_calls += int(fallback)
        self._dense_total += pairs

    def summary(self) -> dict[str, float | int]:
        """Achieved sparsity over sparse calls and over all self-attention calls (syncs once)."""
        computed = float(torch.stack(self._computed).sum()) if self._computed else 0.0
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

    def reset(self) -> None:
        self.__init__()
