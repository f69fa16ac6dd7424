"""Batch-16 decode step and the prompt's prefill inside generate(): what the rows kernels' latency cuts, the PDL-launched
few-rows in_proj / out_proj (``kernels/decode_step/fused.linear_rows``) and prefill CUDA graphs each save, on the
mamba-2.8b shape (bf16, random weights), mamba-ssm's CUDA-graph decode re-run in the same process.

1. GPU step at batch 16 (graph replays back to back, ``bench_gpu_generate.graph_step_ms``) per variant of the fused
   step's module constants (``fused.ROWS_*``): everything off (main's kernels), each latency cut of the mixer's rows
   kernels alone and together; then, on the fastest mixer, each ``linear_rows`` configuration for in_proj and for
   out_proj (the other on cuBLAS), and the best of both together. The fastest variant is kept for the rest.
2. The 16-token prompt's prefill as generate() runs it (a fresh graph-bucket cache, logits_to_keep = 1), eager and
   replayed from its CUDA graph, at batch 1 and 16.
3. generate() ms / token (128 new tokens after a 16-token prompt, prefill included, as the anchors) at batch 1 and 16:
   main's kernels without prefill graphs, the kept variant without and with prefill graphs (``config.prefill_cuda_graph``);
   eager vs graph greedy tokens; mamba-ssm ``generate(cg=True)``.

Writes ``sweep_decode_b16.json`` to ``--out`` (default benchmarks/results).

    python benchmarks/sweep_decode_b16.py [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT / "benchmarks"))

import torch  # noqa: E402

import bench_gpu_generate as gen  # noqa: E402
from multimodal_mamba.kernels.decode_step import fused  # noqa: E402

MAIN = dict(ROWS_REDUCE_TILE=False, ROWS_DT_ONE_DOT=False, ROWS_EARLY_H=False, ROWS_IN_PROJ_CONFIG=None,
            ROWS_OUT_PROJ_CONFIG=None)
MIXER_VARIANTS = {
    "reduce tile": dict(ROWS_REDUCE_TILE=True),
    "reduce tile, block 64": dict(ROWS_REDUCE_TILE=True, ROWS_REDUCE_BLOCK=64),
    "dt one dot": dict(ROWS_DT_ONE_DOT=True),
    "early h": dict(ROWS_EARLY_H=True),
    "reduce tile + dt one dot": dict(ROWS_REDUCE_TILE=True, ROWS_DT_ONE_DOT=True),
    "reduce tile + dt one dot + early h": dict(ROWS_REDUCE_TILE=True, ROWS_DT_ONE_DOT=True, ROWS_EARLY_H=True),
}
IN_PROJ = [(16, 32, 128, 4, 4), (16, 64, 128, 4, 3), (16, 16, 256, 4, 3), (16, 32, 256, 4, 3), (16, 64, 64, 4, 4),
           (16, 128, 64, 4, 4), (16, 32, 128, 4, 6)]
OUT_PROJ = [(16, 16, 128, 4, 4), (16, 32, 128, 4, 4), (16, 16, 256, 4, 3), (16, 32, 256, 4, 3), (16, 16, 512, 4, 2),
            (16, 64, 128, 4, 4)]
RESULTS = {}


def record(key, value, out):
    RESULTS[key] = value
    print(json.dumps({key: value}), flush=True)
    (out / "sweep_decode_b16.json").write_text(json.dumps(RESULTS, indent=1))


def apply(settings):
    defaults = dict(MAIN, ROWS_REDUCE_BLOCK=32)
    for name, value in {**defaults, **settings}.items():
        setattr(fused, name, value)


def step_ms(model, ids, batch):
    """Capture the bucket's graph afresh with the current settings, then its GPU step (median of 3 x 50 replays)."""
    model.decode_graphs.clear()
    gen.ours_generate(model, ids[:batch], True, 4)
    return round(gen.graph_step_ms(model, batch), 4)


