"""Where a batch-16 decode step's GPU time goes, from the kernels of its CUDA graph replays (mamba-2.8b shape, bf16,
random weights): torch.profiler (CUPTI) start / end of every kernel of 5 back-to-back replays, per kernel name its
count per step, mean duration and mean "advance" (its end minus the end of the kernel before it: the share of the
step's span that finishes with it; with programmatic dependent launch a kernel's duration includes the time it waited
for the one before, so advance, not duration, is what it adds). Per setting of the fused step's module constants
(``--settings``: name=JSON of ``fused`` attributes, or the defaults below), PDL on and, for the first, off.

    python benchmarks/diag_decode_b16_timeline.py [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT / "benchmarks"))

import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

import bench_gpu_generate as gen  # noqa: E402
from multimodal_mamba.kernels import utils  # noqa: E402
from multimodal_mamba.kernels.decode_step import fused  # noqa: E402

DEFAULT_SETTINGS = {  # main's kernels, then this branch's defaults
    "main": dict(ROWS_EARLY_H=False),
    "early h": dict(ROWS_EARLY_H=True),
}
RESULTS = {}


def short(name):
    for key in ("_add_rms_norm_kernel", "_conv_x_proj_rows_kernel", "_reduce_partials_kernel", "_ssm_step_rows_kernel",
                "_conv_x_proj_kernel", "_ssm_step_kernel"):
        if key in name:
            return key
    return name[:70]


def timeline(model, ids, replays=5):
    model.decode_graphs.clear()
    gen.ours_generate(model, ids, True, 4)
    bucket = next(b for b in model.decode_graphs._buckets.values()
                  if b.graph is not None and b.input_ids.shape[0] >= ids.shape[0])
    for _ in range(20):
        bucket.graph.replay()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(replays):
            bucket.graph.replay()
        torch.cuda.synchronize()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "trace.json"
        prof.export_chrome_trace(str(path))
        events = json.loads(path.read_text())["traceEvents"]
    kernels = sorted((e for e in events if e.get("cat") == "kernel" and e.get("ph") == "X"), key=lambda e: e["ts"])
    stats = defaultdict(lambda: [0, 0.0, 0.0])
    prev_end = None
    for e in kernels:
        end = e["ts"] + e["dur"]
        s = stats[short(e["name"])]
        s[0] += 1
        s[1] += e["dur"]
        if prev_end is not None:
            s[2] += max(0.0, end - prev_end)
        prev_end = max(end, prev_end or end)
    span = (prev_end - kernels[0]["ts"]) / replays
    rows = {name: dict(per_step=round(c / replays, 2), mean_dur_us=round(d / c, 3), mean_advance_us=round(a / c, 3),
                       advance_per_step_us=round(a / replays, 1))
            for name, (c, d, a) in sorted(stats.items(), key=lambda kv: -kv[1][2])}
    return dict(kernels_per_step=round(len(kernels) / replays, 1), span_per_step_us=round(span, 1), kernels=rows)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "benchmarks" / "results")
    parser.add_argument("--settings", nargs="*", default=None, help="name=JSON of fused module attributes")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    settings = dict(DEFAULT_SETTINGS)
    if args.settings:
        settings = {s.split("=", 1)[0]: json.loads(s.split("=", 1)[1]) for s in args.settings}
    args.skip_transformers = True
    _, systems = gen.build_models(args)
    ours = systems["ours"]
    torch.manual_seed(1)
    ids = torch.randint(1, 50000, (16, gen.PROMPT), device="cuda")
    saved = {k: getattr(fused, k) for s in settings.values() for k in s}
    runs = [(name, s, True) for name, s in settings.items()] + [(next(iter(settings)), next(iter(settings.values())),
                                                                False)]
    with torch.no_grad():
        for name, s, pdl in runs:
            for k, v in {**saved, **s}.items():
                setattr(fused, k, tuple(v) if isinstance(v, list) else v)
            utils.PDL = pdl
            utils._PDL_DEVICES.clear()
            label = f"{name}, PDL {'on' if pdl else 'off'}"
            RESULTS[label] = result = timeline(ours, ids)
            print(f"--- {label}: {result['kernels_per_step']} kernels, span {result['span_per_step_us']} us / step",
                  flush=True)
            for kname, row in result["kernels"].items():
                print(f"  {kname:72s} {row['per_step']:6.1f}/step  dur {row['mean_dur_us']:8.2f}  "
                      f"advance {row['mean_advance_us']:8.2f}  ({row['advance_per_step_us']:7.1f} us/step)", flush=True)
            (args.out / "diag_decode_b16_timeline.json").write_text(json.dumps(RESULTS, indent=1))
    utils.PDL = True
    utils._PDL_DEVICES.clear()


if __name__ == "__main__":
    main()
