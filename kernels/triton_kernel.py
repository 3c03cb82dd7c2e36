"""The Triton forward kernel for block-sparse attention over precomputed key-chunk lists.

One program computes one query tile (at most BLOCK_M consecutive plan positions of one query range) for
one (batch, head). It walks that range's key chunks (BLOCK_N consecutive plan positions each, see
`triton_prep`) in two flat loops: first the chunks that are entirely valid (no masks at all), then the
chunks that need a column bound (span tails and padded sequence tails). Flat loops over a precomputed list
keep Triton's software pipelining effective even when every span is a single chunk.

Statistics (HAS_STATS, for the "skip" method): for every (query range, selected key range) the largest
row log-sum-exp of the scaled logits over that key range's keys. The online softmax already sums each
row's chunk (m_new + log2 of the row sum of p is the row's log-sum-exp over the chunk), so this costs one
log per row and chunk. With statistics every selected key range is its own span (see `triton_prep`): a
range's full chunks form one run, combined per row in registers and written once (max over rows: atomic
max across query tiles), and its at most one masked chunk (the tail) goes to a second buffer; the two
are combined after the kernel (log-add-exp of the two row maxima: an upper bound of the range's value).

Q/K/V may be read through the plan's permutations (PERM_Q / PERM_K: a gather of whole rows, which stay
contiguous in head_dim) and the output may be written scattered to original order (PERM_O).
"""

from __future__ import annotations

import triton
import triton.language as tl

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453


@triton.jit
def _load_chunk(
    head, kidx, n_ok, s_row, s_col, offs_d, b, h, start,
    MASKED: tl.constexpr, TMA: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
):
    """The BLOCK_N rows of one key chunk of K or V (the same load for both): rows `kidx` of the head's
    pointer `head` (zero where `n_ok` is false when MASKED), or with TMA rows start..start+BLOCK_N of the
    [B, H, S, D] tensor descriptor `head`. Inlined into the caller like any jit function."""
    if TMA:
        rows = head.load([b, h, start, 0]).reshape(BLOCK_N, HEAD_DIM)
    elif MASKED:
        rows = tl.load(head + kidx[:, None] * s_row + offs_d[None, :] * s_col, mask=n_ok[:, None], other=0.0)
    else:
        rows = tl.load(head + kidx[:, None] * s_row + offs_d[None, :] * s_col)
    return rows


@triton.jit
def _chunk_step(
    q, acc, m_i, l_i, k_head, v_head, kidx, n_ok, sks, skd, svs, svd, offs_d, qk_scale, b, h, start,
    MASKED: tl.constexpr, UPCAST: tl.constexpr, TMA: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
):
    """One online-softmax update with the key chunk whose rows (in memory) are `kidx`; returns the new
    (acc, m_i, l_i) and this chunk's row sums l_ij (relative to the new m_i, for the statistics).

    With TMA, k_head / v_head are [B, H, S, D] tensor descriptors and the chunk is rows start..start+BLOCK_N
    (zero-filled past the sequence end; columns past a masked chunk's bound are masked below).
    """
    k = _load_chunk(k_head, kidx, n_ok, sks, skd, offs_d, b, h, start,
                    MASKED=MASKED, TMA=TMA, BLOCK_N=BLOCK_N, HEAD_DIM=HEAD_DIM)
    if UPCAST:
        k = k.to(tl.float32)
    qk = tl.dot(q, tl.trans(k))
    if MASKED:
        qk = tl.where(n_ok[None, :], qk, float("-inf"))
    row_max = tl.max(qk, 1)
    m_new = tl.maximum(m_i, row_max * qk_scale)
    p = tl.math.exp2(qk * qk_scale - m_new[:, None])
    alpha = tl.math.exp2(m_i - m_new)
    l_ij = tl.sum(p, 1)
    l_i = l_i * alpha + l_ij
    acc = acc * alpha[:, None]
    v = _load_chunk(v_head, kidx, n_ok, svs, svd, offs_d, b, h, start,
                    MASKED=MASKED, TMA=TMA, BLOCK_N=BLOCK_N, HEAD_DIM=HEAD_DIM)
    if UPCAST:
        acc = tl.dot(p.to(v.dtype).to(tl.float32), v.to(tl.float32), acc)
    else:
        acc = tl.dot(p.to(v.dtype), v, acc)
    return acc, m_new, l_i, l_ij