def prefill_ms(model, ids, graph, repeats=7):
    """A 16-token prefill as generate() runs it (fresh graph-bucket cache; eager or from its prefill graph)."""
    model.config.prefill_cuda_graph = graph

    def once():
        cache = model._graph_generation_cache(ids.shape[0], ids.device)
        model(ids, cache_params=cache, use_cache=True, logits_to_keep=1)

    for _ in range(3):  # (the second sight captures)
        once()
    return round(gen.median_time(once, repeats=repeats) * 1e3, 3)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "benchmarks" / "results")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    args.skip_transformers = True
    _, systems = gen.build_models(args)
    ours = systems["ours"]
    out = args.out
    torch.manual_seed(1)
    ids = torch.randint(1, 50000, (16, gen.PROMPT), device="cuda")
    start = time.time()
    with torch.no_grad():
        # 1. GPU step at batch 16 per variant
        apply({})
        steps = {"main (all off)": step_ms(ours, ids, 16)}
        record("b16_step_ms/main (all off)", steps["main (all off)"], out)
        for name, settings in MIXER_VARIANTS.items():
            apply(settings)
            steps[name] = step_ms(ours, ids, 16)
            record(f"b16_step_ms/{name}", steps[name], out)
        mixer_best = min(MIXER_VARIANTS, key=lambda n: steps[n])
        mixer = MIXER_VARIANTS[mixer_best] if steps[mixer_best] < steps["main (all off)"] else {}
        record("mixer_kept", mixer_best if mixer else "main (all off)", out)
        best_in, best_in_ms = None, steps[mixer_best] if mixer else steps["main (all off)"]
        for config in IN_PROJ:
            apply(dict(mixer, ROWS_IN_PROJ_CONFIG=config))
            ms = step_ms(ours, ids, 16)
            record(f"b16_step_ms/+ in_proj {config}", ms, out)
            if ms < best_in_ms:
                best_in, best_in_ms = config, ms
        best_out, best_out_ms = None, steps[mixer_best] if mixer else steps["main (all off)"]
        for config in OUT_PROJ:
            apply(dict(mixer, ROWS_OUT_PROJ_CONFIG=config))
            ms = step_ms(ours, ids, 16)
            record(f"b16_step_ms/+ out_proj {config}", ms, out)
            if ms < best_out_ms:
                best_out, best_out_ms = config, ms
        kept = dict(mixer, ROWS_IN_PROJ_CONFIG=best_in, ROWS_OUT_PROJ_CONFIG=best_out)
        apply(kept)
        record("b16_step_ms/kept", step_ms(ours, ids, 16), out)
        record("kept", {k: v for k, v in kept.items()}, out)
        record("b1_step_ms/kept", step_ms(ours, ids, 1), out)
        record("sweep_s", round(time.time() - start, 1), out)

        # 2. the prompt's prefill, eager and from its graph
        for batch in (1, 16):
            for graph in (False, True):
                record(f"prefill16_b{batch}_ms/{'graph' if graph else 'eager'}", prefill_ms(ours, ids[:batch], graph),
                       out)
        ours.config.prefill_cuda_graph = True

        # 3. generate(): main's kernels without prefill graphs, the kept variant without / with them, mamba-ssm
        for label, settings, graph in (("main kernels, no prefill graph", {}, False),
                                       ("kept, no prefill graph", kept, False), ("kept, prefill graph", kept, True)):
            apply(settings)
            ours.config.prefill_cuda_graph = graph
            ours.decode_graphs.clear()
            for batch in (1, 16):
                t = gen.median_time(lambda: gen.ours_generate(ours, ids[:batch], True), repeats=5, warmup=2)
                record(f"generate_b{batch}_ms_per_token/{label}", round(t / gen.NEW * 1e3, 3), out)
        for batch in (1, 16):
            graphed = gen.ours_generate(ours, ids[:batch], True, 32)
            eager = gen.ours_generate(ours, ids[:batch], False, 32)
            record(f"b{batch}_graph_equals_eager_32", bool(torch.equal(graphed, eager)), out)
        if "mamba_ssm" in systems:
            m = systems["mamba_ssm"]
            for batch in (1, 16):
                t = gen.median_time(lambda: m.generate(input_ids=ids[:batch], max_length=gen.PROMPT + gen.NEW, cg=True,
                                                       top_k=1), repeats=5)
                record(f"generate_b{batch}_ms_per_token/mamba_ssm_cg", round(t / gen.NEW * 1e3, 3), out)
    record("total_s", round(time.time() - start, 1), out)


if __name__ == "__main__":
    main()
