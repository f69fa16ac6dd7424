"""Batch-16 decode step: in_proj / out_proj on kernels/linear_rows (PDL-launched few-rows GEMM; out_proj as float32
split-K partials summed by ``add_rms_norm``) against cuBLAS, mamba-2.8b shape, bf16, random weights, one process.

1. Each projection alone (16 rows; weights rotated over copies that together exceed L2, so every call reads HBM):
   us per call inside a CUDA graph of 32 calls, cuBLAS (``F.linear``) and every candidate of IN_CANDIDATES /
   OUT_CANDIDATES (out_proj's partials are not summed here: add_rms_norm does that in the step), each checked against
   the float32 reference first.
2. GPU step at batch 16 (graph replays back to back, the graph captured afresh per setting): cuBLAS for both
   ("main"), every setting of VARIANTS (fused module attributes), the ``--top`` fastest in_proj candidates of part 1
   and the 2 fastest out_proj ones in combination; then main, "out" and the best setting alternately (``--rounds``).
3. generate() ms / step at batch 16 and 1 (128 new tokens after a 16-token prompt, prefill included, / 128), main and
   the best setting alternately; GPU step at batch 1; eager vs graph greedy tokens at batch 16 with the best setting.
4. CUPTI timeline of the batch-16 step (diag_decode_b16_timeline.timeline) for "out" (or the defaults) and the best
   setting.

Writes ``sweep_decode_proj16.json`` to ``--out`` (default benchmarks/results).

    python benchmarks/sweep_decode_proj16.py [--out DIR] [--top 3] [--rounds 3] [--no-timeline] [--final]

``--final``: no part 1; part 2 for main, the committed defaults and FINAL; parts 3 (with the defaults) and 4.
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
import torch.nn.functional as F  # noqa: E402

import bench_gpu_generate as gen  # noqa: E402
from multimodal_mamba.kernels.decode_step import fused  # noqa: E402
from multimodal_mamba.kernels.linear_rows import fused as lr  # noqa: E402

# (block_n, block_k, k_split, pre_k, swap, warps, stages[, tma[, trigger]]); k_split 0 = all of K. This list: the
# third H200 call's (neighbours of the second call's fastest TMA in_proj, TMA out_proj with fewer partial sums); the
# first two calls' lists and results are in gpu_decode_parts.md.
IN_CANDIDATES = [
    (128, 64, 0, 0, True, 4, 6, True), (128, 64, 0, 0, True, 4, 8, True), (128, 64, 0, 0, True, 8, 6, True),
    (64, 64, 0, 0, True, 4, 8, True), (256, 64, 0, 0, True, 8, 4, True), (128, 32, 0, 0, True, 4, 8, True),
    (128, 64, 0, 256, True, 4, 6, True), (64, 64, 0, 0, True, 4, 6, True),
]
OUT_CANDIDATES = [
    (32, 128, 1024, 512, True, 4, 3), (64, 64, 1024, 0, True, 4, 8, True), (128, 64, 1024, 0, True, 4, 6, True),
    (64, 64, 1280, 0, True, 4, 8, True), (32, 64, 1024, 0, True, 4, 8, True),
]
OUT = (32, 128, 1024, 512, True, 4, 3)  # the second call's fastest out_proj (GPU step 3.308 -> 3.204 ms)
IN_TMA = (128, 64, 0, 0, True, 4, 6, True)  # the second call's fastest in_proj alone (3.301 -> 3.261 ms)
IN_ROWS = (32, 128, 0, 512, True, 4, 4)
AFTER = {"ADD_NORM_TRIGGER_AFTER_WAIT": True}
# name -> fused attributes (on top of MAIN: both projections on cuBLAS, add_rms_norm as before)
MAIN = {"IN_PROJ_CONFIG": None, "OUT_PROJ_CONFIG": None, "ADD_NORM_TRIGGER_AFTER_WAIT": False, "ADD_NORM_WARPS": None}
VARIANTS = {
    "out": {"OUT_PROJ_CONFIG": OUT},
    "out trig1": {"OUT_PROJ_CONFIG": OUT + (False, 1)},
    "out trig2": {"OUT_PROJ_CONFIG": OUT + (False, 2)},
    "out, norm after wait": {"OUT_PROJ_CONFIG": OUT, **AFTER},
    "out, norm 8 warps": {"OUT_PROJ_CONFIG": OUT, "ADD_NORM_WARPS": 8},
    "out, norm 16 warps": {"OUT_PROJ_CONFIG": OUT, "ADD_NORM_WARPS": 16},
    "out 4 splits": {"OUT_PROJ_CONFIG": (32, 128, 1280, 512, True, 4, 3)},
    "out (32, 64, 1024, 512, 4 stages)": {"OUT_PROJ_CONFIG": (32, 64, 1024, 512, True, 4, 4)},
    "out (64, 128, 512, 256) trig2": {"OUT_PROJ_CONFIG": (64, 128, 512, 256, True, 4, 3, False, 2)},
    "in tma": {"IN_PROJ_CONFIG": IN_TMA},
    "in tma trig1": {"IN_PROJ_CONFIG": IN_TMA + (1,)},
    "in tma trig2": {"IN_PROJ_CONFIG": IN_TMA + (2,)},
    "in tma trig2 + out": {"IN_PROJ_CONFIG": IN_TMA + (2,), "OUT_PROJ_CONFIG": OUT},
    "in tma trig2 + out trig2": {"IN_PROJ_CONFIG": IN_TMA + (2,), "OUT_PROJ_CONFIG": OUT + (False, 2)},
    "in tma trig2 + out, norm after wait": {"IN_PROJ_CONFIG": IN_TMA + (2,), "OUT_PROJ_CONFIG": OUT, **AFTER},
    "in tma + out, norm after wait": {"IN_PROJ_CONFIG": IN_TMA, "OUT_PROJ_CONFIG": OUT, **AFTER},
    "in tma trig2 + out trig2, norm after wait": {"IN_PROJ_CONFIG": IN_TMA + (2,), "OUT_PROJ_CONFIG": OUT + (False, 2),
                                                  **AFTER},
    "in rows trig2 + out, norm after wait": {"IN_PROJ_CONFIG": IN_ROWS + (False, 2), "OUT_PROJ_CONFIG": OUT, **AFTER},
}
# --final: the committed defaults (captured at import) against main and two norm widths, no isolated part
DEFAULTS = {name: getattr(fused, name) for name in MAIN}
FINAL = {
    "defaults": DEFAULTS,
    "defaults, norm 16 warps": {**DEFAULTS, "ADD_NORM_WARPS": 16},
    "defaults, norm 8 warps": {**DEFAULTS, "ADD_NORM_WARPS": 8},
}
RESULTS = {}


record = gen.json_recorder(RESULTS, "sweep_decode_proj16.json")


def graph_us(fn, calls):
    """us per call of ``fn(i)`` for i < calls, captured in one CUDA graph (median of 5 x 10 replays)."""
    for i in range(calls):
        fn(i)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        with torch.cuda.graph(graph, stream=stream):
            for i in range(calls):
                fn(i)
    torch.cuda.current_stream().wait_stream(stream)
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(5):
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(10):
            graph.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / (10 * calls))
    return round(sorted(times)[2], 2)


def isolated(name, n_out, k_in, candidates, partial, out):
    copies = max(2, -(-200 * 2**20 // (n_out * k_in * 2)))  # >= 200 MB of weights: every call reads HBM
    torch.manual_seed(0)
    weights = [torch.randn(n_out, k_in, device="cuda", dtype=torch.bfloat16) / k_in**0.5 for _ in range(copies)]
    x = torch.randn(16, k_in, device="cuda", dtype=torch.bfloat16)
    ref = F.linear(x.float(), weights[0].float())
    scale = ref.abs().max().item()
    times = {"cublas": graph_us(lambda i: F.linear(x, weights[i % copies]), 32)}
    record(f"isolated_us/{name}/cublas", times["cublas"], out)
    for config in candidates:
        key = json.dumps(list(config))
        try:
            if partial:
                got = lr.linear_rows_partials(x, weights[0], config).sum(0)
                fn = lambda i, c=config: lr.linear_rows_partials(x, weights[i % copies], c)  # noqa: E731
            else:
                got = lr.linear_rows(x, weights[0], None, config).float()
                fn = lambda i, c=config: lr.linear_rows(x, weights[i % copies], None, c)  # noqa: E731
            err = (got.float() - ref).abs().max().item() / scale
            if err > 1e-2:
                raise AssertionError(f"max error {err:.3g} of the output scale")
            times[key] = graph_us(fn, 32)
        except Exception as error:  # a configuration that does not compile or run is skipped, with its error
            times[key] = None
            record(f"isolated_error/{name}/{key}", repr(error)[:300], out)
            continue
        record(f"isolated_us/{name}/{key}", times[key], out)
    del weights
    torch.cuda.empty_cache()
    return times


def apply(setting):
    gen.apply_settings(fused, MAIN, setting)


step_ms = gen.fresh_graph_step_ms


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "benchmarks" / "results")
    parser.add_argument("--top", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--no-timeline", action="store_true")
    parser.add_argument("--final", action="store_true", help="only main, the defaults and FINAL (no part 1)")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    out = args.out
    start = time.time()
    with torch.no_grad():
        iso_in, iso_out = {}, {}
        if not args.final:
            iso_in = isolated("in_proj", 10240, 2560, IN_CANDIDATES, False, out)
            iso_out = isolated("out_proj", 2560, 5120, OUT_CANDIDATES, True, out)
            record("isolated_s", round(time.time() - start, 1), out)

        def ranked(times):
            return [json.loads(k) for k, v in sorted(((k, v) for k, v in times.items() if k != "cublas" and v),
                                                      key=lambda kv: kv[1])]

        args.skip_transformers = True
        _, systems = gen.build_models(args)
        model = systems["ours"]
        torch.manual_seed(1)
        ids = torch.randint(1, 50000, (16, gen.PROMPT), device="cuda")
        settings = {"main": {}, **(FINAL if args.final else VARIANTS)}
        record("settings", settings, out)
        for config in ranked(iso_in)[:args.top]:  # the fastest in_proj alone, triggering after its loop, with out_proj
            settings[f"in {config} trig2 + out, norm after wait"] = {
                "IN_PROJ_CONFIG": tuple(config[:7]) + (bool(config[7:8] and config[7]), 2), "OUT_PROJ_CONFIG": OUT,
                **AFTER}
        for config in ranked(iso_out)[:2]:
            settings[f"in tma trig2 + out {config}, norm after wait"] = {
                "IN_PROJ_CONFIG": IN_TMA + (2,), "OUT_PROJ_CONFIG": tuple(config), **AFTER}
        apply(settings["main"])
        step_ms(model, ids)  # warm-up
        steps = {}
        for name, setting in settings.items():
            apply(setting)
            try:
                steps[name] = step_ms(model, ids)
            except Exception as error:
                record(f"step_error/{name}", repr(error)[:300], out)
                continue
            record(f"step_ms/{name}", steps[name], out)
        best = min((n for n in steps if n != "main"), key=steps.get)
        record("best", {"name": best, "settings": settings[best]}, out)
        reference = "defaults" if args.final else "out"
        rounds = {"main": [], reference: [], best: []}
        for _ in range(args.rounds):
            for name in rounds:
                apply(settings[name])
                rounds[name].append(step_ms(model, ids))
        record("step_ms_rounds", rounds, out)
        record("sweep_s", round(time.time() - start, 1), out)

        shipped = "defaults" if args.final else best
        pair = {name: settings[name] for name in ("main", shipped)}
        record("generate_ms_per_step", gen.alternating_generate_ms(model, ids, pair, apply), out)
        for name in ("main", shipped):
            apply(settings[name])
            model.decode_graphs.clear()
            record(f"b1_step_ms/{name}", step_ms(model, ids, 1), out)
        apply(settings[shipped])
        graphed = gen.ours_generate(model, ids, True, 32)
        eager = gen.ours_generate(model, ids, False, 32)
        record(f"b16_graph_equals_eager_32/{shipped}", bool(torch.equal(graphed, eager)), out)
        apply(settings["main"])
        main_tokens = gen.ours_generate(model, ids, True, 32)
        record(f"b16_{shipped}_tokens_equal_main_32", bool(torch.equal(graphed, main_tokens)), out)

        if not args.no_timeline:
            import diag_decode_b16_timeline as diag

            for name in dict.fromkeys((reference, best)):
                apply(settings[name])
                result = diag.timeline(model, ids)
                record(f"timeline/{name}", result, out)
    apply(settings["main"])
    record("total_s", round(time.time() - start, 1), out)


if __name__ == "__main__":
    main()