@triton.jit
def block_sparse_fwd(
    Q, K, V, O, LSE, TM, TM2,  # noqa: E741 - attention operand names; TM / TM2: statistics (full / tail)
    QP, KP,  # int32 [BH, S]: plan position -> original token (read only when PERM_* is set)
    TILES,  # int32 [BH, T, 2]: (query range or -1, first plan row)
    QOFF,  # int32 [BH, NQ + 1]
    CST, CEN, CSL,  # int32 [BH, NQ, MAXC]: chunk start, chunk end (masked part), kv slot
    CNT,  # int32 [BH, NQ, 2]: (full chunks, masked chunks)
    sqb, sqh, sqs, sqd,
    skb, skh, sks, skd,
    svb, svh, svs, svd,
    sob, soh, sos, sod,
    H, Sq, Sk, NQ, MAXC, MAXK, T,
    sm_scale, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    PERM_Q: tl.constexpr, PERM_K: tl.constexpr, PERM_O: tl.constexpr,
    HAS_LSE: tl.constexpr, HAS_STATS: tl.constexpr,
    STATS_OWNED: tl.constexpr,  # one tile per query range and one chunk per kv slot: plain stores
    UPCAST: tl.constexpr,  # dot in float32 (the CPU interpreter's bf16 dot is wrong)
    TMA_KV: tl.constexpr,  # K and V are host tensor descriptors (identity key order only)
    WARP_SPEC: tl.constexpr = False,  # Triton automatic warp specialisation of the main loop
):
    t = tl.program_id(0)
    bh = tl.program_id(1)
    tile_ptr = TILES + (bh.to(tl.int64) * T + t) * 2
    r = tl.load(tile_ptr)
    if r < 0:
        return
    row0 = tl.load(tile_ptr + 1)
    b = bh // H
    h = bh % H
    row_end = tl.load(QOFF + bh * (NQ + 1) + r + 1)

    offs_m = row0 + tl.arange(0, BLOCK_M)
    m_ok = offs_m < row_end
    offs_d = tl.arange(0, HEAD_DIM)
    offs_c = tl.arange(0, BLOCK_N)
    if PERM_Q:
        q_rows = tl.load(QP + bh.to(tl.int64) * Sq + offs_m, mask=m_ok, other=0)
    else:
        q_rows = offs_m
    q_head = Q + b.to(tl.int64) * sqb + h.to(tl.int64) * sqh
    if TMA_KV:
        k_head = K
        v_head = V
    else:
        k_head = K + b.to(tl.int64) * skb + h.to(tl.int64) * skh
        v_head = V + b.to(tl.int64) * svb + h.to(tl.int64) * svh
    q = tl.load(q_head + q_rows[:, None] * sqs + offs_d[None, :] * sqd, mask=m_ok[:, None], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    run_lse = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)  # per row, over the current slot's run (log2)

    crow = bh.to(tl.int64) * NQ + r
    n_full = tl.load(CNT + crow * 2)
    n_mask = tl.load(CNT + crow * 2 + 1)
    cbase = crow * MAXC
    kp_head = KP + bh.to(tl.int64) * Sk
    tm_row = TM + crow * MAXK
    tm2_row = TM2 + crow * MAXK

    # Chunks that are completely inside one selected span: no bounds, no masks.
    for c in tl.range(0, n_full, warp_specialize=WARP_SPEC):
        start = tl.load(CST + cbase + c)
        offs_n = start + offs_c
        if PERM_K:
            kidx = tl.load(kp_head + offs_n)
        else:
            kidx = offs_n
        acc, m_i, l_i, l_ij = _chunk_step(
            q, acc, m_i, l_i, k_head, v_head, kidx, offs_n < Sk, sks, skd, svs, svd, offs_d, qk_scale, b, h, start,
            MASKED=False, UPCAST=UPCAST, TMA=TMA_KV, BLOCK_N=BLOCK_N, HEAD_DIM=HEAD_DIM,
        )
        if HAS_STATS:
            # CSL packs slot * 4 + (first chunk of its slot) * 2 + (last chunk of its slot).
            code = tl.load(CSL + cbase + c)
            c_lse = m_i + tl.math.log2(l_ij)  # each row's log2-sum-exp2 over this chunk
            if STATS_OWNED:  # this program alone writes its query range's row, one chunk per slot
                tl.store(tm_row + code // 4, tl.max(tl.where(m_ok, c_lse, float("-inf")), 0) * LN2)
            else:  # rows add their chunks of one slot; one atomic per run
                hi = tl.maximum(run_lse, c_lse)
                both = tl.where(hi == float("-inf"), float("-inf"),
                                hi + tl.math.log2(1.0 + tl.math.exp2(tl.minimum(run_lse, c_lse) - hi)))
                run_lse = tl.where((code & 2) != 0, c_lse, both)
                run_val = tl.max(tl.where(m_ok, run_lse, float("-inf")), 0) * LN2
                tl.atomic_max(tm_row + code // 4, run_val, mask=(code & 1) != 0)

    # Chunks with a column bound.
    for c in range(n_full, n_full + n_mask):
        start = tl.load(CST + cbase + c)
        end = tl.load(CEN + cbase + c)
        offs_n = start + offs_c
        n_ok = offs_n < end
        if PERM_K:
            kidx = tl.load(kp_head + offs_n, mask=n_ok, other=0)
        else:
            kidx = offs_n
        acc, m_i, l_i, l_ij = _chunk_step(
            q, acc, m_i, l_i, k_head, v_head, kidx, n_ok, sks, skd, svs, svd, offs_d, qk_scale, b, h, start,
            MASKED=True, UPCAST=UPCAST, TMA=TMA_KV, BLOCK_N=BLOCK_N, HEAD_DIM=HEAD_DIM,
        )
        if HAS_STATS:  # a slot's tail chunk (at most one per slot)
            c_val = tl.max(tl.where(m_ok, m_i + tl.math.log2(l_ij), float("-inf")), 0) * LN2
            code = tl.load(CSL + cbase + c)
            if STATS_OWNED:
                tl.store(tm2_row + code // 4, c_val)
            else:
                tl.atomic_max(tm2_row + code // 4, c_val)

    # Rows that selected nothing: l_i == 0 -> output 0, LSE -inf (never 0/0).
    l_safe = tl.where(l_i > 0.0, l_i, 1.0)
    out = acc / l_safe[:, None]
    if PERM_O:
        if PERM_Q:
            o_rows = q_rows
        else:
            o_rows = tl.load(QP + bh.to(tl.int64) * Sq + offs_m, mask=m_ok, other=0)
    else:
        o_rows = offs_m
    o_head = O + b.to(tl.int64) * sob + h.to(tl.int64) * soh
    tl.store(o_head + o_rows[:, None] * sos + offs_d[None, :] * sod, out.to(O.dtype.element_ty), mask=m_ok[:, None])
    if HAS_LSE:
        lse = tl.where(l_i > 0.0, (m_i + tl.math.log2(l_safe)) * 0.6931471805599453, float("-inf"))
        tl.store(LSE + bh.to(tl.int64) * Sq + o_rows, lse, mask=m_ok)
