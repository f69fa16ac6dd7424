"""The coupled scan inside the Coupled Mamba model against the same scan timed alone (fusion benchmark's model).

Builds the fusion benchmark's model (batch 32, hidden 256, 4 layers, M 3, N 16, bf16, "mean"), runs no-grad forwards
on the "triton" backend and reports:
1. the profiler's GPU time of one forward, per kernel name (top rows), with the scan kernel's per-call mean, and the
   same with the baseline ``sequential.py`` (``--baseline``) swapped in for the model's scan;
2. the scan call of layer 0 captured with its real tensors (strides, values) and re-timed alone
   (``triton.testing.do_bench``): the whole call, the kernel with B / C packed once, the B / C packing alone, and
   the kernel on contiguous copies of the tensors (whether the layer's strides cost anything); beside each, the
   host's time per call (50 calls launched back to back, no synchronization): where it exceeds the GPU time, the
   call is host-bound and do_bench's number is the host's.

    python benchmarks/diag_coupled_scan_in_model.py [--length 500] [--baseline PATH/sequential.py] [--out DIR]
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import torch  # noqa: E402
from triton.testing import do_bench  # noqa: E402

from benchmarks.bench_gpu_coupled_seq_ab import load_module  # noqa: E402
from benchmarks.bench_gpu_coupled_vs_attention import MODALITIES  # noqa: E402
from multimodal_mamba import CoupledMambaConfig, CoupledMambaModel, ssm_backend  # noqa: E402
from multimodal_mamba.kernels.coupled_scan import fused  # noqa: E402


def kernel_times(model, feats):
    """{kernel name: [microseconds per launch]} of one no-grad forward (torch.profiler)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    with torch.no_grad(), ssm_backend("triton"):
        for _ in range(3):
            model(feats)
        torch.cuda.synchronize()
        with torch_profile(activities=[ProfilerActivity.CUDA]) as prof:
            model(feats)
            torch.cuda.synchronize()
    times = collections.defaultdict(list)
    for event in prof.events():
        if event.device_type.name == "CUDA":
            times[event.name].append(event.time_range.elapsed_us())
    return times


def host_us(fn, calls=50):
    """Microseconds of host time per call, launching ``calls`` calls without waiting for the GPU."""
    fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    elapsed = time.perf_counter() - start
    torch.cuda.synchronize()
    return elapsed / calls * 1e6


def summarize(label, times, top=12):
    total = sum(sum(v) for v in times.values())
    rows = sorted(times.items(), key=lambda item: -sum(item[1]))[:top]
    print(f"== {label}: {sum(len(v) for v in times.values())} kernels, {total / 1e3:.3f} ms GPU", flush=True)
    for name, values in rows:
        print(f"  {sum(values) / 1e3:8.3f} ms  {len(values):4d} x {sum(values) / len(values):8.1f} us  {name[:90]}",
              flush=True)
    scan = [v for name, values in times.items() if "coupled_seq_fwd" in name for v in values]
    return dict(label=label, gpu_ms=round(total / 1e3, 4), kernels=sum(len(v) for v in times.values()),
                scan_us_per_call=round(sum(scan) / max(1, len(scan)), 1), scan_calls=len(scan),
                top=[dict(name=name[:120], ms=round(sum(v) / 1e3, 4), calls=len(v)) for name, v in rows])


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--length", type=int, default=500)
    parser.add_argument("--baseline", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "benchmarks" / "results")
    args = parser.parse_args()
    torch.manual_seed(0)
    config = CoupledMambaConfig(modality_dims=MODALITIES, hidden_size=256, num_hidden_layers=4, state_size=16,
                                coupling="mean")
    model = CoupledMambaModel(config).to("cuda", torch.bfloat16).eval()
    feats = {n: torch.randn(args.batch, args.length, d, device="cuda", dtype=torch.bfloat16)
             for n, d in MODALITIES.items()}
    this_tree = fused.sequential
    report = dict(length=args.length, batch=args.batch, profiles=[], alone=[])
    variants = [("new", this_tree)]
    if args.baseline:
        variants.append(("baseline", load_module("baseline", args.baseline)))
    for label, module in variants:
        fused.sequential = module
        report["profiles"].append(summarize(f"model forward, scan: {label}", kernel_times(model, feats)))
    fused.sequential = this_tree

    # layer 0's scan call, captured with its tensors
    captured = []
    original = this_tree.coupled_scan_fwd_seq

    def capture(*call_args, **call_kwargs):
        if not captured:
            captured.append((call_args, call_kwargs))
        return original(*call_args, **call_kwargs)

    this_tree.coupled_scan_fwd_seq = capture
    with torch.no_grad(), ssm_backend("triton"):
        model(feats)
    this_tree.coupled_scan_fwd_seq = original
    (us, deltas, zs, A, Bs, Cs, D, bias, softplus, coupling, h0), kwargs = captured[0]

    def describe(tensors):
        return dict(shape=list(tensors[0].shape), stride=list(tensors[0].stride()), dtype=str(tensors[0].dtype))

    layout = dict(u=describe(us), delta=describe(deltas), z=describe(zs), B=describe(Bs),
                  out_given=kwargs.get("out") is not None)
    print(json.dumps(dict(captured_layout=layout)), flush=True)
    report["captured_layout"] = layout
    dense = lambda ts: [t.transpose(1, 2).contiguous().transpose(1, 2) for t in ts]  # noqa: E731
    for label, module in variants:
        packed_B, packed_C = module.prepare_bc(Bs, Cs)

        def run(u_list, z_list, B_list, C_list, out=kwargs.get("out")):
            return module.coupled_scan_fwd_seq(u_list, deltas, z_list, A, B_list, C_list, D, bias, softplus, coupling,
                                               h0, out=out)

        timings = {
            "call (B/C packing included)": lambda: run(us, zs, Bs, Cs),
            "kernel (B/C packed once)": lambda: run(us, zs, packed_B, packed_C),
            "B/C packing alone": lambda: module.prepare_bc(Bs, Cs),
            "kernel, dense z": (lambda zd: lambda: run(us, zd, packed_B, packed_C))(dense(zs)),
        }
        with torch.no_grad():
            for name, fn in timings.items():
                ms = min(do_bench(fn, warmup=10, rep=100, return_mode="median") for _ in range(2))
                row = dict(variant=label, timed=name, us=round(ms * 1e3, 1), host_us=round(host_us(fn), 1))
                report["alone"].append(row)
                print(json.dumps(row), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu_coupled_scan_in_model.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
