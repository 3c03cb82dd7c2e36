"""`BlockPlan`: the one data structure that sparse-attention methods produce and kernels consume.

A plan says, per (batch, head):

* the token order attention runs in (`q_perm`, `k_perm`: plan position -> original token index;
  `None` is the identity). Values follow the keys' order.
* how that order is cut into query ranges (`q_offsets`, NQ + 1 increasing offsets from 0 to Sq) and key
  ranges (`k_offsets`, NK + 1 offsets from 0 to Sk). Ranges may have any length >= 0; fixed-size blocks
  are the special case `block_size=(bq, bk)` with offsets `i * b` clipped to the sequence length.
* which key ranges each query range attends (`kv_indices[..., :kv_counts]`: distinct indices, since a
  repeated one would be computed twice; entries past the count are ignored and must be valid indices,
  conventionally 0).

A plan is static data, like FlexAttention's `BlockMask`: the sequence lengths are Python ints and the
index tensors have a width fixed by shapes (the number of key ranges), never by the data, so building and
executing a plan needs no host synchronisation and no data-dependent shape. Values derived from a plan
(pair counts, a kernel's launch metadata) are cached in `plan.derived`, so a plan reused across layers or
steps pays for them once; plans are treated as immutable.

Every tensor has leading dims (B, H) (expanded views are fine). Kernels never see models; methods never
call kernels: they return a plan and the attention processor executes it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

Tensor = torch.Tensor


def _offsets_for_blocks(seq_len: int, block: int, device: torch.device) -> Tensor:
    n = (seq_len + block - 1) // block
    return (torch.arange(n + 1, device=device, dtype=torch.int32) * block).clamp_(max=seq_len)


# The tensor fields of a `BlockPlan`, in declaration order (the permutations may be None).
TENSOR_FIELDS = ("q_offsets", "k_offsets", "kv_indices", "kv_counts", "q_perm", "k_perm")


@dataclass(frozen=True)
class BlockPlan:
    """Block-sparse attention plan; see the module docstring for the meaning of each field."""

    q_offsets: Tensor  # int32 [B, H, NQ + 1]
    k_offsets: Tensor  # int32 [B, H, NK + 1]
    kv_indices: Tensor  # int32 [B, H, NQ, MAXK]
    kv_counts: Tensor  # int32 [B, H, NQ]
    q_perm: Tensor | None = None  # int64 [B, H, Sq]
    k_perm: Tensor | None = None  # int64 [B, H, Sk]
    block_size: tuple[int, int] | None = None  # set when every range is a fixed-size block
    # Python-int sequence lengths. Left as None they are read from the offsets once, here (a host sync):
    # every method passes them, so the steady state never syncs.
    seq_lens: tuple[int, int] | None = None
    # Values derived from this plan, computed on first use (see `cached`); never part of equality.
    derived: dict[Any, Any] = field(default_factory=dict, init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.seq_lens is None:
            sq = int(self.q_offsets[0, 0, -1]) if self.q_offsets.numel() else 0
            sk = int(self.k_offsets[0, 0, -1]) if self.k_offsets.numel() else 0
            object.__setattr__(self, "seq_lens", (sq, sk))
        else:
            object.__setattr__(self, "seq_lens", (int(self.seq_lens[0]), int(self.seq_lens[1])))

    def cached(self, key: Any, build: Any) -> Any:
        """`build()` computed once per plan and key (kernel launch metadata, pair counts, ...)."""
        if key not in self.derived:
            self.derived[key] = build()
        return self.derived[key]

    # ------------------------------------------------------------------ shape facts
    @property
    def batch(self) -> int:
        return self.kv_counts.shape[0]

    @property
    def heads(self) -> int:
        return self.kv_counts.shape[1]

    @property
    def num_q_blocks(self) -> int:
        return self.q_offsets.shape[-1] - 1

    @property
    def num_k_blocks(self) -> int:
        return self.k_offsets.shape[-1] - 1

    @property
    def seq_len_q(self) -> int:
        return self.seq_lens[0]

    @property
    def seq_len_k(self) -> int:
        return self.seq_lens[1]

    # ------------------------------------------------------------------ constructors
    @classmethod
    def from_block_mask(
        cls,
        mask: Tensor,
        block_size: int | tuple[int, int],
        seq_len: int | tuple[int, int],
        q_perm: Tensor | None = None,
        k_perm: Tensor | None = None,
    ) -> BlockPlan:
        """Plan from a boolean [B, H, NQ, NK] mask of fixed-size blocks (True = computed)."""
        bq, bk = (block_size, block_size) if isinstance(block_size, int) else block_size
        sq, sk = (seq_len, seq_len) if isinstance(seq_len, int) else seq_len
        B, H, NQ, NK = mask.shape
        q_off = _offsets_for_blocks(sq, bq, mask.device)
        k_off = _offsets_for_blocks(sk, bk, mask.device)
        if q_off.numel() - 1 != NQ or k_off.numel() - 1 != NK:
            raise ValueError(
                f"mask has {NQ}x{NK} blocks but seq_len {sq}x{sk} with blocks {bq}x{bk} needs "
                f"{q_off.numel() - 1}x{k_off.numel() - 1}"
            )
        return cls.from_range_mask(
            mask,
            q_off.expand(B, H, -1),
            k_off.expand(B, H, -1),
            q_perm=q_perm,
            k_perm=k_perm,
            block_size=(bq, bk),
            seq_lens=(sq, sk),
        )

    @classmethod
    def from_range_mask(
        cls,
        mask: Tensor,
        q_offsets: Tensor,
        k_offsets: Tensor,
        q_perm: Tensor | None = None,
        k_perm: Tensor | None = None,
        block_size: tuple[int, int] | None = None,
        seq_lens: tuple[int, int] | None = None,
    ) -> BlockPlan:
        """Plan from a boolean [B, H, NQ, NK] mask over arbitrary ranges given by offsets.

        `kv_indices` gets the static width NK (every key range), so no count is read back to the host;
        pass `seq_lens` (Python ints) to keep the construction free of host synchronisation.
        """
        idx, counts = compact_indices(mask)
        return cls(
            q_offsets=q_offsets.to(torch.int32),
            k_offsets=k_offsets.to(torch.int32),
            kv_indices=idx,
            kv_counts=counts,
            q_perm=q_perm,
            k_perm=k_perm,
            block_size=block_size,
            seq_lens=seq_lens,
        )

    @classmethod
    def dense(
        cls, batch: int, heads: int, seq_len: int, block_size: int = 64, device: torch.device | str = "cpu"
    ) -> BlockPlan:
        """A plan that computes every pair (fixed blocks, identity order)."""
        nb = (seq_len + block_size - 1) // block_size
        mask = torch.ones(batch, heads, nb, nb, dtype=torch.bool, device=device)
        return cls.from_block_mask(mask, block_size, seq_len)

    # ------------------------------------------------------------------ derived data
    def block_mask(self) -> Tensor:
        """Boolean [B, H, NQ, NK] mask of the selected (query range, key range) pairs."""
        B, H, NQ = self.kv_counts.shape
        hits = torch.zeros(B, H, NQ, self.num_k_blocks, dtype=torch.int32, device=self.kv_counts.device)
        valid = torch.arange(self.kv_indices.shape[-1], device=hits.device) < self.kv_counts[..., None]
        # scatter_add, not scatter: padded slots may repeat a valid index and must not overwrite it.
        hits.scatter_add_(-1, self.kv_indices.long(), valid.to(torch.int32))
        return hits > 0

    def pair_counts(self) -> Tensor:
        """Number of computed query-key pairs per (batch, head), as int64 [B, H] (cached per plan)."""
        return self.cached("pair_counts", self._pair_counts)

    def _pair_counts(self) -> Tensor:
        q_len = (self.q_offsets[..., 1:] - self.q_offsets[..., :-1]).long()
        k_len = (self.k_offsets[..., 1:] - self.k_offsets[..., :-1]).long()
        per_q = (self.block_mask().long() * k_len[..., None, :]).sum(-1)
        return (per_q * q_len).sum(-1)

    def density(self) -> float:
        """Fraction of all query-key pairs that the plan computes (1 - achieved sparsity)."""
        total = self.batch * self.heads * self.seq_len_q * self.seq_len_k
        return float(self.pair_counts().sum()) / max(total, 1)

    def token_mask(self) -> Tensor:
        """Boolean [B, H, Sq, Sk] mask in *original* token order. O(S^2): tests and debugging only."""
        B, H = self.batch, self.heads
        sq, sk = self.seq_len_q, self.seq_len_k
        dev = self.kv_counts.device
        q_blk = _token_to_range(self.q_offsets, sq)  # [B, H, Sq] in plan order
        k_blk = _token_to_range(self.k_offsets, sk)
        bm = self.block_mask()
        m = torch.gather(bm, 2, q_blk[..., None].expand(B, H, sq, bm.shape[-1]))
        m = torch.gather(m, 3, k_blk[:, :, None, :].expand(B, H, sq, sk))
        qp = self.q_perm if self.q_perm is not None else torch.arange(sq, device=dev).expand(B, H, sq)
        kp = self.k_perm if self.k_perm is not None else torch.arange(sk, device=dev).expand(B, H, sk)
        out = torch.zeros(B, H, sq, sk, dtype=torch.bool, device=dev)
        rows = torch.zeros_like(out)
        rows.scatter_(2, qp[..., None].expand(B, H, sq, sk), m)
        out.scatter_(3, kp[:, :, None, :].expand(B, H, sq, sk), rows)
        return out

    def with_mask(self, mask: Tensor) -> BlockPlan:
        """The same ranges and order with a new [B, H, NQ, NK] selection (used by plan transforms)."""
        return BlockPlan.from_range_mask(mask, self.q_offsets, self.k_offsets, self.q_perm, self.k_perm,
                                         block_size=self.block_size, seq_lens=self.seq_lens)

    def validate(self) -> None:
        """Raise ValueError if the plan is malformed (shapes, monotone offsets, index ranges)."""
        B, H, NQ = self.kv_counts.shape
        if self.q_offsets.shape[:2] != (B, H) or self.k_offsets.shape[:2] != (B, H):
            raise ValueError("q_offsets/k_offsets must have leading dims (B, H) like kv_counts")
        if self.q_offsets.shape[-1] != NQ + 1:
            raise ValueError(f"q_offsets has {self.q_offsets.shape[-1]} entries, expected NQ + 1 = {NQ + 1}")
        for name, off, s in (("q_offsets", self.q_offsets, self.seq_len_q),
                             ("k_offsets", self.k_offsets, self.seq_len_k)):
            if (off[..., 0] != 0).any() or (off[..., 1:] < off[..., :-1]).any():
                raise ValueError(f"{name} must start at 0 and be non-decreasing")
            if (off[..., -1] != s).any():
                raise ValueError(f"{name} must end at the plan's sequence length {s} for every (batch, head)")
        if self.kv_indices.shape[:3] != (B, H, NQ):
            raise ValueError("kv_indices must be [B, H, NQ, MAXK]")
        if (self.kv_counts < 0).any() or (self.kv_counts > self.kv_indices.shape[-1]).any():
            raise ValueError("kv_counts must lie in [0, MAXK]")
        if self.kv_indices.numel() and (
            (self.kv_indices < 0).any() or (self.kv_indices >= self.num_k_blocks).any()
        ):
            raise ValueError("kv_indices must lie in [0, NK)")
        for name, perm, s in (("q_perm", self.q_perm, self.seq_len_q), ("k_perm", self.k_perm, self.seq_len_k)):
            if perm is not None and perm.shape != (B, H, s):
                raise ValueError(f"{name} must be [B, H, {s}], got {tuple(perm.shape)}")


def compact_indices(mask: Tensor) -> tuple[Tensor, Tensor]:
    """(indices, counts) of a boolean [..., N] mask: the selected positions first, ascending (which keeps
    key reads sequential), padded with 0 to width N (int32 [..., N]), and their number (int32 [...]).

    Each selected position goes to the slot its running count gives it (a scan and a scatter, no sort).
    """
    mask = mask.bool()
    n = mask.shape[-1]
    pos = torch.cumsum(mask, -1, dtype=torch.int32)
    counts = pos[..., -1].contiguous() if n else mask.new_zeros(mask.shape[:-1], dtype=torch.int32)
    slot = torch.where(mask, pos - 1, n).long()  # unselected positions land in a spare last column
    idx = torch.zeros(*mask.shape[:-1], n + 1, dtype=torch.int32, device=mask.device)
    idx.scatter_(-1, slot, torch.arange(n, dtype=torch.int32, device=mask.device).expand(mask.shape))
    return idx[..., :n].contiguous(), counts


def _token_to_range(offsets: Tensor, seq_len: int) -> Tensor:
    """For each plan position 0..S-1, the index of the range holding it: int64 [B, H, S]."""
    pos = torch.arange(seq_len, device=offsets.device, dtype=torch.int32)
    B, H = offsets.shape[:2]
    return torch.searchsorted(
        offsets[..., 1:].contiguous(), pos.expand(B, H, seq_len).contiguous(), right=True
    )


token_to_range = _token_to_range


def shares_order(perm: Tensor) -> bool:
    """True when every (batch, head) uses the same token order (an expanded [S] view, as window3d builds)."""
    B, H = perm.shape[:2]
    return (B == 1 or perm.stride(0) == 0) and (H == 1 or perm.stride(1) == 0)


def permute_tokens(x: Tensor, perm: Tensor) -> Tensor:
    """x [B, H, S, D] (any strides, unit stride in D) read at token positions `perm` [B, H, L] (a permutation,
    or any positions): out[b, h, l] = x[b, h, perm[b, h, l]], a contiguous [B, H, L, D] tensor.

    Whole rows of D values are copied with one `index_select`: over the token dimension when every head
    shares the positions, else over the rows of x's storage (x as Diffusers lays it out, [B, S, H, D] seen
    as [B, H, S, D], has whole-row strides). `torch.gather`, which reads one index per element, is the
    fallback for other layouts.
    """
    B, H, S, D = x.shape
    L = perm.shape[-1]
    if shares_order(perm):
        return x.index_select(2, perm[0, 0])
    rows = storage_rows(x, perm)
    if rows is None:
        return torch.gather(x, 2, perm[..., None].expand(B, H, L, D))
    return row_view(x).index_select(0, rows.reshape(-1)).view(B, H, L, D)


def storage_rows(x: Tensor, pos: Tensor, b: Tensor | None = None, h: Tensor | None = None) -> Tensor | None:
    """Index of the storage row (of D values) holding x[b, h, pos] for x [B, H, S, D], or None when x's
    strides are not whole rows. `pos` is [B, H, ...] (then b, h are every batch and head), or any shape
    with `b` and `h` broadcastable to it (e.g. one (batch, head) per work item)."""
    B, H, S, D = x.shape
    sb, sh, ss, sd = x.stride()
    if sd != 1 or sb % D or sh % D or ss % D:
        return None
    if b is None or h is None:
        extra = (1,) * (pos.dim() - 2)
        b = torch.arange(B, device=x.device).view(B, 1, *extra)
        h = torch.arange(H, device=x.device).view(1, H, *extra)
    return b * (sb // D) + h * (sh // D) + pos * (ss // D)


def row_view(x: Tensor) -> Tensor:
    """x [B, H, S, D] with whole-row strides seen as the [N, D] rows of its storage span."""
    B, H, S, D = x.shape
    sb, sh, ss, _ = x.stride()
    n_rows = ((B - 1) * sb + (H - 1) * sh + (S - 1) * ss) // D + 1
    return x.as_strided((n_rows, D), (D, 1), x.storage_offset())
