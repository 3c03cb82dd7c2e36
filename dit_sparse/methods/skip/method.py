"""`SkipCache` ("skip"): skip key tiles whose attention mass stayed provably negligible.

A wrapper method: it refines the plan of a base method (``"full+skip"``, ``"window3d+skip"``,
``"semantic+skip"``). Per (layer, CFG branch, batch, head, query range) it keeps a bit-packed set of key
ranges to leave out. After every sparse call it reads the executor's statistics and bounds, for every row
r of query range i and key range j,

    mass_r(i, j) = sum_{t in j} exp(s_rt - lse_r) <= exp(tile_lse(i, j) - min_{r in i} lse_r)

where `tile_lse` is the largest row log-sum-exp of the (i, j) tile, log sum_{t in j} exp(s_rt) maximised
over the rows r of i (the executor computes it with the attention: `AttentionResult.tile_lse`), and `lse`
the rows' final log-sum-exp of the executed plan. Leaving tiles out only lowers the LSE, so a bound taken
from a sparser call is still a bound against the full base plan (and against dense attention). Per query range, tiles are added to the
skip set greedily, smallest bound first, while the summed bounds of the skipped tiles stay below `tol`:
the total skipped mass of every row is bounded, and the decision does not depend on visit order.

Decisions are revocable: each call a rotating share of the query ranges (one in `recheck_every`) is
computed over the full base plan and decided afresh, so every skip is re-verified at least once every
`recheck_every` calls. `max_skip` caps the share of each row's base tiles that may be skipped. See
docs/tile-skip.md for the bound, the memory math and what `sparsity` means for ``"X+skip"``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from dit_sparse.config import ConfigError
from dit_sparse.context import AttentionContext
from dit_sparse.kernels.result import AttentionResult
from dit_sparse.method import SparseMethod, register_method
from dit_sparse.plan import BlockPlan
from dit_sparse.warn import WarnOnce

from .cache import SkipState, greedy_skips, pack_bits, range_hashes, tile_log_bounds, unpack_bits
from .calibration import load_calibration

Tensor = torch.Tensor

_MAX_CHUNK_ELEMS = 1 << 24  # bounds the transient [rows, MAXK] tensors of the greedy update


# ---------------------------------------------------------------------------------------------- config
@dataclass(frozen=True)
class SkipConfig:
    """Options of the "skip" wrapper.

    tol: bound on the attention mass each query row may lose to skipped tiles (0 disables skipping).
    recheck_every: every query range is recomputed over the full base plan at least once per this many
        calls (0 = never re-verify, as LiteAttention; 1 = recompute everything every call).
    max_skip: cap on the share of each query range's base tiles that may be skipped, in [0, 1).
    drift_threshold: for base plans whose ranges can change membership (a token order or variable
        ranges): ranges whose set of tokens changed since the previous call lose their cached skips (rows
        and columns); a (batch, head) where more than this share of query or key ranges changed drops its
        whole cache.
    calibration: JSON file from `calibrate_skip` (dit_sparse.methods.skip.calibrate) giving `tol` per layer.
    update_every: the cache learns (the call runs with LSE and tile statistics, i.e. on the Triton kernel, and
        re-checks its rotating share of query ranges) on every this-many-th call of a layer and branch; the
        calls in between run the base plan minus the cached skips without statistics, on the fastest
        kernel (flash-attn-4 where it runs), reusing the same plan object while nothing changed. 1 (the
        default): every call learns. Re-checks then come every `recheck_every` learning calls.
    max_idle_interval: while the cache holds no skip at all (nothing to re-verify), the interval between
        learning calls doubles after each learning call, from `update_every` up to this many calls, and the
        calls in between run the base plan itself; the first learning call that caches a skip restores
        `update_every`. Learning needs the slower statistics kernel, so content where nothing is
        negligible costs one such call in this many instead of every call. 1 = always `update_every`.
    """

    tol: float = 0.02
    recheck_every: int = 4
    update_every: int = 1
    max_idle_interval: int = 16
    max_skip: float = 0.9
    drift_threshold: float = 0.2
    calibration: str | None = None

    def __post_init__(self) -> None:
        if not (isinstance(self.tol, (int, float)) and 0.0 <= self.tol < 1.0):
            raise ConfigError(f"skip: tol must lie in [0, 1) (e.g. 0.02), got {self.tol!r}")
        if not (isinstance(self.recheck_every, int) and self.recheck_every >= 0):
            raise ConfigError(f"skip: recheck_every must be an integer >= 0 (0 = never), got {self.recheck_every!r}")
        if not (isinstance(self.update_every, int) and self.update_every >= 1):
            raise ConfigError(f"skip: update_every must be an integer >= 1 (1 = every call), got {self.update_every!r}")
        if not (isinstance(self.max_idle_interval, int) and self.max_idle_interval >= 1):
            raise ConfigError("skip: max_idle_interval must be an integer >= 1 (1 = never back off), got "
                              f"{self.max_idle_interval!r}")
        if not (isinstance(self.max_skip, (int, float)) and 0.0 <= self.max_skip < 1.0):
            raise ConfigError(f"skip: max_skip must lie in [0, 1), got {self.max_skip!r}")
        if not (isinstance(self.drift_threshold, (int, float)) and 0.0 <= self.drift_threshold <= 1.0):
            raise ConfigError(f"skip: drift_threshold must lie in [0, 1], got {self.drift_threshold!r}")
        if self.calibration is not None and not isinstance(self.calibration, str):
            raise ConfigError(f"skip: calibration must be a path to a JSON file, got {self.calibration!r}")


# ---------------------------------------------------------------------------------------------- method
@register_method
class SkipCache(SparseMethod):
    """Cross-step cache of negligible key tiles, refining any base method's plan (name "skip").

    `sparsity` goes to the base method; skipping adds on top of it, limited by `tol` and `max_skip`.
    """

    name = "skip"
    Config = SkipConfig
    State = SkipState
    wraps = True
    needs_lse = True
    needs_tile_stats = True

    def __init__(self, sparsity: float, options: SkipConfig, base: SparseMethod | None = None) -> None:
        super().__init__(sparsity, options, base)
        self.calibration = None
        if options.calibration is not None:
            self.calibration = load_calibration(options.calibration)
        self._stats: dict[str, list[Tensor]] = {}
        self._warn_once = WarnOnce("dit-sparse skip: ", stacklevel=3)

    # -------------------------------------------------------------------- configuration
    def bind_model(self, model: torch.nn.Module, layer_names: list[str] | None = None) -> None:
        """Check a loaded calibration against the model it is applied to (clear error on mismatch).

        Meant to be called once by `apply` for each method of the chain that defines it.
        """
        if self.calibration is not None:
            self.calibration.check_model(type(model).__name__, layer_names)

    def tol_for(self, layer_name: str) -> float:
        """Tolerance of one layer: from the calibration file when given, else `options.tol`."""
        if self.calibration is None:
            return float(self.options.tol)
        tol = self.calibration.tol_for(layer_name)
        if tol is None:
            self._warn_once(f"layer {layer_name!r} is not in calibration file {self.options.calibration!r}; "
                            f"using tol={self.options.tol}")
            return float(self.options.tol)
        return tol

    # -------------------------------------------------------------------- method interface
    def plan(self, q: Tensor, k: Tensor, v: Tensor, ctx: AttentionContext) -> BlockPlan | None:
        assert self.base is not None
        base_plan = self.base.plan(q, k, v, ctx)
        if base_plan is None:
            return None
        state: SkipState = self.state_of(ctx)
        return self.refine(base_plan, state, self.tol_for(ctx.layer_name), ctx.layer_name)

    def stats_wanted(self, ctx: AttentionContext) -> tuple[bool, bool]:
        """LSE and tile statistics only on the calls whose result teaches the cache (`update_every`)."""
        lse, tiles = self.base.stats_wanted(ctx) if self.base is not None else (False, False)
        learning = self.state_of(ctx).pending is not None
        return lse or learning, tiles or learning

    def observe(self, ctx: AttentionContext, plan: BlockPlan, result: AttentionResult) -> None:
        super().observe(ctx, plan, result)
        self.update(self.state_of(ctx), plan, result)

    # -------------------------------------------------------------------- the cache
    def refine(self, base_plan: BlockPlan, state: SkipState, tol: float, layer_name: str | None = None
               ) -> BlockPlan:
        """The plan to execute this call: `base_plan` minus the cached skips (rows due for recheck intact).

        Leaves what `update` needs in `state.pending`; `update` must see the result of the returned plan.
        Skipped-tile statistics are counted under `layer_name` unless it is None.
        """
        opts = self.options
        B, H, NQ, NK = base_plan.batch, base_plan.heads, base_plan.num_q_blocks, base_plan.num_k_blocks
        call = state.calls
        state.calls += 1
        state.pending = None
        if tol <= 0.0:
            self._count(layer_name, base_plan.kv_counts, base_plan.kv_counts)
            return base_plan
        self._sync(state, base_plan, (B, H, NQ, NK, base_plan.kv_counts.device))
        base_counts = base_plan.kv_counts
        cap = torch.floor(base_counts.float() * opts.max_skip).to(torch.int32)
        first = state.bits is None  # first sparse call (or after invalidation): the full base plan fills the cache
        learning = first or call >= state.next_update
        empty = state.empty.peek()  # True once the last learning call is known to have cached no skip (never first)
        if learning:
            idle = empty is True and opts.max_idle_interval > opts.update_every
            state.interval = min(2 * state.interval, opts.max_idle_interval) if idle else opts.update_every
            state.next_update = call + state.interval
        if first or empty is True:  # nothing cached: the base plan is the plan (no new plan object to prepare)
            if learning:  # every row runs its whole base row, as a re-check would
                state.updates += 1
                state.pending = {"tol": tol, "cap_left": cap}
            self._count(layer_name, base_counts, base_counts)
            return base_plan
        if not learning and state.executed is not None:
            base, version, executed = state.executed
            if base is base_plan and version == state.version:  # nothing changed: the same plan object
                self._count(layer_name, base_counts, executed.kv_counts)
                return executed
        base_mask = base_plan.block_mask()
        skip = unpack_bits(state.bits, NK)
        kept = base_mask & ~skip
        kept_counts = kept.sum(-1, dtype=torch.int32)
        skipped = base_counts - kept_counts
        # The base plan may change between calls (e.g. semantic): a row whose old skips now exceed the cap
        # or remove every base tile is computed over its whole base row instead (and, on a learning call,
        # decided afresh).
        forced = (skipped > cap) | ((kept_counts == 0) & (base_counts > 0))
        if not learning:
            exec_plan = base_plan.with_mask(torch.where(forced[..., None], base_mask, kept))
            state.executed = (base_plan, state.version, exec_plan)
            self._count(layer_name, base_counts, exec_plan.kv_counts)
            return exec_plan
        q_idx = torch.arange(NQ, device=base_counts.device)
        if opts.recheck_every > 0:
            forced = forced | ((q_idx + state.updates) % opts.recheck_every == 0)
        state.updates += 1
        exec_mask = torch.where(forced[..., None], base_mask, kept)
        state.bits = pack_bits(skip & ~forced[..., None])
        state.version += 1
        state.budget = torch.where(forced, torch.zeros_like(state.budget), state.budget)
        skipped = torch.where(forced, torch.zeros_like(skipped), skipped)
        state.pending = {"tol": tol, "cap_left": (cap - skipped).clamp_min(0)}
        exec_counts = torch.where(forced, base_counts, kept_counts)
        self._count(layer_name, base_counts, exec_counts)
        return base_plan.with_mask(exec_mask)

    def update(self, state: SkipState, plan: BlockPlan, result: AttentionResult) -> None:
        """Add newly negligible tiles of the executed `plan` to the skip set, from `result`'s statistics."""
        pending, state.pending = state.pending, None
        if pending is None:
            return
        if result.lse is None or result.tile_lse is None:
            self._warn_once("the attention backend returned no LSE / tile statistics; nothing is skipped")
            return
        B, H, NQ, NK = plan.batch, plan.heads, plan.num_q_blocks, plan.num_k_blocks
        dev = plan.kv_counts.device
        if state.bits is None:
            state.bits = pack_bits(torch.zeros(B, H, NQ, NK, dtype=torch.bool, device=dev))
            state.budget = torch.zeros(B, H, NQ, dtype=torch.float32, device=dev)
        log_b = tile_log_bounds(plan, result.lse, result.tile_lse)
        maxk = log_b.shape[-1]
        step = max(1, _MAX_CHUNK_ELEMS // max(B * NQ * max(maxk, NK), 1))
        bits, budget = [], []
        for h0 in range(0, H, step):  # head chunks bound the transient sort / scatter memory
            sl = slice(h0, min(H, h0 + step))
            new, added = greedy_skips(
                log_b[:, sl], plan.kv_indices[:, sl], plan.kv_counts[:, sl], state.budget[:, sl],
                pending["tol"], pending["cap_left"][:, sl], NK,
            )
            bits.append(pack_bits(unpack_bits(state.bits[:, sl], NK) | new))
            budget.append(state.budget[:, sl] + added)
        state.bits = torch.cat(bits, 1)
        state.budget = torch.cat(budget, 1)
        state.version += 1
        state.empty.set(~state.bits.bool().any())  # read by later calls once it has reached the host

    def _sync(self, state: SkipState, plan: BlockPlan, shape: tuple) -> None:
        """Drop the cache when the plan's shape changed; forget the skips of ranges whose tokens changed.

        Fixed blocks in natural order cannot change membership. Otherwise (a token order, e.g. semantic's
        clusters, or variable ranges) every range's membership hash is compared with the previous call's:
        a changed query range loses its row of skips, a changed key range its column, and a (batch, head)
        where more than `drift_threshold` of the ranges changed loses everything. All on the device.
        """
        if state.shape != shape:
            state.clear()
            state.shape = shape
        if plan.block_size is not None and plan.q_perm is None and plan.k_perm is None:
            return
        q_hash = plan.cached("skip.q_hash", lambda: range_hashes(plan.q_offsets, plan.q_perm, plan.seq_len_q))
        k_hash = plan.cached("skip.k_hash", lambda: range_hashes(plan.k_offsets, plan.k_perm, plan.seq_len_k))
        if state.q_hash is not None and state.bits is not None:
            moved_q, moved_k = q_hash != state.q_hash, k_hash != state.k_hash  # [B, H, NQ], [B, H, NK]
            stale = torch.maximum(moved_q.float().mean(-1), moved_k.float().mean(-1)) > self.options.drift_threshold
            moved_q = moved_q | stale[..., None]
            keep = ~(moved_q[..., None] | moved_k[:, :, None, :])  # [B, H, NQ, NK]
            state.bits = pack_bits(unpack_bits(state.bits, shape[3]) & keep)
            state.version += 1
            # Skips dropped from a row only lower its true skipped mass: the budget stays an upper bound.
            state.budget = torch.where(moved_q, torch.zeros_like(state.budget), state.budget)
        state.q_hash, state.k_hash = q_hash, k_hash

    # -------------------------------------------------------------------- statistics
    def _count(self, layer_name: str | None, base_counts: Tensor, exec_counts: Tensor) -> None:
        # Device tensors: no host sync on the hot path; `skip_stats` syncs once.
        if layer_name is None:
            return
        skipped = (base_counts - exec_counts).sum()
        total = base_counts.sum()
        entry = self._stats.get(layer_name)
        if entry is None:
            self._stats[layer_name] = [skipped, total]
        else:
            entry[0] = entry[0] + skipped
            entry[1] = entry[1] + total

    def skip_stats(self) -> dict[str, Any]:
        """Share of the base plan's tiles skipped, overall and per layer name, since the last reset."""
        per_layer = {}
        skipped_all = total_all = 0
        for name, (skipped, total) in self._stats.items():
            s, t = int(skipped), int(total)
            per_layer[name] = s / t if t else 0.0
            skipped_all += s
            total_all += t
        return {"skipped_tile_share": skipped_all / total_all if total_all else 0.0, "per_layer": per_layer}

    def reset_stats(self) -> None:
        self._stats.clear()
