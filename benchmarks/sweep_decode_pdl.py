"""Batch-1 and batch-16 decode steps: programmatic dependent launch (PDL) of the fused step's kernels and the one-row
GEMV (kernels/utils ``pdl_available``: each kernel loads its weights, then waits for the kernel before it), and the
one-row GEMV's routes timed from HBM vs L2 (kernels/gemv ``_measure``), on the mamba-2.8b shape (bf16, random weights;
mamba-ssm's CUDA-graph decode re-run alongside).

Prints and writes (``--out``, default benchmarks/results, ``sweep_decode_pdl.json``):
- per projection of a layer (in_proj, out_proj) and the LM head, per GEMV route (cuBLAS and each Triton
  configuration), the GPU time of one call inside a graph, on one weight (16 calls: L2 hits once it fits), over
  distinct copies of it (reads from HBM, as in a decode step), and the same after a small producer kernel each (as
  the chooser times them, minus that kernel's own time); the routes the chooser picked;
- the GPU step (graph replays back to back) at batch 1 and 16 with PDL on and off, and at batch 1 per forced in_proj /
  out_proj route (the four fastest after a producer, (2, 1024, 1, 4), (16, 256, 1, 8) and cuBLAS);
- generate() ms / token (128 new tokens after a 16-token prompt, as the anchors) at batch 1 and 16 with PDL on and off,
  eager vs graph tokens, and mamba-ssm's ``generate(cg=True)``.

``--package-root DIR --baseline``: only generate() and the GPU step of the package in DIR (an earlier commit), written
to ``sweep_decode_pdl_baseline.json``, to compare with in the same command.

    python benchmarks/sweep_decode_pdl.py [--out DIR] [--package-root DIR --baseline]
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


def route_name(route):
    return "cuBLAS" if route is None else str(tuple(route))


def parse_route(name):
    return None if name == "cuBLAS" else tuple(int(v) for v in name.strip("()").split(","))


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
    ids16 = torch.randint(1, 50000, (16, gen.PROMPT), device="cuda")
    ids1 = ids16[:1]
    import multimodal_mamba

    results = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "package": multimodal_mamba.__file__}
    out_file = args.out / ("sweep_decode_pdl_baseline.json" if args.baseline else "sweep_decode_pdl.json")

    def save():
        out_file.write_text(json.dumps(results, indent=1))

    def step_ms(batch, ids):
        return gen.fresh_graph_step_ms(ours, ids, batch)

    def generate_rows(label, with_mamba_ssm=False):
        rows = {}
        for batch, ids in ((1, ids1), (16, ids16)):
            ours.decode_graphs.clear()
            graph_tokens = gen.ours_generate(ours, ids, True, 32)
            eager_tokens = gen.ours_generate(ours, ids, False, 32)
            rows[f"b{batch} eager tokens == graph tokens"] = bool(torch.equal(graph_tokens, eager_tokens))
            rows[f"b{batch} first 32 tokens"] = graph_tokens[0, gen.PROMPT:].tolist()
            seconds = gen.median_time(lambda: gen.ours_generate(ours, ids, True), repeats=5)
            rows[f"b{batch} generate ms/token"] = round(seconds / gen.NEW * 1e3, 3)
            rows[f"b{batch} GPU step ms"] = round(gen.graph_step_ms(ours, batch), 4)
            if with_mamba_ssm and "mamba_ssm" in systems:
                m = systems["mamba_ssm"]
                seconds = gen.median_time(lambda: m.generate(input_ids=ids, max_length=gen.PROMPT + gen.NEW, cg=True,
                                                             top_k=1), repeats=5)
                rows[f"b{batch} mamba-ssm generate ms/token"] = round(seconds / gen.NEW * 1e3, 3)
        print(json.dumps({label: {k: v for k, v in rows.items() if "tokens" not in k or "==" in k}}), flush=True)
        return rows

    if args.baseline:
        results["generate"] = generate_rows("baseline", with_mamba_ssm=True)
        results["gemv_choices"] = {f"{k[1][0]}x{k[1][1]}": route_name(v) for k, v in gemv.measured_choices().items()}
        save()
        return

    from multimodal_mamba.kernels import utils

    def set_pdl(on):
        utils.PDL = on
        utils._PDL_DEVICES.clear()

    # 1. GEMV routes per shape, timed L2-hot (one weight) and from HBM (rotating copies), inside a graph (PDL on)
    set_pdl(True)
    mixer = ours.backbone.layers[0].mixer
    table = {}
    for name, weight in (("in_proj", mixer.in_proj.weight), ("out_proj", mixer.out_proj.weight),
                         ("lm_head", ours.lm_head.weight)):
        x = torch.randn(1, weight.shape[1], device="cuda", dtype=weight.dtype)
        copies = gemv._cold_copies(weight)
        rows = {}
        for route in [None, *gemv.CANDIDATES]:
            def call(w, route=route):
                return F.linear(x, w) if route is None else gemv.gemv_triton(x, w, None, *route)

            try:
                hot = gemv._graph_time_ms(lambda: call(weight), calls=16, replays=10)
                rotation = itertools.cycle(copies)
                cold = gemv._graph_time_ms(lambda: call(next(rotation)), calls=max(16, len(copies)), replays=10)
                x_row = x.reshape(-1)

                def paired(call=call, rotation=rotation):  # as the chooser times it: after a small producer kernel
                    gemv._rewrite(x_row)
                    call(next(rotation))

                after_producer = gemv._graph_time_ms(paired, calls=max(16, len(copies)), replays=10)
                gb = weight.numel() * weight.element_size() / 1e9
                rows[route_name(route)] = {"hot_us": round(hot * 1e3, 2), "cold_us": round(cold * 1e3, 2),
                                           "cold_TB_s": round(gb / cold, 2),
                                           "cold_after_producer_us": round(after_producer * 1e3, 2)}
            except Exception as error:
                rows[route_name(route)] = repr(error)[:200]
        del copies
        table[name] = rows
        ranked = sorted((r for r in rows if isinstance(rows[r], dict)), key=lambda r: rows[r]["cold_after_producer_us"])
        print(json.dumps({name: {r: rows[r] for r in ranked[:6]}}), flush=True)
    results["gemv_us_pdl_on"] = table
    save()

    # 2. the chooser's picks (the first decode steps measure them), then the GPU step with PDL on and off
    steps = {}
    for pdl in (True, False, True):
        set_pdl(pdl)
        for batch, ids in ((1, ids1), (16, ids16)):
            label = f"b{batch} PDL {'on' if pdl else 'off'}"
            try:
                value = step_ms(batch, ids)
            except Exception as error:
                value = repr(error)[:300]
            steps.setdefault(label, []).append(value)
            print(json.dumps({f"GPU step ms: {label}": value}), flush=True)
    results["gpu_step_ms"] = steps
    choice_keys = {f"{key[1][0]}x{key[1][1]}": key for key in gemv.measured_choices()}
    results["gemv_choices"] = {k: route_name(gemv.measured_choices()[v]) for k, v in choice_keys.items()}
    print(json.dumps({"gemv_choices": results["gemv_choices"]}), flush=True)
    save()

    # 3. generate() with PDL on and off (and mamba-ssm)
    gen_rows = {}
    set_pdl(False)
    gen_rows["PDL off"] = generate_rows("PDL off")
    set_pdl(True)
    gen_rows["PDL on"] = generate_rows("PDL on", with_mamba_ssm=True)
    results["generate"] = gen_rows
    save()

    # 4. batch-1 GPU step per forced in_proj / out_proj route (PDL on): the four fastest from HBM, and cuBLAS
    chosen = dict(gemv._choices)
    forced = {}
    for name, shape in (("in_proj", "10240x2560"), ("out_proj", "2560x5120")):
        key = choice_keys.get(shape)
        if key is None:
            continue
        rows = table[name]
        ranked = sorted((r for r in rows if isinstance(rows[r], dict)), key=lambda r: rows[r]["cold_after_producer_us"])
        for label in dict.fromkeys(ranked[:4] + ["(2, 1024, 1, 4)", "(16, 256, 1, 8)", "cuBLAS"]):
            gemv._choices.clear()
            gemv._choices.update(chosen)
            gemv._choices[key] = parse_route(label)
            try:
                forced[f"{name} {label}"] = step_ms(1, ids1)
            except Exception as error:
                forced[f"{name} {label}"] = repr(error)[:300]
            print(json.dumps({f"b1 GPU step ms, PDL on, {name}": {label: forced[f"{name} {label}"]}}), flush=True)
    gemv._choices.clear()
    gemv._choices.update(chosen)
    results["b1_gpu_step_ms_forced_routes"] = forced
    save()


if __name__ == "__main__":
    main()
