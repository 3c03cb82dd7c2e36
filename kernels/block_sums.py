"""Attention of a few sampled query rows summed per key block, in one pass over the keys and values.

window3d chooses each head's pattern by comparing, on a few sampled query rows, the attention output
under each candidate mask with the exact one (`dit_sparse.methods.window3d.head_search`). With fixed key blocks every
candidate's output is a masked sum of per-block partial results, so all that is needed from the keys is,
for each row r and key block n:

    m[r, n] = max_t s_rt,   l[r, n] = sum_t exp(s_rt - m[r, n]),   o[r, n] = sum_t exp(s_rt - m[r, n]) v_t

(t over the block's keys, s = q.k * scale). One program per (batch*head, key block) loads the block's keys
and values once and computes all rows' partial results with two tensor-core products; the [R, S] logits
never reach memory. Done in PyTorch, the same sums took several passes over a float32 copy of the
logits (about 1.3 ms per classification at Wan-1.3B's shape on an H200, flash-attn-4's whole sparse call
being 0.9 ms). Rows and keys are given as [B, H, R, D] and [B, H, S, D] views of any strides; the last
block may be short. On the CPU without the interpreter the same sums run in PyTorch.
"""

from __future__ import annotations

import torch

from .triton_util import triton_runs_on

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - CPU installs without Triton use PyTorch
    triton = None

Tensor = torch.Tensor
_BLOCKS = (16, 32, 64, 128)  # key block sizes the kernel takes (one program holds a block)


def block_sums(q_rows: Tensor, k: Tensor, v: Tensor, block: int, scale: float) -> tuple[Tensor, Tensor, Tensor]:
    """(m, l, o): float32 [B, H, R, NB], [B, H, R, NB] and [B, H, R, NB, D] for NB = ceil(S / block); see
    the module docstring. q_rows [B, H, R, D], k and v [B, H, S, D], one dtype."""
    B, H, R, D = q_rows.shape
    S = k.shape[2]
    nb = -(-S // block)
    if triton_runs_on(q_rows) and block in _BLOCKS and D in (16, 32, 64, 128) and R <= 128:
        m = torch.empty(B, H, R, nb, dtype=torch.float32, device=q_rows.device)
        lsum = torch.empty_like(m)
        o = torch.empty(B, H, R, nb, D, dtype=torch.float32, device=q_rows.device)
        _block_sums_kernel[(nb, B * H)](
            q_rows, k, v, m, lsum, o, S, H, R, nb, float(scale),
            *q_rows.stride(), *k.stride(), *v.stride(),
            D=D, BLOCK_R=max(16, triton.next_power_of_2(R)), BLOCK_N=block, num_warps=4,
        )
        return m, lsum, o
    return _block_sums_torch(q_rows, k, v, block, scale)


def _block_sums_torch(q_rows: Tensor, k: Tensor, v: Tensor, block: int, scale: float
                      ) -> tuple[Tensor, Tensor, Tensor]:
    B, H, R, D = q_rows.shape
    S = k.shape[2]
    nb = -(-S // block)
    s = torch.matmul(q_rows, k.transpose(-1, -2)).float() * scale  # [B, H, R, S]
    pad = nb * block - S
    if pad:
        s = torch.nn.functional.pad(s, (0, pad), value=-torch.inf)
        v = torch.nn.functional.pad(v, (0, 0, 0, pad))
    s = s.unflatten(-1, (nb, block))  # [B, H, R, NB, bs]
    m = s.amax(-1)
    p = torch.exp(s - m[..., None])
    o = torch.matmul(p.to(v.dtype).transpose(2, 3), v.reshape(B, H, nb, block, D)).float().transpose(2, 3)
    return m, p.sum(-1), o


if triton is not None:

    @triton.jit
    def _block_sums_kernel(
        Q, K, V, M, L, OUT,
        S, H, R, NB, scale,
        sqb, sqh, sqr, sqd,
        skb, skh, sks, skd,
        svb, svh, svs, svd,
        D: tl.constexpr,
        BLOCK_R: tl.constexpr,
        BLOCK_N: tl.constexpr,
    ):
        n = tl.program_id(0)  # key block
        bh = tl.program_id(1)  # batch * H + head
        b = (bh // H).to(tl.int64)
        h = (bh % H).to(tl.int64)
        rows = tl.arange(0, BLOCK_R)
        cols = n * BLOCK_N + tl.arange(0, BLOCK_N)
        dims = tl.arange(0, D)
        row_ok = rows < R
        col_ok = cols < S
        q = tl.load(Q + b * sqb + h * sqh + rows[:, None] * sqr + dims[None, :] * sqd, mask=row_ok[:, None], other=0.0)
        k = tl.load(K + b * skb + h * skh + cols[:, None] * sks + dims[None, :] * skd, mask=col_ok[:, None], other=0.0)
        s = tl.dot(q, tl.trans(k)) * scale  # [BLOCK_R, BLOCK_N], float32 accumulation
        s = tl.where(col_ok[None, :], s, float("-inf"))
        m = tl.max(s, axis=1)
        p = tl.exp(s - m[:, None])
        lsum = tl.sum(p, axis=1)
        v = tl.load(V + b * svb + h * svh + cols[:, None] * svs + dims[None, :] * svd, mask=col_ok[:, None], other=0.0)
        o = tl.dot(p.to(v.dtype), v)  # [BLOCK_R, D]
        base = (bh.to(tl.int64) * R + rows) * NB + n  # [B*H, R, NB] layout
        tl.store(M + base, m, mask=row_ok)
        tl.store(L + base, lsum, mask=row_ok)
        tl.store(OUT + base[:, None] * D + dims[None, :], o, mask=row_ok[:, None])
