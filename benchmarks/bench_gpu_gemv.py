"""One-row projections (decode at batch 1) on the GPU: cuBLAS (``F.linear``) against the Triton GEMV configurations.

Shapes: a mamba-2.8b-shaped layer's in_proj, x_proj, dt_proj, out_proj and the LM head, bf16. Each implementation is
timed alone (CUDA events over many back-to-back calls, and replayed from a CUDA graph of 64 calls, as the decode step
runs them), and the fraction of the copy bandwidth its weight read reaches is printed; the choice
``linear_one_row`` makes on this GPU is shown beside. Results: benchmarks/results/gpu_gemv.{md,json}.

    python benchmarks/bench_gpu_gemv.py [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from multimodal_mamba.kernels.gemv import fused  # noqa: E402

SHAPES = {"in_proj": (10240, 2560, False), "x_proj": (192, 5120, False), "dt_proj": (5120, 160, True),
          "out_proj": (2560, 5120, False), "lm_head": (50280, 2560, False)}
LAYERS = 64


def copy_bandwidth():
    src = torch.empty(1 << 28, device="cuda", dtype=torch.uint8)
    dst = torch.empty_like(src)
    ms = fused._time_ms(lambda: dst.copy_(src), repeats=20)
    return 2 * src.numel() / (ms * 1e-3)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.manual_seed(0)
    bandwidth = copy_bandwidth()
    rows, lines = [], []
    header = "| projection | N x K | impl | us / call | us / call in a graph | fraction of copy bandwidth (graph) |"
    lines += [f"Device: {torch.cuda.get_device_name()}; torch {torch.__version__}; copy bandwidth "
              f"{bandwidth / 1e12:.2f} TB/s (bytes read + written by a device copy; a GEMV only reads, and a read-only "
              "stream can go above it); bf16 weights, one row. \"us / call\": back-to-back eager calls (host launch "
              "overhead included); \"in a graph\": 64 calls replayed from one CUDA graph, the GPU time a decode step "
              "pays. \"(chosen)\": what `linear_one_row` picked on this GPU.", "", header, "|---|---|---|---|---|---|"]
    step_linear, step_chosen = 0.0, 0.0
    for name, (n, k, with_bias) in SHAPES.items():
        weight = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / k**0.5
        bias = torch.randn(n, device="cuda", dtype=torch.bfloat16) if with_bias else None
        x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
        impls = {"F.linear (cuBLAS)": lambda: F.linear(x, weight, bias)}
        for config in fused.CANDIDATES:
            impls[f"triton {config}"] = lambda config=config: fused.gemv_triton(x, weight, bias, *config)
        fused.linear_one_row(x, weight, bias)  # measure and keep the choice
        chosen = fused.measured_choices()[(x.device.index, (n, k), torch.bfloat16, with_bias, bias.dtype if with_bias else None)]
        chosen_name = "F.linear (cuBLAS)" if chosen is None else f"triton {chosen}"
        weight_bytes = weight.numel() * 2
        times = {}
        for impl, fn in impls.items():
            alone = fused._time_ms(fn, repeats=50) * 1e3
            in_graph = fused._graph_time_ms(fn, calls=64, replays=20) * 1e3  # as the chooser times it
            times[impl] = in_graph
            frac = weight_bytes / (in_graph * 1e-6) / bandwidth
            mark = " (chosen)" if impl == chosen_name else ""
            lines.append(f"| {name} | {n} x {k} | {impl}{mark} | {alone:.2f} | {in_graph:.2f} | {frac:.2f} |")
            rows.append(dict(projection=name, n=n, k=k, impl=impl, us=alone, us_graph=in_graph, bw_fraction=frac,
                             chosen=impl == chosen_name))
        per_step = 1 if name == "lm_head" else LAYERS
        step_linear += per_step * times["F.linear (cuBLAS)"]
        step_chosen += per_step * times[chosen_name]
        best = min(times, key=times.get)
        print(f"{name}: cuBLAS {times['F.linear (cuBLAS)']:.2f} us, chosen {chosen_name} {times[chosen_name]:.2f} us, "
              f"fastest {best} {times[best]:.2f} us", flush=True)
    summary = (f"Per decode step at batch 1 (64 layers x 4 projections + the head, graph times): cuBLAS "
               f"{step_linear / 1e3:.3f} ms, the chosen routes {step_chosen / 1e3:.3f} ms; weight-read floor at copy "
               f"bandwidth {sum((n * k * 2) * (1 if p == 'lm_head' else LAYERS) for p, (n, k, _) in SHAPES.items()) / bandwidth * 1e3:.3f} ms.")
    print(summary)
    lines += ["", summary]
    text = "# One-row GEMV (decode at batch 1): cuBLAS vs the Triton GEMV\n\nCommand: `python benchmarks/bench_gpu_gemv.py`\n\n" + "\n".join(lines) + "\n"
    out_dir = Path(args.out) if args.out else REPO_ROOT / "benchmarks" / "results"
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "gpu_gemv.md").write_text(text)
    (out_dir / "gpu_gemv.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
