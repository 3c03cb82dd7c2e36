"""Block selection under a pair budget: the shared decision step of the "semantic" and "pooled" methods.

Input: an estimated logit per (query range i, key range j) block, the ranges' token counts, the user's
target sparsity, and ranges that must always be computed (text). The estimated share of attention
that block (i, j) receives from the queries of range i is

    P'_ij = |K_j| exp(s_ij) / sum_j' |K_j'| exp(s_ij')

(every key of the range is assumed to score s_ij). Selection, per (batch, head):

1. forced blocks (text rows and text columns) are always on; their pairs are paid first;
2. per query range, the `min_blocks` key ranges of highest logit are "floor" candidates, and the key
   ranges needed to reach cumulative mass `top_p` in descending P' (forced keys' mass counts) are
   "top-p" candidates;
3. candidates are taken in priority order - floor candidates by rank (every range's best key range
   first), then top-p candidates by per-pair probability P'_ij / |K_j| (the fractional-knapsack order
   that maximises captured attention mass per computed pair) - while their pairs fit in the budget
   (1 - sparsity) * Sq * Sk. Each non-empty query range always keeps its best key range.

So the target sparsity is a guarantee (up to forced text and one key range per query range) and
top_p can only make a plan sparser: top_p = 1 fills the budget.
"""

from __future__ import annotations

import math

import torch

from dit_sparse.kernels import priority
from dit_sparse.kernels.top_p import top_p_members

Tensor = torch.Tensor

_LEVEL = 64.0  # width of one priority level in the sort key; -log(probability) is clipped below it


def check_selection_options(top_p: float, min_ratio_name: str, min_ratio: float, budget_scope: str,
                            replan_every: int) -> None:
    """Raise ValueError for a bad option of a method that selects with `select_blocks` and reuses plans
    (the options "semantic" and "pooled" share; `min_ratio_name` is the method's name for its floor)."""
    if not isinstance(replan_every, int) or replan_every < 1:
        raise ValueError(f"replan_every must be an integer >= 1, got {replan_every!r}")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must lie in (0, 1], got {top_p}")
    if not 0.0 <= min_ratio <= 1.0:
        raise ValueError(f"{min_ratio_name} must lie in [0, 1], got {min_ratio}")
    if budget_scope not in ("head", "layer"):
        raise ValueError(f"budget_scope must be 'head' or 'layer', got {budget_scope!r}")


def block_mass(logits: Tensor, k_sizes: Tensor) -> Tensor:
    """P'_ij: softmax over key ranges of logit + log(range size); empty ranges get 0 (float32)."""
    logw = logits.float() + torch.log(k_sizes.float())[..., None, :]  # log(0) = -inf drops empty ranges
    all_empty = torch.isneginf(logw).all(-1, keepdim=True)
    return torch.softmax(torch.where(all_empty, torch.zeros_like(logw), logw), dim=-1).masked_fill(
        torch.isneginf(logw), 0.0
    )


