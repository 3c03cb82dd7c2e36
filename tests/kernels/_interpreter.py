"""Running a kernel check under TRITON_INTERPRET=1 in a fresh Python process (the interpreter must be on
before triton is imported, which a pytest process that already imported it cannot promise)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def run_interpreted(code: str, expect: str, timeout: int = 300) -> None:
    """Run `code` (repository root as working directory) under the interpreter; fail unless it exits 0 and
    prints `expect`."""
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=timeout,
                         cwd=ROOT)
    assert out.returncode == 0 and expect in out.stdout, out.stdout[-1000:] + out.stderr[-3000:]
