"""Command-line steps shared by the GPU benchmarks (`bench call`, `bench e2e`): the options they both take,
the CUDA check, running each requested case in turn, and the JSON file of the results."""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Callable

import torch

__all__ = ["add_output_options", "bench_each", "cuda_device_name", "write_results"]


def add_output_options(p: argparse.ArgumentParser, kind: str, no_reorder_help: str) -> None:
    """--no-reorder (help text per benchmark) and --out (default benchmarks/<kind>-<gpu>.json)."""
    p.add_argument("--no-reorder", action="store_true", help=no_reorder_help)
    p.add_argument("--out", default=None, help=f"JSON path (default benchmarks/{kind}-<gpu>.json)")


def cuda_device_name(prog: str, need: str = "") -> str | None:
    """The CUDA GPU's name, or None after printing that `prog` needs one (`need` says why, e.g.
    " (real model sizes)")."""
    if not torch.cuda.is_available():
        print(f"{prog}: needs a CUDA GPU{need}; none is available here")
        return None
    return torch.cuda.get_device_name()


def bench_each(
    keys: str, choices: list[str], what: str, bench: Callable[[str], list[dict]]
) -> list[dict] | None:
    """The rows of `bench(key)` for each comma-separated key in turn, the last row of each printed as a JSON
    line as soon as it is measured (a long run shows progress); None, after saying so, at the first key that
    is not one of `choices` (the cases before it have run)."""
    rows: list[dict] = []
    for key in keys.split(","):
        if key not in choices:
            print(f"unknown {what} {key!r}; choose from {choices}")
            return None
        rows += bench(key)
        print(json.dumps(rows[-1]), flush=True)
    return rows


def write_results(out: str | None, kind: str, device: str, fields: dict) -> str:
    """Write {"device", "torch", **fields} as JSON to `out`, by default benchmarks/<kind>-<gpu name>.json
    (folders created as needed); returns the path written."""
    out = out or os.path.join("benchmarks", f"{kind}-{device.replace(' ', '_')}.json")
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    with open(out, "w") as f:
        json.dump({"device": device, "torch": torch.__version__, **fields}, f, indent=1)
    return out
