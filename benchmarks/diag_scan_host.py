"""Host (CPU) time of a selective-scan call, ours against mamba-ssm: is a step bound by its launches?

The issue's shape (batch 1, dim 5120, N 16, bf16, z gate, softplus), (batch, dim, L) memory. The GPU is first given
a long sleep kernel, so the host enqueues every timed call without waiting for the GPU; host time per call = CPU wall
time of the loop / calls. Compared with the GPU time per call (do_bench), it says whether the benchmark's time can
include idle GPU time. With --cprofile, the host functions of ours' forward + backward by cumulative time.

    python benchmarks/diag_scan_host.py [--lengths 2048] [--calls 30] [--cprofile] [--out DIR]
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
sys.path.insert(0, str(REPO_ROOT / "benchmarks"))

import torch  # noqa: E402

from bench_gpu_selective_scan import leaves, make_inputs, ours, selective_scan_fn, theirs  # noqa: E402


def host_us(call, calls):
    for _ in range(3):
        call()
    torch.cuda.synchronize()
    torch.cuda._sleep(int(2e9))  # ~1 s of GPU time: the host runs ahead
    start = time.perf_counter()
    for _ in range(calls):
        call()
    elapsed = time.perf_counter() - start
    torch.cuda.synchronize()
    return elapsed / calls * 1e6


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[2048])
    parser.add_argument("--calls", type=int, default=30)
    parser.add_argument("--cprofile", action="store_true")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    report = {}
    for length in args.lengths:
        t = make_inputs(1, 5120, length, 16, requires_grad=True)
        grad = torch.randn_like(t["u"])
        impls = {"ours": ours}
        if selective_scan_fn is not None:
            impls["mamba_ssm"] = theirs
        for name, fn in impls.items():
            def fwd():
                with torch.no_grad():
                    fn(t)

            def step():
                torch.autograd.grad(fn(t), leaves(t), grad)

            row = dict(fwd_host_us=host_us(fwd, args.calls), step_host_us=host_us(step, args.calls))
            report[f"L{length}/{name}"] = row
            print(f"L {length} {name}: host {row['fwd_host_us']:.1f} us per forward, {row['step_host_us']:.1f} us per "
                  f"forward + backward", flush=True)
            if args.cprofile and name == "ours":
                torch.cuda._sleep(int(2e9))
                profiler = cProfile.Profile()
                profiler.enable()
                for _ in range(args.calls):
                    step()
                profiler.disable()
                torch.cuda.synchronize()
                text = io.StringIO()
                pstats.Stats(profiler, stream=text).sort_stats("cumulative").print_stats(28)
                print(text.getvalue(), flush=True)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "diag_scan_host.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
