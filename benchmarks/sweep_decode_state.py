"""Batch-16 decode step: the state-update rows kernel (``fused._ssm_step_rows_kernel``) with its float32 state tile
loaded before the PDL wait (``fused.ROWS_EARLY_H``), per block configuration (``ROWS_SSM_STEP_CONFIG``: block_d,
block_r, warps), against main's kernels (MAIN: off, (16, 32, 4)) in the same process; mamba-2.8b shape, bf16, random
weights. ``--main`` / ``--variants`` replace MAIN / VARIANTS (JSON of ``fused`` attributes).

1. GPU step at batch 16 (graph replays back to back, ``bench_gpu_generate.graph_step_ms``, the graph captured afresh
   per variant) for main's kernels and each variant, then main and the fastest variant alternately (``--rounds``).
2. generate() ms / step at batch 16 (128 new tokens after a 16-token prompt, prefill included, / 128) with main's
   kernels and the fastest variant, alternately; eager vs graph greedy tokens with it; mamba-ssm ``generate(cg=True)``.

Writes ``sweep_decode_state.json`` (the fastest variant's settings under "kept" when it beat main's kernels in every
round, else "kept" = {}) to ``--out`` (default benchmarks/results).

    python benchmarks/sweep_decode_state.py [--out DIR] [--rounds 3]
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

# main's kernels (before branch decode16): early h off, its block configurations
MAIN = dict(ROWS_EARLY_H=False, ROWS_SSM_STEP_CONFIG=(16, 32, 4), ROWS_CONV_X_PROJ_CONFIG=(16, 128, 128, 64, 4))
VARIANTS = {
    "early h (default)": dict(ROWS_EARLY_H=True),
    "early h, 2 warps": dict(ROWS_EARLY_H=True, ROWS_SSM_STEP_CONFIG=(16, 32, 2)),
    "early h, 8 warps": dict(ROWS_EARLY_H=True, ROWS_SSM_STEP_CONFIG=(16, 32, 8)),
    "early h, block_d 32": dict(ROWS_EARLY_H=True, ROWS_SSM_STEP_CONFIG=(32, 32, 4)),
    "early h, block_r 64": dict(ROWS_EARLY_H=True, ROWS_SSM_STEP_CONFIG=(16, 64, 4)),
}
RESULTS = {}


record = gen.json_recorder(RESULTS, "sweep_decode_state.json")


def apply(setting):
    gen.apply_settings(fused, MAIN, setting)


step_ms = gen.fresh_graph_step_ms


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "benchmarks" / "results")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--main", default=None, help="JSON of fused module attributes for the baseline instead of MAIN")
    parser.add_argument("--variants", nargs="*", default=None,
                        help="name=JSON of fused module attributes (on top of the baseline), instead of VARIANTS")
    parser.add_argument("--no-generate", action="store_true", help="only the GPU step (part 1)")
    args = parser.parse_args()
    if args.main:
        MAIN.update({k: tuple(v) if isinstance(v, list) else v for k, v in json.loads(args.main).items()})
    if args.variants:
        VARIANTS.clear()
        for item in args.variants:
            name, text = item.split("=", 1)
            VARIANTS[name] = {k: tuple(v) if isinstance(v, list) else v for k, v in json.loads(text).items()}
    args.out.mkdir(parents=True, exist_ok=True)
    record("main_settings", {k: v for k, v in MAIN.items()}, args.out)
    out = args.out
    args.skip_transformers = True
    _, systems = gen.build_models(args)
    ours = systems["ours"]
    torch.manual_seed(1)
    ids = torch.randint(1, 50000, (16, gen.PROMPT), device="cuda")
    start = time.time()
    with torch.no_grad():
        apply({})
        step_ms(ours, ids, 16)  # warm-up (compiles, clocks)
        steps = {"main": step_ms(ours, ids, 16)}
        record("b16_step_ms/main", steps["main"], out)
        for name, settings in VARIANTS.items():
            apply(settings)
            steps[name] = step_ms(ours, ids, 16)
            record(f"b16_step_ms/{name}", steps[name], out)
        best = min(VARIANTS, key=lambda n: steps[n])
        record("best", best, out)
        rounds = {"main": [], best: []}
        for _ in range(args.rounds):
            for name in ("main", best):
                apply(VARIANTS.get(name, {}))
                rounds[name].append(step_ms(ours, ids, 16))
        record("b16_step_ms_rounds", rounds, out)
        wins = all(b < m for b, m in zip(rounds[best], rounds["main"]))
        kept = dict(MAIN, **VARIANTS[best]) if wins else {}
        record("kept", kept, out)
        record("sweep_s", round(time.time() - start, 1), out)
        if args.no_generate:
            apply({})
            return

        gen_ms = {"main": [], best: []}
        for _ in range(2):
            for name in ("main", best):
                apply(VARIANTS.get(name, {}))
                ours.decode_graphs.clear()
                gen.ours_generate(ours, ids, True, 8)
                t = gen.median_time(lambda: gen.ours_generate(ours, ids, True), repeats=3, warmup=1)
                gen_ms[name].append(round(t / gen.NEW * 1e3, 3))
        record("generate_b16_ms_per_step", gen_ms, out)
        apply(VARIANTS[best])
        graphed = gen.ours_generate(ours, ids, True, 32)
        eager = gen.ours_generate(ours, ids, False, 32)
        record(f"b16_graph_equals_eager_32/{best}", bool(torch.equal(graphed, eager)), out)
        if "mamba_ssm" in systems:
            m = systems["mamba_ssm"]
            t = gen.median_time(lambda: m.generate(input_ids=ids, max_length=gen.PROMPT + gen.NEW, cg=True, top_k=1),
                                repeats=3)
            record("generate_b16_ms_per_step/mamba_ssm_cg", round(t / gen.NEW * 1e3, 3), out)
    apply({})
    record("total_s", round(time.time() - start, 1), out)


if __name__ == "__main__":
    main()
