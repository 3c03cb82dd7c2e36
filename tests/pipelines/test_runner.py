"""The timed-generation harness shared by `generate` and `eval` (pipelines/runner.py)."""

from __future__ import annotations

import torch
from dit_sparse.pipelines.runner import RunSettings, warm_steps

CPU, CUDA = torch.device("cpu"), torch.device("cuda")  # only the device type is read: no GPU needed


def test_the_gpu_warm_run_reaches_two_sparse_steps_when_comparing():
    # 30 steps, 20% dense: steps 0-5 dense, so the warm run needs 8 steps to run two sparse ones.
    assert warm_steps(RunSettings(steps=30, warmup_steps=0.2), CUDA, through_sparse=True) == 8
    assert warm_steps(RunSettings(steps=30, warmup_steps=0.3), CUDA, through_sparse=True) == 11
    assert warm_steps(RunSettings(steps=30, warmup_steps=5), CUDA, through_sparse=True) == 7  # a count of steps
    assert warm_steps(RunSettings(steps=3, warmup_steps=0.2), CUDA, through_sparse=True) == 3  # never past the run
    assert warm_steps(RunSettings(steps=30, warmup_steps=0.0), CUDA, through_sparse=True) == 2


def test_the_warm_run_stays_short_on_cpus_and_for_plain_generation():
    assert warm_steps(RunSettings(steps=30, warmup_steps=0.3), CPU, through_sparse=True) == 1
    assert warm_steps(RunSettings(steps=30, warmup_steps=0.3), CUDA, through_sparse=False) == 2
