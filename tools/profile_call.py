"""Where the time of a sparse attention call goes: GPU kernels vs host (Python) time, per method (CUDA).

For each method spec, runs whole re-planning cycles of the real `SparseAttentionCore` call on the
Wan2.1-1.3B attention shape (as `dit-sparse bench call` does) and reports:

* host ms per call: wall time to *enqueue* the calls (no synchronisation inside the loop); when it is
  above the GPU time the call is bound by Python/launch overhead, not by the GPU;
* GPU ms per call: the sum of CUDA kernel times under torch.profiler, divided by the calls;
* the heaviest CUDA kernels and host operators (self time), written to $OUT/profile-<method>.txt.

    python tools/profile_call.py --methods "window3d[block=128],semantic,pooled"
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch
from dit_sparse.eval.bench_call import SHAPES, _cycle, _inputs, stepped_call
from torch.profiler import ProfilerActivity, profile

from dit_sparse.methods import split_method_list


def profile_method(spec: str, shape_key: str, steps: int, out_dir: str) -> dict:
    shape = SHAPES[shape_key]
    sets = [_inputs(shape, s) for s in range(2)]
    call = stepped_call(spec, shape, sets, 0.9).call

    cycle = _cycle(spec)
    n = cycle * max(1, -(-steps // cycle))
    for i in range(2 * cycle):
        call(i)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for i in range(n):
        call(i)
    host_ms = (time.perf_counter() - t0) * 1000 / n
    torch.cuda.synchronize()
    wall_ms = (time.perf_counter() - t0) * 1000 / n
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for i in range(n):
            call(i)
        torch.cuda.synchronize()
    events = prof.key_averages()
    gpu_ms = sum(e.self_device_time_total for e in events if e.device_type.name == "CUDA") / 1000 / n
    path = os.path.join(out_dir, f"profile-{spec.replace('[', '_').replace(']', '').replace(',', '_')}.txt")
    with open(path, "w") as f:
        f.write(f"{spec}: host {host_ms:.3f} ms/call, wall {wall_ms:.3f}, GPU {gpu_ms:.3f} (n={n})\n\n")
        f.write(events.table(sort_by="self_cuda_time_total", row_limit=25, max_name_column_width=70))
        f.write("\n\n")
        f.write(events.table(sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=70))
    top = sorted((e for e in events if e.self_device_time_total > 0), key=lambda e: -e.self_device_time_total)[:6]
    return dict(method=spec, host_ms=host_ms, wall_ms=wall_ms, gpu_ms=gpu_ms,
                top=[(e.key[:60], round(e.self_device_time_total / 1000 / n, 3)) for e in top])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--methods", default="window3d[block=128],window3d[block=128,pattern=spatial],semantic,pooled")
    p.add_argument("--shape", default="wan1.3b-480p", choices=list(SHAPES))
    p.add_argument("--steps", type=int, default=10)
    ns = p.parse_args(argv)
    out_dir = os.environ.get("OUT", ".")
    rows = [profile_method(m, ns.shape, ns.steps, out_dir) for m in split_method_list(ns.methods)]
    print(f"\n{torch.cuda.get_device_name()} {ns.shape}: ms per call (host = enqueue time, GPU = kernel time)")
    for r in rows:
        print(f"{r['method']:<42} host {r['host_ms']:7.3f}  wall {r['wall_ms']:7.3f}  GPU {r['gpu_ms']:7.3f}")
        for name, ms in r["top"]:
            print(f"    {ms:7.3f}  {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
