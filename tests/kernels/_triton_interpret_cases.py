"""Triton kernel checks run under TRITON_INTERPRET=1 in a fresh process (see test_triton_interpret.py).

The interpreter must be switched on before triton is imported, which a shared pytest process cannot
guarantee; so this script sets the variable, runs every case and prints one JSON line per case.
Usage: python _triton_interpret_cases.py [case-name-substring ...]
"""

from __future__ import annotations

import json
import math
import os
import sys
import traceback

os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402
from dit_sparse.kernels import block_sparse_attention  # noqa: E402
from dit_sparse.kernels.reference import reference_block_sparse_attention  # noqa: E402
from dit_sparse.kernels.triton_backend import KernelConfig, triton_block_sparse_attention  # noqa: E402

from dit_sparse.plan import BlockPlan  # noqa: E402

TOL = {torch.float32: 2e-4, torch.float16: 3e-3, torch.bfloat16: 1e-2}


def random_offsets(s: int, n: int, gen: torch.Generator) -> torch.Tensor:
    """n ranges over s positions with empty and length-1 ranges mixed in."""
    cuts = torch.randint(0, s + 1, (n - 1,), generator=gen).sort().values
    lens = torch.diff(torch.cat([torch.tensor([0]), cuts, torch.tensor([s])]))
    if n >= 4 and s >= 4:  # force one empty and one length-1 range
        lens[0] += lens[1] - 1
        lens[1] = 1
        lens[0] += lens[2]
        lens[2] = 0
        if lens[0] < 0:
            lens[3] += lens[0]
            lens[0] = 0
    off = torch.cat([torch.tensor([0]), lens.cumsum(0)])
    assert off[-1] == s and (lens >= 0).all()
    return off.to(torch.int32)


def make_inputs(B, H, sq, sk, D, dtype, gen, strided):
    def one(s):
        if strided:  # Diffusers layout [B, S, H, D] viewed as [B, H, S, D]
            return torch.randn(B, s, H, D, generator=gen).to(dtype).transpose(1, 2)
        return torch.randn(B, H, s, D, generator=gen).to(dtype)

    return one(sq), one(sk), one(sk)


def make_plan(kind, B, H, sq, sk, gen, perm, density=0.4):
    if kind.startswith("fixed"):
        bq, bk = {"fixed16": (16, 16), "fixed32x16": (32, 16), "fixed16x32": (16, 32)}[kind]
        nq, nk = math.ceil(sq / bq), math.ceil(sk / bk)
        mask = torch.rand(B, H, nq, nk, generator=gen) < density
        mask[0, 0, 0] = False  # an empty query row
        qperm = torch.stack([torch.randperm(sq, generator=gen) for _ in range(B * H)]).view(B, H, sq) if perm else None
        kperm = torch.stack([torch.randperm(sk, generator=gen) for _ in range(B * H)]).view(B, H, sk) if perm else None
        plan = BlockPlan.from_block_mask(mask, (bq, bk), (sq, sk), q_perm=qperm, k_perm=kperm)
        # Exercise padding conventions: duplicate a valid index into the padded slots.
        return plan
    nq, nk = 7, 9
    qoff = torch.stack([random_offsets(sq, nq, gen) for _ in range(B * H)]).view(B, H, nq + 1)
    koff = torch.stack([random_offsets(sk, nk, gen) for _ in range(B * H)]).view(B, H, nk + 1)
    mask = torch.rand(B, H, nq, nk, generator=gen) < density
    mask[..., 3, 4:6] = True  # a run of consecutive selected ranges (merged into one span)
    mask[0, 1, 5] = False  # an empty query row
    qperm = torch.stack([torch.randperm(sq, generator=gen) for _ in range(B * H)]).view(B, H, sq) if perm else None
    kperm = torch.stack([torch.randperm(sk, generator=gen) for _ in range(B * H)]).view(B, H, sk) if perm else None
    return BlockPlan.from_range_mask(mask, qoff, koff, q_perm=qperm, k_perm=kperm)


