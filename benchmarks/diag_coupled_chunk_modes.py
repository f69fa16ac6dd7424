"""Coupled Mamba inference modes at one length against cross-attention: whole or in time chunks, eager or as a CUDA
graph, with or without the modalities' branches on concurrent streams in the graph, returning the final states or
the fused vector only.

The fusion benchmark's models (``bench_gpu_coupled_vs_attention.py``: batch 32, hidden 256, 4 layers, bf16). For each
mode: wall time (median of 7, after a first call that captures where graphed) and peak memory of the first call above
weights and inputs (as the benchmark measures), with the ratios attention / mode. ``branches off`` patches
``capture_branches`` out, so the graph is captured on one stream as before. Also the kernel count and GPU time of
one eager chunked forward (torch.profiler), grouped by kernel name.

    python benchmarks/diag_coupled_chunk_modes.py [--length 500] [--chunks 64 84 100 125 167] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import torch  # noqa: E402

from benchmarks.bench_gpu_coupled_vs_attention import MODALITIES, CrossAttentionFusion  # noqa: E402
from multimodal_mamba import CoupledMambaConfig, CoupledMambaModel, ssm_backend  # noqa: E402
from multimodal_mamba.modeling import modeling_coupled_mamba  # noqa: E402


def timed(call, repeats=7):
    """(median wall seconds of ``call()`` after a first call, peak bytes of that first call above what was allocated
    before it)."""
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    with torch.no_grad():
        call()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            call()
            torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2], peak


def coupled_mode(model, feats, chunk, graphs, keep_last, branches):
    config = model.config
    config.inference_chunk_size, config.inference_cuda_graphs = chunk, graphs
    original = modeling_coupled_mamba.capture_branches
    if not branches:
        modeling_coupled_mamba.capture_branches = lambda tensor, count: None
    try:
        seconds, peak = timed(lambda: model(feats, return_last_hidden_state=keep_last))
        captured = len(model._forward_graphs)
    finally:
        modeling_coupled_mamba.capture_branches = original
        config.inference_chunk_size, config.inference_cuda_graphs = None, False
        model._forward_graphs.clear()
        torch.cuda.empty_cache()
    if graphs and captured != 1:
        raise RuntimeError(f"the graphed forward did not capture ({captured} graphs)")
    return seconds, peak


def kernel_profile(model, feats, chunk):
    from torch.profiler import ProfilerActivity, profile

    model.config.inference_chunk_size = chunk
    try:
        with torch.no_grad():
            model(feats, return_last_hidden_state=False)
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                model(feats, return_last_hidden_state=False)
                torch.cuda.synchronize()
    finally:
        model.config.inference_chunk_size = None
    groups = defaultdict(lambda: [0, 0.0])
    for event in prof.events():
        if event.device_type.name == "CUDA":
            groups[event.name[:70]][0] += 1
            groups[event.name[:70]][1] += event.time_range.elapsed_us()
    top = sorted(groups.items(), key=lambda kv: -kv[1][1])
    return {
        "kernels": sum(count for count, _ in groups.values()),
        "gpu_ms": sum(us for _, us in groups.values()) / 1e3,
        "by_name": [{"name": name, "count": count, "us": round(us, 1)} for name, (count, us) in top[:25]],
    }


def fusion_model_and_features(batch, length, dtype=torch.bfloat16):
    """The fusion benchmark's Coupled Mamba model (hidden 256, 4 layers, state 16, "mean") on CUDA in eval mode, and
    random (batch, length, dim) features of its three modalities."""
    config = CoupledMambaConfig(modality_dims=MODALITIES, hidden_size=256, num_hidden_layers=4, state_size=16,
                                coupling="mean")
    torch.manual_seed(0)
    model = CoupledMambaModel(config).to("cuda", dtype).eval()
    feats = {n: torch.randn(batch, length, d, device="cuda", dtype=dtype) for n, d in MODALITIES.items()}
    return model, feats


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--length", type=int, default=500)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--chunks", type=int, nargs="+", default=[64, 84, 100, 125, 167])
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    dtype = torch.bfloat16
    coupled, feats = fusion_model_and_features(args.batch, args.length, dtype)
    attention = CrossAttentionFusion(MODALITIES, 256, 4, 8, False).to("cuda", dtype).eval()
    rows = []

    def record(mode, seconds, peak):
        row = {"mode": mode, "ms": round(seconds * 1e3, 3), "MiB": round(peak / 2**20, 1)}
        rows.append(row)
        print(json.dumps(row), flush=True)

    with ssm_backend("triton"):
        for chunk in [None] + args.chunks:  # warm every shape's kernels first (compilation stays out of the peaks)
            coupled_mode(coupled, feats, chunk, False, False, True)
        record("attention", *timed(lambda: attention(feats)))
        for keep_last in (True, False):
            record(f"whole eager keep_last={keep_last}", *coupled_mode(coupled, feats, None, False, keep_last, True))
        for branches in (False, True):
            for keep_last in (True, False):
                record(f"whole graph branches={branches} keep_last={keep_last}",
                       *coupled_mode(coupled, feats, None, True, keep_last, branches))
        for chunk in args.chunks:
            record(f"chunk {chunk} eager keep_last=False", *coupled_mode(coupled, feats, chunk, False, False, True))
            for branches in (False, True):
                record(f"chunk {chunk} graph branches={branches} keep_last=False",
                       *coupled_mode(coupled, feats, chunk, True, False, branches))
        record("attention (again)", *timed(lambda: attention(feats)))
        attention_ms = rows[0]["ms"]
        attention_mib = rows[0]["MiB"]
        for row in rows:
            row["time_ratio"] = round(attention_ms / row["ms"], 2)
            row["memory_ratio"] = round(attention_mib / max(row["MiB"], 1e-3), 2)
        profiles = {chunk: kernel_profile(coupled, feats, chunk) for chunk in args.chunks[:1]}
    result = {"length": args.length, "batch": args.batch, "rows": rows, "eager_chunk_profile": profiles}
    print(json.dumps(result, indent=1), flush=True)
    if args.out is not None:
        args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
