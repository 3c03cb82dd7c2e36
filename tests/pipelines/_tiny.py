"""Helpers shared by the adapter tests: tiny random models built from configs, run on the CPU, and the checks
every adapter must pass, written once and called with each family's own expectations."""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass
from functools import partial
from typing import Any

import pytest
import torch
from dit_sparse.pipelines.families import get_adapter

import dit_sparse

BATCH = 2
TEXT = 7  # text tokens: odd on purpose
HEADS = 2
# Every block through the sparse core from the first step and layer, in blocks small enough for tiny sequences.
FULL_PLAN = dict(warmup_steps=0, warmup_layers=0, block_size=16)


def randn(g: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=g)


def seeded_model(build: Callable[[], torch.nn.Module]) -> torch.nn.Module:
    """`build()` with the same random weights every time, in eval mode."""
    torch.manual_seed(0)
    return build().eval()


def run(model, inputs) -> torch.Tensor:
    """The model's first output, without gradients."""
    with torch.no_grad():
        return model(**inputs)[0]


def processors(model) -> dict[str, object]:
    """Every attention processor of the model by module name (Mochi's attention has no set_processor)."""
    return {name: m.processor for name, m in model.named_modules() if hasattr(m, "processor")}


def sparse_names(model) -> set[str]:
    return {name for name, _ in get_adapter(model).self_attention_modules(model)}


def apply_full(target, *, sparsity: float = 0.5, **options) -> dit_sparse.SparseHandle:
    """The "full" plan: every block kept, run by the block-sparse executor, so the output must match dense."""
    return dit_sparse.apply(target, "full", sparsity, **{**FULL_PLAN, **options})


@dataclass
class Family:
    """A tiny model of one family, how to feed it, and the token grid it should report."""

    name: str
    build: Callable[[], torch.nn.Module]
    inputs: Callable[..., dict]  # (model, seed) -> forward kwargs
    grid: tuple[int, int, int]  # (frames, rows, cols) after patching
    text_in_attention: int  # text tokens in the self/joint attention sequence (0: cross-attention model)
    text_first: bool | None
    sparse_classes: set[str]
    num_sparse: int = 2  # attention modules made sparse (= core calls per forward)
    own_warning: str | None = None  # a warning the model gives by itself on every forward (a regex)


def case_fixture(families: list, forward: Callable = run):
    """A module's `case` fixture, one per family and built once per module: (family, its seeded model, inputs
    of seed 1, the dense output). Assign it to a module attribute: `case = case_fixture(FAMILIES)`."""

    @pytest.fixture(scope="module", params=families, ids=[f.name for f in families], name="case")
    def case(request):
        family = request.param
        model = seeded_model(family.build)
        inputs = family.inputs(model, seed=1)
        return family, model, inputs, forward(model, inputs)

    return case


def image_ids(rows: int, cols: int, axes: int, t: int = 0) -> torch.Tensor:
    """Flux-style position ids of a rows x cols image, row by row: (t, row, col, 0...) per token."""
    ids = torch.zeros(rows, cols, axes)
    ids[..., 0] = t
    ids[..., 1] = torch.arange(rows)[:, None]
    ids[..., 2] = torch.arange(cols)[None, :]
    return ids.reshape(rows * cols, axes)


# ---------------------------------------------------------------------------------------------- comparisons
def _tensors(x) -> tuple[torch.Tensor, ...]:
    return (x,) if isinstance(x, torch.Tensor) else tuple(x)


def assert_equal(got, expected) -> None:
    """Bitwise equal: tensors, or tuples of them (LTX-2 returns video and audio)."""
    got, expected = _tensors(got), _tensors(expected)
    assert len(got) == len(expected)
    for a, b in zip(got, expected):
        assert torch.equal(a, b)


def assert_close(got, expected) -> None:
    """Equal within 1e-4 (the block executor adds up in another order); tensors, or nested tuples and lists."""
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------------------------------------- sparse runs
@contextlib.contextmanager
def warnings_fail(allowed: str | None = None) -> Iterator[None]:
    """Every warning raises: dit-sparse warns on each dense fallback, so none can pass unnoticed.

    `allowed` (a message regex) exempts a warning the model gives by itself: Mochi's RoPE asks for float32 CPU
    autocast on every forward, which torch declines with a warning.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        if allowed is not None:
            warnings.filterwarnings("ignore", message=allowed)
        yield


@dataclass
class AttendCall:
    """One call of a sparse core's `attend`, and what the step tracker said while it ran."""

    expert: str
    layer_name: str | None
    q: torch.Size  # [B, S, H, D]
    k: torch.Size
    text_first: bool | None
    layout: Any
    step: int
    branch: str


def record_attend(handle) -> list[AttendCall]:
    """Wrap every expert core's `attend` to record each call; the calls still go through."""
    calls: list[AttendCall] = []
    for name, expert in handle.experts.items():
        def recording(query, key, value, _name=name, _expert=expert, _attend=expert.core.attend, **kw):
            tracker = _expert.tracker
            calls.append(AttendCall(_name, kw.get("layer_name"), query.shape, key.shape, kw.get("text_first"),
                                    tracker.layout, tracker.step, tracker.branch))
            return _attend(query, key, value, **kw)

        expert.core.attend = recording
    return calls