def oracle(q, k, v, plan, scale):
    """float64 dense masked softmax in original order."""
    m = plan.token_mask()
    s = torch.matmul(q.double(), k.double().transpose(-1, -2)) * scale
    s = s.masked_fill(~m, -math.inf)
    lse = torch.logsumexp(s, -1)
    p = torch.where(m, torch.exp(s - torch.where(torch.isfinite(lse), lse, 0)[..., None]), 0.0)
    return p @ v.double(), lse


def oracle_tile_lse(q, k, plan, scale):
    """float64 largest row log-sum-exp per (query range, kv slot), computed in plan order."""
    B, H, NQ, maxk = plan.kv_indices.shape
    qp = q if plan.q_perm is None else torch.gather(q, 2, plan.q_perm[..., None].expand(-1, -1, -1, q.shape[-1]))
    kp = k if plan.k_perm is None else torch.gather(k, 2, plan.k_perm[..., None].expand(-1, -1, -1, k.shape[-1]))
    s = torch.matmul(qp.double(), kp.double().transpose(-1, -2)) * scale
    tl_ = torch.full((B, H, NQ, maxk), -math.inf, dtype=torch.float64)
    for b in range(B):
        for h in range(H):
            qo, ko = plan.q_offsets[b, h].tolist(), plan.k_offsets[b, h].tolist()
            for r in range(NQ):
                for slot in range(int(plan.kv_counts[b, h, r])):
                    j = int(plan.kv_indices[b, h, r, slot])
                    blk = s[b, h, qo[r] : qo[r + 1], ko[j] : ko[j + 1]]
                    if blk.numel():
                        tl_[b, h, r, slot] = blk.logsumexp(-1).max()
    return tl_


def rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


def check_case(name, kind, sq, sk, D, dtype, perm, strided, cfg, gather, seed):
    gen = torch.Generator().manual_seed(seed)
    B, H = 2, 2
    q, k, v = make_inputs(B, H, sq, sk, D, dtype, gen, strided)
    plan = make_plan(kind, B, H, sq, sk, gen, perm)
    plan.validate()
    scale = 1.0 / math.sqrt(D)
    got = triton_block_sparse_attention(
        q, k, v, plan, return_lse=True, return_tile_stats=True, config=cfg, gather=gather
    )
    ref = reference_block_sparse_attention(q, k, v, plan, return_lse=True, return_tile_stats=True)
    o64, lse64 = oracle(q, k, v, plan, scale)
    tl64 = oracle_tile_lse(q, k, plan, scale)
    tol = TOL[dtype]
    errs = {}
    assert got.out.dtype == dtype and got.out.shape == q.shape
    assert torch.isfinite(got.out.float()).all(), "non-finite output"
    empty = ~plan.token_mask().any(-1)
    assert empty.any(), "test plan must contain an empty row"
    assert (got.out[empty] == 0).all(), "empty rows must be zero"
    assert torch.isneginf(got.lse[empty]).all(), "empty rows must have lse -inf"
    errs["out_vs_oracle"] = rel(got.out, o64)
    errs["out_vs_reference"] = rel(got.out, ref.out)
    fin = torch.isfinite(lse64)
    assert torch.equal(torch.isfinite(got.lse), fin), "lse finiteness differs"
    errs["lse_max_abs"] = float((got.lse[fin].double() - lse64[fin]).abs().max())
    tfin = torch.isfinite(tl64)
    assert torch.equal(torch.isfinite(got.tile_lse), tfin), "tile_lse finiteness differs from oracle"
    assert torch.equal(torch.isfinite(ref.tile_lse), tfin), "reference tile_lse finiteness differs"
    errs["reference_tile_lse_abs"] = float((ref.tile_lse[tfin].double() - tl64[tfin]).abs().max()) if tfin.any() else 0.0
    # The kernel's value is an upper bound of the exact one, by at most log 2 (a slot's full run and tail
    # are combined after the kernel); exact where a slot is a single chunk or a single run.
    over = got.tile_lse[tfin].double() - tl64[tfin]
    errs["tile_lse_below"] = float((-over).clamp(min=0).max()) if tfin.any() else 0.0
    errs["tile_lse_over"] = float(over.max()) if tfin.any() else 0.0
    # Without optional outputs the kernel takes other code paths; the output must not change.
    plain = triton_block_sparse_attention(q, k, v, plan, config=cfg, gather=gather)
    assert plain.lse is None and plain.tile_lse is None
    errs["plain_vs_stats"] = rel(plain.out, got.out)
    limits = {
        "out_vs_oracle": tol,
        "out_vs_reference": tol,
        "lse_max_abs": 10 * tol,
        "reference_tile_lse_abs": 10 * tol,
        "tile_lse_below": 10 * tol,
        "tile_lse_over": math.log(2) + 10 * tol,
        "plain_vs_stats": 1e-6 if dtype == torch.float32 else tol,
    }
    bad = {key: (errs[key], limits[key]) for key in errs if not errs[key] <= limits[key]}
    return errs, bad


