"""Where the GPU time of a short prompt's prefill and of a batch-16 decode step goes (mamba-2.8b shape, bf16, random
weights): torch.profiler kernel tables of the 16-token prefill that generate() runs (fresh cache, logits_to_keep = 1)
at batch 1 and 16, and of one eager decode step at batch 16; plus the prefill's time eager and from its CUDA graph.
``--short-sweep``: only the prefill graph's time per short-scan configuration of the selective scan
(kernels/selective_scan/fused ``SHORT_*``; ``SHORT_MAX_T = 0``: one channel per program, as before).

    python benchmarks/diag_short_prefill.py [--out DIR] [--lengths 16 64] [--short-sweep]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT / "benchmarks"))

import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

import bench_gpu_generate as gen  # noqa: E402


def table(fn, label, out, rows=22):
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            fn()
        torch.cuda.synchronize()
    text = prof.key_averages().table(sort_by="cuda_time_total", row_limit=rows, max_name_column_width=60)
    print(f"--- {label} (3 calls)\n{text}", flush=True)
    (out / f"profile_{label}.txt").write_text(text)


def short_sweep(model, args):
    from multimodal_mamba.kernels.selective_scan import fused

    results = {}
    model.config.prefill_cuda_graph = True
    with torch.no_grad():
        for max_t, tile, warps in ((0, 256, 4), (64, 256, 4), (64, 128, 4), (64, 512, 4), (64, 256, 8),
                                   (64, 128, 2), (64, 64, 1)):
            fused.SHORT_MAX_T, fused.SHORT_TILE, fused.SHORT_WARPS = max_t, tile, warps
            for length in args.lengths:
                for batch in (1, 16):
                    ids = torch.randint(1, 50000, (batch, length), device="cuda")
                    model.decode_graphs.clear()

                    def prefill():
                        cache = model._graph_generation_cache(batch, ids.device)
                        model(ids, cache_params=cache, use_cache=True, logits_to_keep=1)

                    for _ in range(3):
                        prefill()
                    ms = round(gen.median_time(prefill, repeats=7) * 1e3, 3)
                    key = f"prefill graph L{length} b{batch} ms / SHORT_MAX_T {max_t} TILE {tile} WARPS {warps}"
                    results[key] = ms
                    print(json.dumps({key: ms}), flush=True)
    (args.out / "diag_short_prefill.json").write_text(json.dumps(results, indent=1))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "benchmarks" / "results")
    parser.add_argument("--lengths", type=int, nargs="+", default=[16])
    parser.add_argument("--short-sweep", action="store_true")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    args.skip_transformers = True
    config = gen.MambaConfig(**gen.SHAPE)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = gen.MambaCausalLM(config).to(torch.bfloat16).eval()
    if args.short_sweep:
        short_sweep(model, args)
        return
    with torch.no_grad():
        for length in args.lengths:
            for batch in (1, 16):
                ids = torch.randint(1, 50000, (batch, length), device="cuda")

                def prefill():
                    cache = model._graph_generation_cache(batch, ids.device)
                    model(ids, cache_params=cache, use_cache=True, logits_to_keep=1)

                for graph in (False, True):
                    model.config.prefill_cuda_graph = graph
                    for _ in range(3):
                        prefill()
                    ms = gen.median_time(prefill, repeats=7) * 1e3
                    print(f"prefill L{length} b{batch} {'graph' if graph else 'eager'}: {ms:.3f} ms", flush=True)
                model.config.prefill_cuda_graph = False
                table(prefill, f"prefill_L{length}_b{batch}", args.out)
        ids = torch.randint(1, 50000, (16, 16), device="cuda")
        cache = model.allocate_cache(16)
        model(ids, cache_params=cache, use_cache=True)
        step = ids[:, -1:]
        table(lambda: model(step, cache_params=cache, use_cache=True), "eager_decode_step_b16", args.out, rows=16)


if __name__ == "__main__":
    main()
