"""Where a selective-scan forward + backward spends its GPU time: every kernel of one step, ours against mamba-ssm.

The issue's shape (batch 1, dim 5120, N 16, bf16, z gate, softplus) at the given lengths, (batch, dim, L) memory.
One step = forward, then backward of a fixed upstream gradient; torch.profiler records a few steps after a warm-up
and the script prints, per implementation, each kernel's GPU time per step and the step's total kernel time (the
sum of kernel durations, leaving out gaps between kernels) next to the wall time per step between CUDA events.

    python benchmarks/diag_scan_kernels.py [--lengths 2048] [--steps 5] [--out DIR]

Writes ``diag_scan_kernels.json`` in --out when given.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
sys.path.insert(0, str(REPO_ROOT / "benchmarks"))

import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

from bench_gpu_selective_scan import make_inputs  # noqa: E402
from multimodal_mamba.kernels.selective_scan import fused  # noqa: E402

try:
    from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
except Exception:  # pragma: no cover - depends on the machine
    selective_scan_fn = None


def ours(t):
    return fused.selective_scan_triton(t["u"], t["delta"], t["A"], t["B"], t["C"], t["D"], t["z"], t["delta_bias"],
                                       True)


def mamba_ssm(t):
    return selective_scan_fn(t["u"], t["delta"], t["A"], t["B"], t["C"], t["D"], t["z"], t["delta_bias"], True)


def kernel_times(fn, tensors, grad, steps):
    """{kernel name: GPU us per step}, total kernel us per step, wall us per step (CUDA events)."""
    def step():
        out = fn(tensors)
        out.backward(grad)

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
    per_kernel = defaultdict(float)
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            per_kernel[event.name[:90]] += event.device_time / steps
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(steps * 4):
        step()
    end.record()
    end.synchronize()
    wall_us = start.elapsed_time(end) * 1e3 / (steps * 4)
    return dict(sorted(per_kernel.items(), key=lambda kv: -kv[1])), sum(per_kernel.values()), wall_us


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[2048])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    report = {}
    for length in args.lengths:
        tensors = make_inputs(1, 5120, length, 16, requires_grad=True)
        grad = torch.randn_like(tensors["u"])
        impls = {"ours": ours}
        if selective_scan_fn is not None:
            impls["mamba_ssm"] = mamba_ssm
        for name, fn in impls.items():
            kernels, total, wall = kernel_times(fn, tensors, grad, args.steps)
            report[f"L{length}/{name}"] = dict(kernels_us=kernels, kernel_sum_us=total, wall_us=wall)
            print(f"L {length} {name}: kernel sum {total:.1f} us, wall {wall:.1f} us per forward + backward")
            for kernel, us in kernels.items():
                print(f"    {us:8.1f} us  {kernel}")
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "diag_scan_kernels.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
