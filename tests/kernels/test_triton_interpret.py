"""The Triton kernels on CPU: every case of _triton_interpret_cases.py, run under TRITON_INTERPRET=1 in a
subprocess (the interpreter must be on before triton is imported, which this pytest process cannot
promise), compared with the reference executor and a float64 masked-softmax oracle."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import NamedTuple

import pytest
import torch

pytest.importorskip("triton")

HERE = Path(__file__).resolve().parent


class InterpreterRun(NamedTuple):
    records: list[dict]  # one per case, as the script printed them
    returncode: int  # 0 when every case passed, 1 when one failed; anything else: the script broke
    stderr: str


@pytest.fixture(scope="module")
def interpreted_run() -> InterpreterRun:
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run(
        [sys.executable, str(HERE / "_triton_interpret_cases.py")],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
        cwd=HERE.parents[1],
    )
    records = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert records, (f"no results from the interpreter run (exit status {proc.returncode}):\n"
                     f"{proc.stdout}\n{proc.stderr}")
    return InterpreterRun(records, proc.returncode, proc.stderr)


def test_all_interpreted_cases_pass(interpreted_run: InterpreterRun) -> None:
    failed = [r for r in interpreted_run.records if r["status"] != "ok"]
    assert not failed, json.dumps(failed, indent=1)
    # Every reported case passed, so a non-zero exit is a failure outside them (a crash, a case that
    # never reported, an error on the way out).
    assert interpreted_run.returncode == 0, (
        f"the interpreter run exited with status {interpreted_run.returncode} although every reported "
        f"case passed:\n{interpreted_run.stderr[-6000:]}"
    )


def test_cases_cover_paths(interpreted_run: InterpreterRun) -> None:
    names = " ".join(r["case"] for r in interpreted_run.records)
    for part in ("fixed16-", "fixed32x16", "fixed16x32", "var-", "bfloat16", "float16", "float32", "copy", "perm1",
                 "strided1", "d64", "d128", "dispatch-auto"):
        assert part in names, f"no interpreted case covers {part}"


def test_cpu_tensors_go_to_reference_without_interpreter() -> None:
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("this process runs the interpreter")
    from dit_sparse.kernels import block_sparse_attention, triton_backend

    from dit_sparse.plan import BlockPlan

    q = torch.randn(2, 2, 37, 64)
    plan = BlockPlan.dense(2, 2, 37, block_size=16)
    reason = triton_backend.supports(q, plan)
    assert reason is not None and "CUDA" in reason
    out = block_sparse_attention(q, q, q, plan).out  # auto -> reference, no warning needed on CPU
    ref = torch.softmax(q @ q.transpose(-1, -2) / 8.0, -1) @ q
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
