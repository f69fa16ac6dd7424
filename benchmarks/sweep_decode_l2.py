"""Decode steps and the L2 cache: how the one-row GEMV's chooser times its candidates (L2-hot vs from HBM), and L2
prefetch of upcoming projection weights by the fused step's latency-bound kernels (kernels/decode_step
``PREFETCH_*``: bulk copies or per-line prefetches), on the mamba-2.8b shape (bf16, random weights; mamba-ssm's CUDA-graph decode re-run alongside).

Prints and writes (``--out``, default benchmarks/results, ``decode_l2.json``):
- per projection shape of a layer (in_proj, out_proj, the LM head) and per GEMV route (cuBLAS and each Triton
  configuration), the GPU time of one call inside a graph, timed on one weight (16 calls: L2 hits once it fits) and
  over distinct copies of it (reads from HBM, as in a decode step);
- the GEMV routes the chooser picked;
- the GPU step (graph replays back to back) at batch 1 per prefetch setting and per forced in_proj / out_proj route
  (the four fastest from HBM and cuBLAS), at batch 16 per prefetch setting;
- generate() ms / token (128 new tokens after a 16-token prompt, as the anchors) at batch 1 and 16: prefetch off,
  the defaults, the fastest batch-1 setting of the sweep; mamba-ssm's ``generate(cg=True)``; eager vs graph tokens.

``--package-root DIR --baseline``: only generate() and the GPU step of the package in DIR (an earlier commit),
written to ``decode_l2_baseline.json``, to compare with in the same command.

    python benchmarks/sweep_decode_l2.py [--out DIR] [--package-root DIR --baseline]
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT / "benchmarks"))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import bench_gpu_generate as gen  # noqa: E402  (imports multimodal_mamba from --package-root when given)
from multimodal_mamba.kernels.gemv import fused as gemv  # noqa: E402
from multimodal_mamba.modeling.deferred_stop import allow_deferred_stop_check  # noqa: E402

PF_KNOBS = ("PREFETCH_OUT_PROJ_BYTES", "PREFETCH_NEXT_IN_PROJ_BYTES", "PREFETCH_NORM_IN_PROJ_BYTES", "PREFETCH_MODE",
            "PREFETCH_CHUNK")
MB = 1 << 20
ALL = 1 << 40
OFF = {"PREFETCH_OUT_PROJ_BYTES": 0, "PREFETCH_NEXT_IN_PROJ_BYTES": 0, "PREFETCH_NORM_IN_PROJ_BYTES": 0}


def prefetch(mode, out_proj=0, next_in_proj=0, norm_in_proj=0, **extra):
    return {"PREFETCH_MODE": mode, "PREFETCH_OUT_PROJ_BYTES": out_proj, "PREFETCH_NEXT_IN_PROJ_BYTES": next_in_proj,
            "PREFETCH_NORM_IN_PROJ_BYTES": norm_in_proj, **extra}


PREFETCH_VARIANTS = [  # (label, knobs changed from the defaults)
    ("prefetch off", OFF),
    ("defaults", {}),
    ("line: out_proj all", prefetch("line", ALL)),
    ("line: out_proj 13 MB", prefetch("line", 13 * MB)),
    ("line evict_last: out_proj all", prefetch("line_evict_last", ALL)),
    ("line: out_proj all + next in_proj 8 MB", prefetch("line", ALL, 8 * MB)),
    ("line: next in_proj 8 MB", prefetch("line", 0, 8 * MB)),
    ("line: norm in_proj 8 MB", prefetch("line", 0, 0, 8 * MB)),
    ("line: out_proj all + norm in_proj 4 MB", prefetch("line", ALL, 0, 4 * MB)),
    ("bulk 4 KB: out_proj 13 MB", prefetch("bulk", 13 * MB, PREFETCH_CHUNK=4096)),
]
B16_VARIANTS = ("prefetch off", "defaults", "line: out_proj all + next in_proj 8 MB", "line: out_proj 13 MB")
ROUTES = [None]  # cuBLAS, then every Triton candidate


def route_name(route):
    return "cuBLAS" if route is None else str(tuple(route))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "benchmarks" / "results")
    parser.add_argument("--package-root", default=None, help="(read by bench_gpu_generate at import)")
    parser.add_argument("--baseline", action="store_true")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    args.skip_transformers = True
    _, systems = gen.build_models(args)
    ours = systems["ours"]
    allow_deferred_stop_check()
    ids16 = torch.randint(1, 50000, (16, gen.PROMPT), device="cuda", generator=None)
    ids1 = ids16[:1]
    import multimodal_mamba

    results = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "package": multimodal_mamba.__file__}
    out_file = args.out / ("decode_l2_baseline.json" if args.baseline else "decode_l2.json")

    def save():
        out_file.write_text(json.dumps(results, indent=1))

    def step_ms(batch, ids):
        ours.decode_graphs.clear()
        gen.ours_generate(ours, ids, True, 4)
        return round(gen.graph_step_ms(ours, batch), 4)

    def generate_rows(label, with_mamba_ssm=False):
        rows = {}
        for batch, ids in ((1, ids1), (16, ids16)):
            ours.decode_graphs.clear()
            graph_tokens = gen.ours_generate(ours, ids, True, 32)
            eager_tokens = gen.ours_generate(ours, ids, False, 32)
            rows[f"b{batch} eager tokens == graph tokens"] = bool(torch.equal(graph_tokens, eager_tokens))
            seconds = gen.median_time(lambda: gen.ours_generate(ours, ids, True), repeats=5)
            rows[f"b{batch} generate ms/token"] = round(seconds / gen.NEW * 1e3, 3)
            rows[f"b{batch} GPU step ms"] = round(gen.graph_step_ms(ours, batch), 4)
            if with_mamba_ssm and "mamba_ssm" in systems:
                m = systems["mamba_ssm"]
                seconds = gen.median_time(lambda: m.generate(input_ids=ids, max_length=gen.PROMPT + gen.NEW, cg=True,
                                                             top_k=1), repeats=5)
                rows[f"b{batch} mamba-ssm generate ms/token"] = round(seconds / gen.NEW * 1e3, 3)
        print(json.dumps({label: rows}), flush=True)
        return rows

    if args.baseline:
        results["generate"] = generate_rows("baseline", with_mamba_ssm=True)
        results["gemv_choices"] = {f"{k[1][0]}x{k[1][1]}": route_name(v) for k, v in gemv.measured_choices().items()}
        save()
        print(json.dumps(results, indent=1))
        return

    from multimodal_mamba.kernels.decode_step import fused as decode

    # 1. GEMV routes per shape, timed L2-hot (one weight) and from HBM (rotating copies), inside a graph
    mixer = ours.backbone.layers[0].mixer
    table = {}
    for name, weight in (("in_proj", mixer.in_proj.weight), ("out_proj", mixer.out_proj.weight),
                         ("lm_head", ours.lm_head.weight)):
        x = torch.randn(1, weight.shape[1], device="cuda", dtype=weight.dtype)
        copies = gemv._cold_copies(weight)
        rows = {}
        for route in ROUTES + [c for c in gemv.CANDIDATES if c not in ROUTES]:
            def call(w, route=route):
                return F.linear(x, w) if route is None else gemv.gemv_triton(x, w, None, *route)

            try:
                hot = gemv._graph_time_ms(lambda: call(weight), calls=16, replays=10)
                rotation = itertools.cycle(copies)
                cold = gemv._graph_time_ms(lambda: call(next(rotation)), calls=max(16, len(copies)), replays=10)
                gb = weight.numel() * weight.element_size() / 1e9
                rows[route_name(route)] = {"hot_us": round(hot * 1e3, 2), "cold_us": round(cold * 1e3, 2),
                                           "cold_TB_s": round(gb / cold, 2)}
            except Exception as error:
                rows[route_name(route)] = repr(error)[:200]
        del copies
        table[f"{name} {weight.shape[0]}x{weight.shape[1]}"] = rows
        print(json.dumps({name: rows}), flush=True)
    results["gemv_us"] = table
    save()

    # 2. the chooser's picks (first decode steps measure them, cold)
    ours.decode_graphs.clear()
    gen.ours_generate(ours, ids1, True, 4)
    choice_keys = {}
    for key, value in gemv.measured_choices().items():
        choice_keys[f"{key[1][0]}x{key[1][1]}"] = key
    results["gemv_choices"] = {k: route_name(gemv.measured_choices()[v]) for k, v in choice_keys.items()}
    print(json.dumps({"gemv_choices": results["gemv_choices"]}), flush=True)
    chosen = dict(gemv._choices)
    defaults = {name: getattr(decode, name) for name in PF_KNOBS}
    results["prefetch_defaults"] = defaults
    in_key, out_key = choice_keys.get("10240x2560"), choice_keys.get("2560x5120")

    def apply(knobs, routes=None):
        for name in PF_KNOBS:
            setattr(decode, name, knobs.get(name, defaults[name]))
        gemv._choices.clear()
        gemv._choices.update(chosen)
        for key, route in (routes or {}).items():
            gemv._choices[key] = route

    # 3. batch-1 GPU step per prefetch setting
    steps = {}
    for label, knobs in PREFETCH_VARIANTS:
        try:
            apply(knobs)
            steps[label] = step_ms(1, ids1)
        except Exception as error:
            steps[label] = repr(error)[:300]
        print(json.dumps({f"b1 GPU step ms: {label}": steps[label]}), flush=True)
    results["b1_gpu_step_ms"] = steps
    save()
    # 4. batch-16 GPU step per prefetch setting
    steps16 = {}
    for label, knobs in [v for v in PREFETCH_VARIANTS if v[0] in B16_VARIANTS]:
        try:
            apply(knobs)
            steps16[label] = step_ms(16, ids16)
        except Exception as error:
            steps16[label] = repr(error)[:300]
        print(json.dumps({f"b16 GPU step ms: {label}": steps16[label]}), flush=True)
    results["b16_gpu_step_ms"] = steps16
    save()

    numeric = {k: v for k, v in steps.items() if isinstance(v, float)}
    best_label = min(numeric, key=numeric.get) if numeric else "defaults"
    best_knobs = dict(PREFETCH_VARIANTS)[best_label]
    # 5. generate(): prefetch off, the defaults, the fastest batch-1 setting; mamba-ssm
    gen_rows = {}
    apply(OFF)
    gen_rows["prefetch off"] = generate_rows("prefetch off")
    apply({})
    gen_rows["defaults"] = generate_rows("defaults", with_mamba_ssm=True)
    if best_label not in ("defaults",):
        apply(best_knobs)
        gen_rows[f"fastest b1 setting: {best_label}"] = generate_rows(best_label)
    results["generate"] = gen_rows
    save()

    # 6. batch-1 GPU step with forced in_proj / out_proj routes (without prefetch and with the fastest setting)
    hot_best = {}
    for name, key in (("in_proj", in_key), ("out_proj", out_key)):
        if key is None:
            continue
        rows = table[f"{name} {key[1][0]}x{key[1][1]}"]
        main_routes = ["cuBLAS"] + [route_name(c) for c in gemv.CANDIDATES[:8]]  # main's candidates (57b7922)
        hot_best[name] = min((r for r in main_routes if isinstance(rows.get(r), dict)), key=lambda r: rows[r]["hot_us"])
    # the routes an L2-hot chooser picks (main's chooser), without prefetch: main's decode step in this process
    hot_routes = {}
    for name, key in (("in_proj", in_key), ("out_proj", out_key)):
        if key is not None and name in hot_best:
            label = hot_best[name]
            hot_routes[key] = None if label == "cuBLAS" else tuple(int(v) for v in label.strip("()").split(","))
    forced = {}
    try:
        apply(OFF, hot_routes)
        forced["prefetch off; L2-hot chooser's routes " + json.dumps(hot_best)] = step_ms(1, ids1)
    except Exception as error:
        forced["prefetch off; L2-hot chooser's routes"] = repr(error)[:300]
    settings = [("prefetch off", OFF)] + ([(best_label, best_knobs)] if best_label != "prefetch off" else [])
    for setting, knobs in settings:
        for name, key in (("out_proj", out_key), ("in_proj", in_key)):
            if key is None:
                continue
            rows = table[f"{name} {key[1][0]}x{key[1][1]}"]
            ranked = sorted((r for r in rows if isinstance(rows[r], dict)), key=lambda r: rows[r]["cold_us"])
            for label in dict.fromkeys(ranked[:4] + ["cuBLAS"]):
                route = None if label == "cuBLAS" else tuple(int(v) for v in label.strip("()").split(","))
                label = f"{setting}; {name} {route_name(route)}"
                try:
                    apply(knobs, {key: route})
                    forced[label] = step_ms(1, ids1)
                except Exception as error:
                    forced[label] = repr(error)[:300]
                print(json.dumps({f"b1 GPU step ms: {label}": forced[label]}), flush=True)
    results["b1_gpu_step_ms_forced_routes"] = forced
    print(json.dumps(forced), flush=True)
    save()

    apply({})
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
