"""Where decode time goes at batch 1 and 16: CUDA-graph decode with and without the deferred stop check, the
one-row GEMV and the fused decode step, against mamba-ssm's CUDA-graph decode, in one process (mamba-2.8b shape, bf16,
random weights).

- graphs only: transformers' per-token stop check (a host sync per token) and cuBLAS for every projection;
- + deferred stop check (modeling/deferred_stop.py): transformers' ``DeferredStopCheck`` (which transformers itself
  uses only on mps): the host prepares step t+1 while the GPU runs step t;
- + GEMV (kernels/gemv): one-row projections by the fastest of cuBLAS and the Triton GEMV, measured per shape;
- both: the two above on the module-by-module decode step;
- + fused step (kernels/decode_step): both, with the per-layer small kernels fused (5 launches a layer instead of 9):
  what ``generate()`` does by default;
- fused step, eager: the same without CUDA graphs (``decode_cuda_graph=False``), tokens compared with the graph's.

Also the graph replay alone (back to back, no generate loop): the GPU time of one step; and the GPU step for a few
block configurations of the fused kernels (one changed at a time).

    python benchmarks/bench_gpu_decode_parts.py [--out DIR]   (writes gpu_decode_parts.{md,json})
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
from transformers.generation import utils as generation_utils  # noqa: E402

import bench_gpu_generate as gen  # noqa: E402
from multimodal_mamba.modeling import modeling_mamba_lm  # noqa: E402
from multimodal_mamba.modeling.deferred_stop import allow_deferred_stop_check  # noqa: E402


def main():
    args, systems = gen.decode_bench_setup()
    ours = systems["ours"]
    original_check = generation_utils.DeferredStopCheck.__dict__["is_supported"]
    allow_deferred_stop_check()
    extended_check = generation_utils.DeferredStopCheck.__dict__["is_supported"]
    kernels = modeling_mamba_lm._package_kernels()
    gemv = kernels["linear_one_row"]

    def cublas_one_row(x, weight, bias=None):
        return F.linear(x, weight, bias)

    def setting(deferred, use_gemv, fused=False):
        generation_utils.DeferredStopCheck.is_supported = extended_check if deferred else original_check
        kernels["linear_one_row"] = gemv if use_gemv else cublas_one_row
        ours.backbone.fused_decode = fused
        ours.decode_graphs.clear()  # recapture with this setting's projections

    rows, results, replays = [], {}, {}
    settings = {"graphs only": (False, False, False), "+ deferred stop check": (True, False, False),
                "+ GEMV": (False, True, False), "both": (True, True, False),
                "+ fused step (default)": (True, True, True)}
    for batch in (1, 16):
        ids = torch.randint(1, 50000, (batch, gen.PROMPT), device="cuda")
        reference = None
        for name, flags in settings.items():
            setting(*flags)
            tokens = gen.ours_generate(ours, ids, True, 32)
            reference = tokens if reference is None else reference
            same = bool(torch.equal(tokens, reference))
            seconds = gen.median_time(lambda: gen.ours_generate(ours, ids, True), repeats=5)
            results[f"b{batch} {name}"] = ms = seconds / gen.NEW * 1e3
            replays[f"b{batch} {name}"] = step = gen.graph_step_ms(ours, batch)
            rows.append(f"| {batch} | {name} | {ms:.3f} | {step:.3f} | {'yes' if same else 'NO'} |")
            print(rows[-1], flush=True)
        # the fused step without graphs: same kernels, so the same tokens as the graph
        graph_tokens = gen.ours_generate(ours, ids, True, 32)
        eager_tokens = gen.ours_generate(ours, ids, False, 32)
        seconds = gen.median_time(lambda: gen.ours_generate(ours, ids, False), repeats=3)
        results[f"b{batch} fused step, eager"] = ms = seconds / gen.NEW * 1e3
        results[f"b{batch} fused eager tokens == fused graph tokens"] = same = bool(torch.equal(graph_tokens, eager_tokens))
        rows.append(f"| {batch} | fused step, eager (no graphs; same tokens as the fused graph: {'yes' if same else 'NO'}) "
                    f"| {ms:.3f} | - | - |")
        print(rows[-1], flush=True)
        if "mamba_ssm" in systems:
            m = systems["mamba_ssm"]
            seconds = gen.median_time(lambda: m.generate(input_ids=ids, max_length=gen.PROMPT + gen.NEW, cg=True,
                                                         top_k=1), repeats=5)
            results[f"b{batch} mamba-ssm cg"] = ms = seconds / gen.NEW * 1e3
            ratio = results[f"b{batch} mamba-ssm / ours (default)"] = ms / results[f"b{batch} + fused step (default)"]
            rows.append(f"| {batch} | mamba-ssm `generate(cg=True)` (its ms / ours default: {ratio:.2f}x) "
                        f"| {ms:.3f} | - | - |")
            print(rows[-1], flush=True)
    # GPU step for block configurations of the fused kernels, one setting changed at a time from the default
    from multimodal_mamba.kernels.decode_step import fused as fused_kernels

    knobs = ("CONV_X_PROJ_CONFIG", "SSM_STEP_CONFIG")
    defaults = {name: getattr(fused_kernels, name) for name in knobs}
    variants = [{}, {"CONV_X_PROJ_CONFIG": (256, 32, 4)}, {"CONV_X_PROJ_CONFIG": (1024, 32, 8)},
                {"CONV_X_PROJ_CONFIG": (512, 64, 8)}, {"SSM_STEP_CONFIG": (64, 8, 4)},
                {"SSM_STEP_CONFIG": (32, 4, 2)}, {"SSM_STEP_CONFIG": (16, 8, 4)}]
    sweep_rows = []
    for variant in variants:
        for name in knobs:
            setattr(fused_kernels, name, variant.get(name, defaults[name]))
        times = []
        for batch in (1, 16):
            setting(True, True, True)
            ids = torch.randint(1, 50000, (batch, gen.PROMPT), device="cuda")
            gen.ours_generate(ours, ids, True, 4)
            times.append(gen.graph_step_ms(ours, batch))
        label = ", ".join(f"{k} = {v}" for k, v in variant.items()) or "default"
        results[f"sweep {label}"] = times
        sweep_rows.append(f"| {label} | {times[0]:.3f} | {times[1]:.3f} |")
        print(sweep_rows[-1], flush=True)
    for name in knobs:
        setattr(fused_kernels, name, defaults[name])
    setting(True, True, True)  # the package's default
    from multimodal_mamba.kernels.gemv.fused import measured_choices

    choices = {f"{shape[0]}x{shape[1]}": (None if c is None else list(c)) for (_, shape, *_), c in measured_choices().items()}
    text = "\n".join([
        "# Decode at batch 1 and 16: what the deferred stop check, the one-row GEMV and the fused step each save", "",
        f"Device: {torch.cuda.get_device_name()}; torch {torch.__version__}; mamba-2.8b shape, bf16, random weights, "
        f"prompt {gen.PROMPT}, {gen.NEW} new tokens (greedy, min_new_tokens = max_new_tokens). "
        "Command: `python benchmarks/bench_gpu_decode_parts.py`.", "",
        "| batch | setting | ms / token (generate) | ms / step (graph replays back to back) | same 32 greedy tokens as 'graphs only' |",
        "|---|---|---|---|---|", *rows, "",
        "GPU step (ms, graph replays back to back) of the fused step per block configuration of "
        "kernels/decode_step/fused.py (conv + x_proj: (block_c, block_p, warps); state update: (block_d, "
        f"split_block, warps)), one changed at a time from the default {defaults}:", "",
        "| change | batch 1 | batch 16 |", "|---|---|---|", *sweep_rows, "",
        f"GEMV choices on this GPU (N x K: None = cuBLAS, else (block_n, block_k, split_k, warps)): {choices}", ""])
    (args.out / "gpu_decode_parts.md").write_text(text)
    (args.out / "gpu_decode_parts.json").write_text(json.dumps(dict(results=results, gpu_step_ms=replays, gemv_choices=choices), indent=1))
    print(text)


if __name__ == "__main__":
    main()
