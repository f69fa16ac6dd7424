"""Where a graphed Coupled Mamba forward spends its time, and what is alive at the peak of a chunked one.

The fusion benchmark's model (``bench_gpu_coupled_vs_attention.py``: batch 32, hidden 256, 4 layers, bf16, L 500).

- Timeline: one replay of the captured graph per mode (whole sequence, time chunks of each ``--chunks``) under
  torch.profiler. Per mode: wall span of the replay's kernels, the time at least one kernel runs (union of the
  kernels' intervals), the summed kernel time, the gaps (span - union), and per kernel name its count and time.
- Memory: the eager chunked forward (``--memory-chunk``) with the allocator's history recorded; the allocations alive
  at its peak, grouped by the innermost frame in this package that made them (file:line function).

    python benchmarks/diag_coupled_timeline.py [--length 500] [--chunks 100 167] [--memory-chunk 100] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import torch  # noqa: E402

from benchmarks.diag_coupled_chunk_modes import fusion_model_and_features  # noqa: E402
from multimodal_mamba import ssm_backend  # noqa: E402


def kernel_events(call):
    """The CUDA kernels of one ``call()`` as (name, start_us, duration_us, stream)."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        call()
        torch.cuda.synchronize()
    with tempfile.NamedTemporaryFile(suffix=".json") as handle:
        prof.export_chrome_trace(handle.name)
        trace = json.loads(Path(handle.name).read_text())
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    return [(e["name"], float(e["ts"]), float(e.get("dur", 0.0)), e.get("args", {}).get("stream"))
            for e in events if e.get("cat") == "kernel"]


def summarize(kernels):
    if not kernels:
        return {"kernels": 0}
    kernels = sorted(kernels, key=lambda k: k[1])
    start = kernels[0][1]
    end = max(k[1] + k[2] for k in kernels)
    union, cover_end = 0.0, start
    for _, begin, duration, _ in kernels:  # union of intervals, sorted by start
        finish = begin + duration
        if finish > cover_end:
            union += finish - max(begin, cover_end)
            cover_end = finish
    by_name = defaultdict(lambda: [0, 0.0])
    by_stream = defaultdict(float)
    for name, _, duration, stream in kernels:
        by_name[name[:80]][0] += 1
        by_name[name[:80]][1] += duration
        by_stream[str(stream)] += duration
    return {
        "kernels": len(kernels),
        "span_us": round(end - start, 1),
        "busy_us": round(union, 1),
        "gaps_us": round(end - start - union, 1),
        "kernel_sum_us": round(sum(k[2] for k in kernels), 1),
        "by_stream_us": {s: round(v, 1) for s, v in by_stream.items()},
        "by_name": [{"name": n, "count": c, "us": round(us, 1), "mean_us": round(us / c, 2)}
                    for n, (c, us) in sorted(by_name.items(), key=lambda kv: -kv[1][1])[:30]],
        "sequence": [(n[:40], round(b - start, 1), round(d, 1), s) for n, b, d, s in kernels],
    }


def live_at_peak(snapshot, package="multimodal_mamba"):
    """Replay the allocator trace: the peak of live bytes and the live blocks at it, grouped by their innermost
    frame inside ``package``."""
    live, total, peak, peak_set = {}, 0, 0, {}
    for device_trace in snapshot["device_traces"]:
        for event in device_trace:
            action = event["action"]
            if action == "alloc":
                live[event["addr"]] = event
                total += event["size"]
                if total > peak:
                    peak, peak_set = total, dict(live)
            elif action in ("free_requested", "free_completed") and event["addr"] in live:
                total -= live.pop(event["addr"])["size"]  # at the request (the completion finds it gone)
    groups = defaultdict(lambda: [0, 0])
    for event in peak_set.values():
        where = "?"
        for frame in event.get("frames", []):
            if package in frame["filename"]:
                where = f"{Path(frame['filename']).name}:{frame['line']} {frame['name']}"
                break
        groups[where][0] += 1
        groups[where][1] += event["size"]
    return {
        "peak_MiB": round(peak / 2**20, 2),
        "groups": [{"where": w, "blocks": c, "MiB": round(b / 2**20, 2)}
                   for w, (c, b) in sorted(groups.items(), key=lambda kv: -kv[1][1])],
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--length", type=int, default=500)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--chunks", type=int, nargs="+", default=[100, 167])
    parser.add_argument("--memory-chunk", type=int, nargs="+", default=[100])
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    model, feats = fusion_model_and_features(args.batch, args.length)
    config = model.config
    result = {"length": args.length, "batch": args.batch, "timeline": {}, "memory": {}}
    with ssm_backend("triton"), torch.no_grad():
        for chunk in [None] + args.chunks:
            config.inference_chunk_size, config.inference_cuda_graphs = chunk, True
            for _ in range(3):  # capture, then replays
                model(feats, return_last_hidden_state=False)
            summary = summarize(kernel_events(lambda: model(feats, return_last_hidden_state=False)))
            key = "whole" if chunk is None else f"chunk {chunk}"
            result["timeline"][key] = summary
            print(key, {k: v for k, v in summary.items() if k not in ("by_name", "sequence")}, flush=True)
            for row in summary.get("by_name", [])[:12]:
                print("   ", row, flush=True)
            model._forward_graphs.clear()
        config.inference_cuda_graphs = False
        for chunk in args.memory_chunk:
            config.inference_chunk_size = chunk
            model(feats, return_last_hidden_state=False)  # warm
            torch.cuda.synchronize()
            torch.cuda.memory._record_memory_history(max_entries=200000)
            model(feats, return_last_hidden_state=False)
            torch.cuda.synchronize()
            snapshot = torch.cuda.memory._snapshot()
            torch.cuda.memory._record_memory_history(enabled=None)
            peak = live_at_peak(snapshot)
            result["memory"][f"eager chunk {chunk}"] = peak
            print(f"eager chunk {chunk}: peak of this forward's allocations {peak['peak_MiB']} MiB", flush=True)
            for row in peak["groups"][:25]:
                print("   ", row, flush=True)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "coupled_timeline.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