CASES = []
for seed, (kind, sq, sk, D, dtype, perm, strided, cfg, gather) in enumerate(
    [
        ("fixed16", 37, 37, 64, torch.float32, False, False, KernelConfig(16, 16, 4, 1), "kernel"),
        ("fixed16", 130, 130, 128, torch.float32, True, True, KernelConfig(16, 16, 4, 1), "kernel"),
        ("fixed32x16", 130, 130, 64, torch.float16, True, False, KernelConfig(16, 16, 4, 1), "kernel"),
        ("fixed16x32", 130, 37, 128, torch.bfloat16, False, True, KernelConfig(16, 16, 4, 1), "kernel"),
        ("fixed16", 130, 130, 64, torch.bfloat16, True, True, KernelConfig(16, 16, 4, 1), "copy"),
        ("var", 37, 37, 128, torch.float32, True, False, KernelConfig(16, 16, 4, 1), "kernel"),
        ("var", 130, 130, 64, torch.float32, True, True, KernelConfig(32, 16, 4, 1), "kernel"),
        ("var", 130, 37, 64, torch.float16, False, False, KernelConfig(16, 32, 4, 1), "kernel"),
        ("var", 130, 130, 128, torch.bfloat16, True, True, KernelConfig(16, 16, 4, 1), "copy"),
    ]
):
    name = f"{kind}-q{sq}-k{sk}-d{D}-{str(dtype)[6:]}-perm{int(perm)}-strided{int(strided)}-bm{cfg.block_m}bn{cfg.block_n}-{gather}"
    CASES.append((name, (kind, sq, sk, D, dtype, perm, strided, cfg, gather, 100 + seed)))


def dispatch_case():
    """`block_sparse_attention(backend="auto")` picks the triton backend under the interpreter."""
    gen = torch.Generator().manual_seed(7)
    q, k, v = make_inputs(2, 2, 37, 37, 64, torch.float32, gen, False)
    plan = make_plan("fixed16", 2, 2, 37, 37, gen, True)
    auto = block_sparse_attention(q, k, v, plan)
    ref = reference_block_sparse_attention(q, k, v, plan)
    err = rel(auto.out, ref.out)
    bad = {} if err < 2e-4 else {"auto_vs_reference": (err, 2e-4)}
    return {"auto_vs_reference": err}, bad


def main(argv: list[str]) -> int:
    selected = [(n, a) for n, a in CASES if not argv or any(s in n for s in argv)]
    failures = 0
    todo = [(n, lambda n=n, a=a: check_case(n, *a)) for n, a in selected]
    if not argv or any(s in "dispatch" for s in argv):
        todo.append(("dispatch-auto", dispatch_case))
    for name, fn in todo:
        try:
            errs, bad = fn()
            status = "ok" if not bad else "fail"
            rec = {"case": name, "status": status, "errors": errs, "over_limit": bad}
        except Exception:
            status = "error"
            rec = {"case": name, "status": status, "traceback": traceback.format_exc()}
        failures += status != "ok"
        print(json.dumps(rec, default=str), flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
