"""Batch-16 decode step: the several-rows-per-program mixer kernels (kernels/decode_step ``ROWS_*``) against the
one-row-per-program kernels, in one process (mamba-2.8b shape, bf16, random weights; mamba-ssm's CUDA-graph decode
re-run alongside).

Prints and writes (``--out``, default benchmarks/results): the GPU step (graph replays back to back) per variant at
batch 16, the GPU time of single ops at 16 rows inside a graph (in_proj, out_proj, lm_head on cuBLAS; the mixer:
one-row vs rows kernels), and generate() ms / token of the default against mamba-ssm at batch 1 and 16.
(An earlier version also tried a few-rows Triton route for the projections; it won only on lm_head and was dropped:
benchmarks/results/gpu_decode_parts.md.)

    python benchmarks/sweep_decode_rows.py [--out DIR]   (writes sweep_decode_rows.json)
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
sys.path.insert(0, str(REPO_ROOT / "benchmarks"))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import bench_gpu_generate as gen  # noqa: E402
from multimodal_mamba.kernels.decode_step import fused as decode  # noqa: E402
from multimodal_mamba.kernels.gemv.fused import _graph_time_ms  # noqa: E402
from multimodal_mamba.modeling.deferred_stop import allow_deferred_stop_check  # noqa: E402

KNOBS = ("ROWS_MIN_BATCH", "ROWS_CONV_X_PROJ_CONFIG", "ROWS_SSM_STEP_CONFIG", "ROWS_REDUCE")
OFF = {"ROWS_MIN_BATCH": 10**9}
VARIANTS = [  # (label, decode knobs)
    ("one row per program (before)", OFF),
    ("rows default", {}),
    ("rows ssm (32, 32, 4)", {"ROWS_SSM_STEP_CONFIG": (32, 32, 4)}),
    ("rows ssm (16, 32, 2)", {"ROWS_SSM_STEP_CONFIG": (16, 32, 2)}),
    ("rows ssm (16, 16, 4)", {"ROWS_SSM_STEP_CONFIG": (16, 16, 4)}),
    ("rows ssm (16, 64, 4)", {"ROWS_SSM_STEP_CONFIG": (16, 64, 4)}),
    ("rows conv (16, 128, 64, 64, 4)", {"ROWS_CONV_X_PROJ_CONFIG": (16, 128, 64, 64, 4)}),
    ("rows conv (16, 128, 128, 64, 8)", {"ROWS_CONV_X_PROJ_CONFIG": (16, 128, 128, 64, 8)}),
    ("rows conv (16, 128, 128, 64, 2)", {"ROWS_CONV_X_PROJ_CONFIG": (16, 128, 128, 64, 2)}),
]


def main():
    args, systems = gen.decode_bench_setup()
    ours = systems["ours"]
    allow_deferred_stop_check()
    defaults = {name: getattr(decode, name) for name in KNOBS}
    results = {"defaults": {k: (list(v) if isinstance(v, tuple) else v) for k, v in defaults.items()}}

    def apply(knobs):
        for name in KNOBS:
            setattr(decode, name, knobs.get(name, defaults[name]))
        ours.decode_graphs.clear()

    ids16 = torch.randint(1, 50000, (16, gen.PROMPT), device="cuda")
    ids1 = ids16[:1]
    steps = {}
    for label, knobs in VARIANTS:
        try:
            apply(knobs)
            gen.ours_generate(ours, ids16, True, 4)
            steps[label] = round(gen.graph_step_ms(ours, 16), 4)
        except Exception as error:  # a configuration that does not compile here: say so, go on
            steps[label] = repr(error)[:300]
        print(json.dumps({f"b16 GPU step ms: {label}": steps[label]}), flush=True)
    results["b16_gpu_step_ms"] = steps

    # single ops at 16 rows, inside a graph
    apply({})
    mixer = ours.backbone.layers[0].mixer
    ops = {}
    x_in = torch.randn(16, 2560, device="cuda", dtype=torch.bfloat16)
    y_in = torch.randn(16, 5120, device="cuda", dtype=torch.bfloat16)
    for name, layer, x in (("in_proj", mixer.in_proj, x_in), ("out_proj", mixer.out_proj, y_in),
                           ("lm_head", ours.lm_head, x_in)):
        ops[f"{name} cuBLAS"] = _graph_time_ms(lambda: F.linear(x, layer.weight), calls=32, replays=10)
    cache = ours.allocate_cache(16)
    xz = torch.randn(16, 10240, device="cuda", dtype=torch.bfloat16)
    partials = torch.empty(decode.split_count(5120), 16, 192, device="cuda")
    out = torch.empty(16, 5120, device="cuda", dtype=torch.bfloat16)

    def mixer_step():
        decode.mixer_decode_step(xz, cache.conv_states[0], cache.ssm_states[0], mixer.conv1d.weight[:, 0],
                                 mixer.conv1d.bias, mixer.x_proj.weight, mixer.dt_proj.weight, mixer.dt_proj.bias,
                                 mixer.A_log, mixer.D, partials, out)

    for label, knobs in (("mixer one row per program", OFF), ("mixer rows default", {})):
        apply(knobs)
        ops[label] = _graph_time_ms(mixer_step, calls=32, replays=10)
    apply({})
    results["b16_op_us"] = {k: round(v * 1e3, 2) for k, v in ops.items()}
    print(json.dumps(results["b16_op_us"]), flush=True)

    # generate() at the defaults against mamba-ssm
    gen_rows = {}
    for batch, ids in ((1, ids1), (16, ids16)):
        apply({})
        graph_tokens = gen.ours_generate(ours, ids, True, 32)
        eager_tokens = gen.ours_generate(ours, ids, False, 32)
        gen_rows[f"b{batch} eager tokens == graph tokens"] = bool(torch.equal(graph_tokens, eager_tokens))
        seconds = gen.median_time(lambda: gen.ours_generate(ours, ids, True), repeats=5)
        gen_rows[f"b{batch} ours generate ms/token"] = round(seconds / gen.NEW * 1e3, 3)
        gen_rows[f"b{batch} ours GPU step ms"] = round(gen.graph_step_ms(ours, batch), 4)
        if "mamba_ssm" in systems:
            m = systems["mamba_ssm"]
            seconds = gen.median_time(lambda: m.generate(input_ids=ids, max_length=gen.PROMPT + gen.NEW, cg=True,
                                                         top_k=1), repeats=5)
            gen_rows[f"b{batch} mamba-ssm generate ms/token"] = round(seconds / gen.NEW * 1e3, 3)
        print(json.dumps(gen_rows), flush=True)
    results["generate"] = gen_rows
    results["device"] = torch.cuda.get_device_name()
    results["torch"] = torch.__version__
    (args.out / "sweep_decode_rows.json").write_text(json.dumps(results, indent=1))
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
