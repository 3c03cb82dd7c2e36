"""What a block-sparse attention executor returns."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class AttentionResult:
    """Output of one block-sparse attention call.

    out: [B, H, S, D] in original token order, the input dtype.
    lse: [B, H, S] float32 natural-log sum-exp of each row's scaled logits (-inf for empty rows), or None.
    tile_lse: [B, H, NQ, MAXK] float32, per (query range, selected key slot) pair aligned with
        `plan.kv_indices`: the largest log-sum-exp over the slot's keys of a row's scaled logits, over the
        range's rows (-inf for padded slots and empty pairs), or None. Exact on the reference executor; the
        Triton kernel may return up to log 2 more (never less: it is an upper bound), see triton_kernel.
        exp(tile_lse - lse_r) bounds the attention mass any row r of the range puts on the slot.
    """

    out: torch.Tensor
    lse: torch.Tensor | None = None
    tile_lse: torch.Tensor | None = None
