"""Batch-16 decode step with fewer kernels per layer (mamba-2.8b shape, bf16, random weights, one process):

- ``ROWS_FOLD_REDUCE``: the x_proj partial sums reduced by the conv + x_proj kernel's last-arriving program of each
  output tile (a counter elects it) instead of by ``_reduce_partials_kernel``;
- ``ROWS_PRE_WAIT``: the state-update kernel computes the conv, z and loads the dt_proj tile before its PDL wait;
- ``ADD_NORM_WARPS`` 16 (the last round's lead), and block variants of these. (The first two calls of dec16c also
  swept a norm folded into out_proj / in_proj, since removed: gpu_decode_parts.md.)

1. GPU step at batch 16 (graph replays back to back, the graph captured afresh per setting) for "base" (the committed
   defaults with the two switches off and 4-warp norms, i.e. main's step) and every VARIANT (fused module attributes
   on top of base); then base and the fastest alternately (``--rounds``).
2. generate() ms / step at batch 16 and 1 (128 new tokens after a 16-token prompt, prefill included, / 128), base and
   the fastest (or ``--ship``) alternately; GPU step at batch 1; greedy tokens at batch 16: eager = graph.
3. Optional CUPTI timeline (diag_decode_b16_timeline.timeline) of base and the shipped setting.

Writes ``sweep_decode_fold16.json`` to ``--out`` (default benchmarks/results).

    python benchmarks/sweep_decode_fold16.py [--out DIR] [--rounds 3] [--only NAME ...] [--ship NAME] [--timeline]
    python benchmarks/sweep_decode_fold16.py --isolated NAME ...   (GPU steps only, a child process per crash)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT / "benchmarks"))

import torch  # noqa: E402

import bench_gpu_generate as gen  # noqa: E402
from multimodal_mamba.kernels.decode_step import fused  # noqa: E402

KNOBS = ("ADD_NORM_WARPS", "ROWS_FOLD_REDUCE", "ROWS_PRE_WAIT", "ROWS_CONV_X_PROJ_CONFIG",
         "ROWS_SSM_STEP_CONFIG", "IN_PROJ_CONFIG", "OUT_PROJ_CONFIG", "ADD_NORM_TRIGGER_AFTER_WAIT")
DEFAULTS = {name: getattr(fused, name) for name in KNOBS}  # the committed defaults (captured at import)
# base: main's step (f879a77): the two switches off, norm warps as there
BASE = {**DEFAULTS, "ADD_NORM_WARPS": None, "ROWS_FOLD_REDUCE": False, "ROWS_PRE_WAIT": False,
        "ROWS_CONV_X_PROJ_CONFIG": (16, 128, 128, 64, 4), "ROWS_SSM_STEP_CONFIG": (16, 32, 4),
        "IN_PROJ_CONFIG": (128, 64, 0, 0, True, 4, 6, True, 2), "OUT_PROJ_CONFIG": (64, 64, 1024, 0, True, 4, 8, True),
        "ADD_NORM_TRIGGER_AFTER_WAIT": True}
OUT = BASE["OUT_PROJ_CONFIG"]
FR, PW = {"ROWS_FOLD_REDUCE": True}, {"ROWS_PRE_WAIT": True}
VARIANTS = {
    "norm 16 warps": {"ADD_NORM_WARPS": 16},
    "fold reduce": FR,
    "pre wait": PW,
    "fold reduce + pre wait": {**FR, **PW},
    "fold reduce + pre wait, state (16, 16, 4)": {**FR, **PW, "ROWS_SSM_STEP_CONFIG": (16, 16, 4)},
    "fold reduce + pre wait, state (32, 32, 8)": {**FR, **PW, "ROWS_SSM_STEP_CONFIG": (32, 32, 8)},
    "fold reduce + pre wait, conv block_c 256": {**FR, **PW, "ROWS_CONV_X_PROJ_CONFIG": (16, 256, 128, 64, 4)},
    "fold reduce + pre wait, conv block_p 32": {**FR, **PW, "ROWS_CONV_X_PROJ_CONFIG": (16, 128, 128, 32, 4)},
    "fold reduce + pre wait + norm 16 warps": {**FR, **PW, "ADD_NORM_WARPS": 16},
    "defaults": DEFAULTS,
}
# Session 7's retune around the shipped defaults (run with --base-defaults: "base" is then the defaults): the
# projections' tiles, pipelining and launch points, and the norm's, chosen before the two switches changed the kernels
# around them. linear_rows configs: (block_n, block_k, k_split, pre_k, swap, warps, stages, tma, trigger).
_IN, _OUT = DEFAULTS["IN_PROJ_CONFIG"], DEFAULTS["OUT_PROJ_CONFIG"]


def _with(config, **changes):
    names = ("block_n", "block_k", "k_split", "pre_k", "swap", "warps", "stages", "tma", "trigger")
    values = dict(zip(names, tuple(config) + (False, 0)[len(config) - 7:]))
    values.update(changes)
    return tuple(values[n] for n in names)


RETUNE = {
    "in stages 4": {"IN_PROJ_CONFIG": _with(_IN, stages=4)},
    "in stages 8": {"IN_PROJ_CONFIG": _with(_IN, stages=8)},
    "in trigger at start": {"IN_PROJ_CONFIG": _with(_IN, trigger=0)},
    "in trigger after wait": {"IN_PROJ_CONFIG": _with(_IN, trigger=1)},
    "in block_n 64": {"IN_PROJ_CONFIG": _with(_IN, block_n=64)},
    "in block_k 128 stages 4": {"IN_PROJ_CONFIG": _with(_IN, block_k=128, stages=4)},
    "in warps 8": {"IN_PROJ_CONFIG": _with(_IN, warps=8)},
    "out 4 splits": {"OUT_PROJ_CONFIG": _with(_OUT, k_split=1280)},
    "out 8 splits": {"OUT_PROJ_CONFIG": _with(_OUT, k_split=640)},
    "out block_n 32": {"OUT_PROJ_CONFIG": _with(_OUT, block_n=32)},
    "out block_n 128": {"OUT_PROJ_CONFIG": _with(_OUT, block_n=128)},
    "out stages 6": {"OUT_PROJ_CONFIG": _with(_OUT, stages=6)},
    "out trigger after wait": {"OUT_PROJ_CONFIG": _with(_OUT, trigger=1)},
    "norm trigger at start": {"ADD_NORM_TRIGGER_AFTER_WAIT": False},
    "norm 8 warps": {"ADD_NORM_WARPS": 8},
    "norm 32 warps": {"ADD_NORM_WARPS": 32},
}
_N32 = {"ADD_NORM_WARPS": 32}
RETUNE.update({  # (the second call: the best single changes of the first on top of its best, 32-warp norms)
    "norm 32 + in block_k 128 stages 4": {**_N32, "IN_PROJ_CONFIG": _with(_IN, block_k=128, stages=4)},
    "norm 32 + in stages 8": {**_N32, "IN_PROJ_CONFIG": _with(_IN, stages=8)},
    "norm 32 + out 4 splits": {**_N32, "OUT_PROJ_CONFIG": _with(_OUT, k_split=1280)},
    "norm 32 + out block_n 128": {**_N32, "OUT_PROJ_CONFIG": _with(_OUT, block_n=128)},
    "norm 32 + in block_k 128 stages 4 + out 4 splits": {
        **_N32, "IN_PROJ_CONFIG": _with(_IN, block_k=128, stages=4), "OUT_PROJ_CONFIG": _with(_OUT, k_split=1280)},
    "norm 32 + in stages 8 + out 4 splits": {
        **_N32, "IN_PROJ_CONFIG": _with(_IN, stages=8), "OUT_PROJ_CONFIG": _with(_OUT, k_split=1280)},
})
VARIANTS.update({name: {**DEFAULTS, **setting} for name, setting in RETUNE.items()})
RESULTS = {}


record = gen.json_recorder(RESULTS, "sweep_decode_fold16.json")


def apply(setting):
    gen.apply_settings(fused, BASE, setting)


step_ms = gen.fresh_graph_step_ms


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "benchmarks" / "results")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--only", nargs="*", default=None, help="names of VARIANTS to run (default: all)")
    parser.add_argument("--ship", default=None, help="the setting of part 2 (default: the fastest)")
    parser.add_argument("--timeline", action="store_true")
    parser.add_argument("--no-generate", action="store_true")
    parser.add_argument("--isolated", nargs="*", default=None,
                        help="only GPU steps of base and these VARIANTS, each group in a child process that stops at "
                             "its first error (a kernel fault leaves the CUDA context unusable), resumed in a new "
                             "one after it")
    parser.add_argument("--base-defaults", action="store_true",
                        help="compare against the committed defaults instead of main's step of f879a77")
    parser.add_argument("--profile-generate", action="store_true",
                        help="also: GPU kernel time of one batch-16 generate() by kernel (what runs outside the "
                             "decode graph's replays: the prefill, transformers' per-token ops)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.base_defaults:
        BASE.update(DEFAULTS)
    if args.isolated is not None:
        return isolated(args)
    args.out.mkdir(parents=True, exist_ok=True)
    out = args.out
    start = time.time()
    settings = {"base": {}, **{k: v for k, v in VARIANTS.items() if args.only is None or k in args.only}}
    record("settings", {k: {n: list(v) if isinstance(v, tuple) else v for n, v in s.items()}
                        for k, s in settings.items()}, out)
    with torch.no_grad():
        args.skip_transformers = True
        _, systems = gen.build_models(args)
        model = systems["ours"]
        torch.manual_seed(1)
        ids = torch.randint(1, 50000, (16, gen.PROMPT), device="cuda")
        apply({})
        step_ms(model, ids)  # warm-up
        steps = {}
        for name, setting in settings.items():
            apply(setting)
            try:
                steps[name] = step_ms(model, ids)
            except Exception as error:
                record(f"step_error/{name}", repr(error)[:400], out)
                if args.child:
                    os._exit(3)
                continue
            record(f"step_ms/{name}", steps[name], out)
        if args.child:
            return
        best = min((n for n in steps if n != "base"), key=steps.get)
        ship = args.ship or best
        record("best", best, out)
        rounds = {name: [] for name in dict.fromkeys(("base", best, ship))}
        for _ in range(args.rounds):
            for name in rounds:
                apply(settings[name])
                rounds[name].append(step_ms(model, ids))
        record("step_ms_rounds", rounds, out)
        record("sweep_s", round(time.time() - start, 1), out)

        if not args.no_generate:
            pair = {name: settings[name] for name in ("base", ship)}
            record("generate_ms_per_step", gen.alternating_generate_ms(model, ids, pair, apply), out)
            for name in ("base", ship):
                apply(settings[name])
                record(f"b1_step_ms/{name}", step_ms(model, ids, 1), out)
        apply(settings[ship])
        graphed = gen.ours_generate(model, ids, True, 32)
        eager = gen.ours_generate(model, ids, False, 32)
        record(f"b16_graph_equals_eager_32/{ship}", bool(torch.equal(graphed, eager)), out)
        apply({})
        base_tokens = gen.ours_generate(model, ids, True, 32)
        record(f"b16_{ship}_tokens_equal_base_32", bool(torch.equal(graphed, base_tokens)), out)

        if args.timeline:
            import diag_decode_b16_timeline as diag

            for name in dict.fromkeys(("base", ship)):
                apply(settings[name])
                record(f"timeline/{name}", diag.timeline(model, ids), out)
        if args.profile_generate:
            apply(DEFAULTS)
            record("generate_profile_b16", profile_generate(model, ids), out)
    apply(DEFAULTS)
    record("total_s", round(time.time() - start, 1), out)


def profile_generate(model, ids):
    """GPU kernel time of one generate() at batch 16 (warm: graphs captured, the prompt's shape seen): its span,
    the sum of kernel times, the decode graphs' share (kernels of graph replays) and the 25 costliest kernel names
    outside them, in ms."""
    from torch.profiler import ProfilerActivity, profile

    model.decode_graphs.clear()
    for _ in range(2):
        gen.ours_generate(model, ids, True)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        start = time.perf_counter()
        gen.ours_generate(model, ids, True)
        torch.cuda.synchronize()
        span = time.perf_counter() - start
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    total = sum(e.device_time for e in kernels) / 1e3
    by_name = {}
    for e in kernels:
        by_name.setdefault(e.name, [0.0, 0])
        by_name[e.name][0] += e.device_time / 1e3
        by_name[e.name][1] += 1
    top = sorted(by_name.items(), key=lambda kv: -kv[1][0])[:25]
    return {"wall_ms": round(span * 1e3, 3), "kernel_ms": round(total, 3), "kernels": len(kernels),
            "top": [[name[:90], round(ms, 3), count] for name, (ms, count) in top]}


def isolated(args):
    """GPU steps of base and ``args.isolated`` in child processes (``--child --only ...``), each resumed after an
    error with the names not yet measured; results merged into ``sweep_decode_fold16_isolated.json``."""
    names = [n for n in args.isolated if n in VARIANTS]
    merged = {}
    while names:
        child_out = args.out / "child"
        child_out.mkdir(parents=True, exist_ok=True)
        (child_out / "sweep_decode_fold16.json").unlink(missing_ok=True)
        subprocess.run([sys.executable, __file__, "--child", "--no-generate", "--out", str(child_out), "--only",
                        *names], timeout=300)
        path = child_out / "sweep_decode_fold16.json"
        found = json.loads(path.read_text()) if path.exists() else {}
        done = {k.split("/", 1)[1] for k in found if k.startswith(("step_ms/", "step_error/"))}
        merged.update({k: v for k, v in found.items() if k.startswith(("step_ms/", "step_error/"))})
        print(json.dumps({k: v for k, v in found.items() if k.startswith("step_")}), flush=True)
        if not done - {"base"}:
            break  # (the child failed before any variant)
        names = [n for n in names if n not in done]
        (args.out / "sweep_decode_fold16_isolated.json").write_text(json.dumps(merged, indent=1))
    (args.out / "sweep_decode_fold16_isolated.json").write_text(json.dumps(merged, indent=1))


if __name__ == "__main__":
    main()
