"""What a block-sparse attention executor returns."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class AttentionResult:
    """Output of one block-sparse attention call.

    out: [B, H, S, D] in original token order, the input dtype.
    lse: [B, H, S] float32 natural-log sum-exp of each row's scaled logits (-inf for empty rows), or None.
    tile_max: [B, H, NQ, MAXK] float32 max scaled logit of each (query range, selected key slot) pair,
        aligned with `plan.kv_indices` (-inf for padded slots), or None.
    """

    out: torch.Tensor
    lse: torch.Tensor | None = None
    tile_max: torch.Tensor | None = None