def select_blocks(
    logits: Tensor,
    q_sizes: Tensor,
    k_sizes: Tensor,
    sparsity: float,
    top_p: float = 0.9,
    min_blocks: int = 1,
    force_q: Tensor | None = None,
    force_k: Tensor | None = None,
    budget_scope: str = "head",
) -> Tensor:
    """Boolean [B, H, NQ, NK] selection of blocks; see the module docstring for the rule.

    Args:
        logits: estimated scaled logit per block, [B, H, NQ, NK].
        q_sizes, k_sizes: tokens per query range [B, H, NQ] and per key range [B, H, NK].
        sparsity: target fraction of skipped query-key pairs in [0, 1).
        top_p: attention mass per query range beyond which no more key ranges are added, in (0, 1].
        min_blocks: key ranges per query range taken before any top-p candidate (>= 1).
        force_q: query ranges that attend every key range (e.g. text queries), bool broadcastable to [B, H, NQ].
        force_k: key ranges every query range attends (e.g. text keys), bool broadcastable to [B, H, NK].
        budget_scope: "head" gives every (batch, head) its own budget; "layer" pools the budget over the
            heads of each batch element (heads with diffuse attention may use what focused heads leave).
    """
    if logits.dim() != 4:
        raise ValueError(f"logits must be [B, H, NQ, NK], got {tuple(logits.shape)}")
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must lie in [0, 1), got {sparsity}")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must lie in (0, 1], got {top_p}")
    if min_blocks < 1:
        raise ValueError(f"min_blocks must be >= 1, got {min_blocks}")
    if budget_scope not in ("head", "layer"):
        raise ValueError(f"budget_scope must be 'head' or 'layer', got {budget_scope!r}")
    B, H, NQ, NK = logits.shape
    dev = logits.device
    qs = q_sizes.long()
    ks = k_sizes.long()
    fq = torch.zeros(B, H, NQ, dtype=torch.bool, device=dev) if force_q is None else force_q.expand(B, H, NQ)
    fk = torch.zeros(B, H, NK, dtype=torch.bool, device=dev) if force_k is None else force_k.expand(B, H, NK)
    live = (qs > 0)[..., None] & (ks > 0)[..., None, :]
    forced = (fq[..., None] | fk[..., None, :]) & live
    cost = qs[..., None] * ks[..., None, :]  # pairs per block, int64
    if priority.use_kernel(logits):  # one program per query range (kernels/priority.py)
        key = priority.priority_keys(logits, qs, ks, fq, fk, top_p, min_blocks, _LEVEL)
    else:
        key = _priority_keys_torch(logits, ks, forced, live, top_p, min_blocks)

    # Greedy prefix in priority order, per budget pool.
    pool_shape = (B, H, NQ * NK) if budget_scope == "head" else (B, 1, H * NQ * NK)
    key_f = key.reshape(pool_shape)
    cost_f = cost.reshape(pool_shape)
    total = qs.sum(-1) * ks.sum(-1)  # all pairs, [B, H]
    total = (total if budget_scope == "head" else total.sum(1, keepdim=True))[..., None]
    allowed = torch.floor(total.double() * (1.0 - sparsity)).long()
    spent = (cost * forced).reshape(pool_shape).sum(-1, keepdim=True)
    key_sorted, idx = torch.sort(key_f, dim=-1)
    cum = _cumsum(torch.gather(cost_f, -1, idx))
    take = torch.isfinite(key_sorted) & ((cum <= allowed - spent) | (key_sorted < _LEVEL))
    chosen = torch.zeros_like(take).scatter_(-1, idx, take).reshape(B, H, NQ, NK)
    return chosen | forced


def _priority_keys_torch(logits: Tensor, ks: Tensor, forced: Tensor, live: Tensor, top_p: float,
                         min_blocks: int) -> Tensor:
    """Sort key per block (inf = not a candidate): floor candidates by logit rank, then top-p candidates,
    each level ordered by -log(per-pair probability). The PyTorch twin of `kernels/priority.py`."""
    NK = logits.shape[-1]
    p = block_mass(logits, ks)
    cand = live & ~forced
    if top_p < 1.0:
        in_top_p = top_p_members(p, cand, (p * forced).sum(-1, keepdim=True), top_p)
    else:  # top_p = 1 is "every candidate" (float32 mass sums may reach 1.0 before the tail): no sort
        in_top_p = cand
    # Floor ranks follow the logit (= per-pair probability), not the mass: the guaranteed best key range
    # of a query range is then the most attended one, not merely the largest.
    # topk, not a full sort: only the first min_blocks ranks matter.
    m = min(min_blocks, NK)
    l_cand = torch.where(cand, logits.float(), torch.full_like(p, -math.inf))
    top_idx = torch.topk(l_cand, m, dim=-1).indices  # descending: slot r holds rank r
    l_ranks = torch.full(p.shape, NK, dtype=torch.long, device=logits.device)
    l_ranks.scatter_(-1, top_idx, torch.arange(m, device=logits.device).expand_as(top_idx))
    floor = cand & (l_ranks < m)
    top = cand & in_top_p & ~floor
    density = p / ks.clamp_min(1).float()[..., None, :]  # per-pair probability in [0, 1]
    neg_log = (-torch.log(density.clamp_min(1e-30))).clamp(0.0, _LEVEL - 1.0)
    key = torch.full_like(p, math.inf)
    key = torch.where(floor, l_ranks.float() * _LEVEL + neg_log, key)
    return torch.where(top, min_blocks * _LEVEL + neg_log, key)


def _cumsum(x: Tensor, width: int = 256) -> Tensor:
    """Inclusive cumulative sum along the last dim, computed in two levels when rows are long.

    A budget pool holds NQ * NK blocks (65,536 at Wan-1.3B's shape) in only B * H rows, and CUDA's scan
    along one long innermost row used 0.1 ms there; scanning chunks of `width` and then the chunk
    totals runs the same sums with all SMs busy. Exact for integers.
    """
    n = x.shape[-1]
    if n <= 4 * width:
        return torch.cumsum(x, -1)
    pad = (-n) % width
    chunks = torch.nn.functional.pad(x, (0, pad)).unflatten(-1, (-1, width)).cumsum(-1)
    carry = chunks[..., -1].cumsum(-1) - chunks[..., -1]  # total of the chunks before each chunk
    return (chunks + carry[..., None]).flatten(-2)[..., :n]
