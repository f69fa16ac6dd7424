"""Where decode time goes at batch 1 and 16: CUDA-graph decode with and without the deferred stop check and the
one-row GEMV, against mamba-ssm's CUDA-graph decode, in one process (mamba-2.8b shape, bf16, random weights).

- graphs only: transformers' per-token stop check (a host sync per token) and cuBLAS for every projection;
- + deferred stop check (modeling/deferred_stop.py): transformers' ``DeferredStopCheck`` (which transformers itself
  uses only on mps): the host prepares step t+1 while the GPU runs step t;
- + GEMV (kernels/gemv): one-row projections by the fastest of cuBLAS and the Triton GEMV, measured per shape;
- both: what ``generate()`` does by default.

Also the graph replay alone (back to back, no generate loop): the GPU time of one step.

    python benchmarks/bench_gpu_decode_parts.py [--out DIR]   (writes gpu_decode_parts.{md,json})
"""

from __future__ import annotations

import argparse
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
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "benchmarks" / "results")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    args.skip_transformers = True
    _, systems = gen.build_models(args)
    ours = systems["ours"]
    original_check = generation_utils.DeferredStopCheck.__dict__["is_supported"]
    allow_deferred_stop_check()
    extended_check = generation_utils.DeferredStopCheck.__dict__["is_supported"]
    kernels = modeling_mamba_lm._package_kernels()
    gemv = kernels["linear_one_row"]

    def cublas_one_row(x, weight, bias=None):
        return F.linear(x, weight, bias)

    def setting(deferred, use_gemv):
        generation_utils.DeferredStopCheck.is_supported = extended_check if deferred else original_check
        kernels["linear_one_row"] = gemv if use_gemv else cublas_one_row
        ours.decode_graphs.clear()  # recapture with this setting's projections

    rows, results = [], {}
    settings = {"graphs only": (False, False), "+ deferred stop check": (True, False), "+ GEMV": (False, True),
                "both (default)": (True, True)}
    for batch in (1, 16):
        ids = torch.randint(1, 50000, (batch, gen.PROMPT), device="cuda")
        reference = None
        for name, (deferred, use_gemv) in settings.items():
            setting(deferred, use_gemv)
            tokens = gen.ours_generate(ours, ids, True, 32)
            reference = tokens if reference is None else reference
            same = bool(torch.equal(tokens, reference))
            seconds = gen.median_time(lambda: gen.ours_generate(ours, ids, True), repeats=5)
            results[f"b{batch} {name}"] = ms = seconds / gen.NEW * 1e3
            # GPU time of one step: replays of the captured graph back to back.
            bucket = next(iter(ours.decode_graphs._buckets.values()))
            replay_ms = gen.median_time(lambda: [bucket.graph.replay() for _ in range(50)], repeats=3) / 50 * 1e3
            rows.append(f"| {batch} | {name} | {ms:.3f} | {replay_ms:.3f} | {'yes' if same else 'NO'} |")
            print(rows[-1], flush=True)
        if "mamba_ssm" in systems:
            m = systems["mamba_ssm"]
            seconds = gen.median_time(lambda: m.generate(input_ids=ids, max_length=gen.PROMPT + gen.NEW, cg=True,
                                                         top_k=1), repeats=5)
            results[f"b{batch} mamba-ssm cg"] = ms = seconds / gen.NEW * 1e3
            rows.append(f"| {batch} | mamba-ssm `generate(cg=True)` | {ms:.3f} | - | - |")
            print(rows[-1], flush=True)
    setting(True, True)  # the package's default
    from multimodal_mamba.kernels.gemv.fused import measured_choices

    choices = {f"{shape[0]}x{shape[1]}": (None if c is None else list(c)) for (_, shape, *_), c in measured_choices().items()}
    text = "\n".join([
        "# Decode at batch 1 and 16: what the deferred stop check and the one-row GEMV each save", "",
        f"Device: {torch.cuda.get_device_name()}; torch {torch.__version__}; mamba-2.8b shape, bf16, random weights, "
        f"prompt {gen.PROMPT}, {gen.NEW} new tokens (greedy, min_new_tokens = max_new_tokens). "
        "Command: `python benchmarks/bench_gpu_decode_parts.py`.", "",
        "| batch | setting | ms / token (generate) | ms / step (graph replays back to back) | same 32 greedy tokens as 'graphs only' |",
        "|---|---|---|---|---|", *rows, "",
        f"GEMV choices on this GPU (N x K: None = cuBLAS, else (block_n, block_k, split_k, warps)): {choices}", ""])
    (args.out / "gpu_decode_parts.md").write_text(text)
    (args.out / "gpu_decode_parts.json").write_text(json.dumps(dict(results=results, gemv_choices=choices), indent=1))
    print(text)


if __name__ == "__main__":
    main()