@dataclass
class SparseRun:
    output: Any
    stats: dict
    calls: list[AttendCall]


def sparse_run(handle, call: Callable[[], Any], *, allowed_warning: str | None = None,
               undo: Callable[[], None] | None = None) -> SparseRun:
    """`call()` once under an applied `handle`, no warning allowed, then undone (`handle.remove()` unless
    `undo` says how the test takes sparse attention off)."""
    calls = record_attend(handle)
    try:
        with warnings_fail(allowed_warning):
            output = call()
        stats = handle.stats()
    finally:
        (undo or handle.remove)()
    return SparseRun(output, stats, calls)


# ---------------------------------------------------------------------------------------------- adapter checks
def assert_dense_is_bitwise_and_remove_restores(
    model, inputs, reference, sparse: Collection[str], sparse_classes: Collection[str], *,
    methods: tuple[str, ...] = ("dense", "full"), forward: Callable = run, subclass_original: bool = False,
) -> None:
    """At sparsity 0 every method reproduces Diffusers bit for bit; only the `sparse` modules get a processor of
    `sparse_classes` (with `subclass_original`: one still an instance of the Diffusers class it replaces); the
    others keep their very processor object; `remove` puts back every original object."""
    before = processors(model)
    for method in methods:
        handle = dit_sparse.apply(model, method, 0.0)
        for name, proc in processors(model).items():
            if name in sparse:
                assert type(proc).__name__ in sparse_classes
                if subclass_original:
                    assert isinstance(proc, type(before[name]))
            else:  # cross-attention, text refiners, audio attention keep their processor object
                assert proc is before[name]
        assert_equal(forward(model, inputs), reference)
        dit_sparse.remove(model)
        assert not handle.active
        after = processors(model)
        assert after.keys() == before.keys()
        assert all(after[n] is before[n] for n in before)
        assert_equal(forward(model, inputs), reference)


def assert_full_plan_matches_dense(model, inputs, reference, sparse_calls: int, *, forward: Callable = run,
                                   allowed_warning: str | None = None, **options) -> SparseRun:
    """The full plan: `sparse_calls` core calls, none dense (so no fallback), and the dense output."""
    result = sparse_run(apply_full(model, **options), partial(forward, model, inputs), allowed_warning=allowed_warning)
    assert result.stats["sparse_calls"] == sparse_calls and result.stats["dense_calls"] == 0
    assert_close(result.output, reference)
    return result


def assert_layout_accounts_for_every_token(model, inputs, grid: tuple[int, int, int], *, text_tokens: int = 0,
                                           text_first: bool | None = None, forward: Callable = run,
                                           allowed_warning: str | None = None) -> list[AttendCall]:
    """Every core call of a full-plan forward gets [B, S, H, D] queries and keys and the `grid`, whose video
    tokens plus `text_tokens` make up S; the calls are returned for the caller to count or name."""
    calls = sparse_run(apply_full(model), partial(forward, model, inputs), allowed_warning=allowed_warning).calls
    for call in calls:
        assert call.q[0] == BATCH and call.q[2] == HEADS and call.q == call.k
        assert (call.layout.frames, call.layout.rows, call.layout.cols) == grid
        joint = call.layout.with_text(call.q[1], call.text_first)
        assert joint.video_tokens + text_tokens == call.q[1]
        assert joint.text_tokens == text_tokens
        assert call.text_first == text_first
    return calls


def assert_falls_back_to_dense(model, inputs, *, fallback_calls: int = 2, forward: Callable = run) -> None:
    """An attention mask no block plan expresses: every call runs the original dense path, with a warning."""
    reference = forward(model, inputs)
    handle = apply_full(model)
    try:
        with pytest.warns(UserWarning, match="attention mask"):
            out = forward(model, inputs)
        stats = handle.stats()
    finally:
        handle.remove()
    assert_equal(out, reference)
    assert stats["fallback_calls"] == fallback_calls and stats["sparse_calls"] == 0


def assert_padded_inputs_match_in_turn(model, padded: list[dict], references: list, sparse_layers: int = 2) -> None:
    """Inputs with different text padding, in turn under one handle (a stale cached mask would show), with
    no dense layer and with one (`warmup_layers=1`: the original masked call, then the trimmed sparse path)."""
    for warmup_layers in (0, 1):
        result = sparse_run(apply_full(model, warmup_layers=warmup_layers), lambda: [run(model, x) for x in padded])
        assert_close(result.output, references)
        expected = len(padded) * (sparse_layers - warmup_layers)
        assert result.stats["sparse_calls"] == expected and result.stats["fallback_calls"] == 0


def assert_processors_match(model, modules, *args, **kwargs) -> None:
    """Each module's processor on the same arguments, Diffusers' then dit-sparse's under the full plan: every
    output row equal, padded text queries included (their outputs never reach the model output)."""
    with torch.no_grad():
        expected = [m.processor(m, *args, **kwargs) for m in modules]
        with dit_sparse.sparse_attention(model, "full", 0.5, **FULL_PLAN) as handle:
            got = [m.processor(m, *args, **kwargs) for m in modules]
            assert handle.stats()["sparse_calls"] == len(modules)  # one core call per processor call
    assert_close(got, expected)
