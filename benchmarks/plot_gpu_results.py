"""Plot the GPU benchmark results (the CSVs the bench_gpu_*.py scripts write) into one figure.

    python benchmarks/plot_gpu_results.py [--results benchmarks/results] [--out benchmarks/results/gpu_benchmarks.png]

Needs matplotlib (not a dependency of the package).
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def read(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def num(value):
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--out", type=Path, default=RESULTS / "gpu_benchmarks.png")
    args = parser.parse_args()
    fig, axes = plt.subplots(2, 2, figsize=(13, 9))

    ax = axes[0, 0]
    rows = read(args.results / "gpu_selective_scan.csv")
    labels = [f"L={r['L']}\n{r['layout']}" for r in rows]
    x = range(len(rows))
    width = 0.2
    for offset, key, name in ((-1.5, "ours_fwd_ms", "ours fwd"), (-0.5, "mamba_fwd_ms", "mamba-ssm fwd"),
                              (0.5, "ours_fwdbwd_ms", "ours fwd+bwd"), (1.5, "mamba_fwdbwd_ms", "mamba-ssm fwd+bwd")):
        ax.bar([i + offset * width for i in x], [num(r[key]) for r in rows], width, label=name)
    ax.set_xticks(list(x), labels)
    ax.set_yscale("log")
    ax.set_ylabel("ms (log)")
    ax.set_title("Selective scan, batch 1, dim 5120, N 16, bf16 (H200)")
    ax.legend(fontsize=8)

    ax = axes[0, 1]
    rows = read(args.results / "gpu_coupled_scan.csv")
    labels = [f"B{r['batch']} d{r['dim']}\nL{r['L']} N{r['N']} {r['dtype'][:4]}" for r in rows]
    x = list(range(len(rows)))
    chunked = "fwd_chunked_ms" in rows[0]  # (the earlier chunked forward, timed beside the default since issue 6's D)
    width, left = (0.27, -0.27) if chunked else (0.4, -0.2)
    if chunked:
        ax.bar([i + left for i in x], [num(r["fwd_chunked_ms"]) for r in rows], width, label="chunked fwd (before)")
        left += width
    ax.bar([i + left for i in x], [num(r["fwd_ms"]) for r in rows], width, label="Triton coupled scan fwd")
    ax.bar([i + left + width for i in x], [max(num(r["hbm_floor_ms"]), num(r["sfu_floor_ms"])) for r in rows],
           width, label="floor: max(HBM, exp2 units)")
    for i, r in enumerate(rows):
        ax.annotate(f"{100 * num(r['hbm_fraction']):.0f}% HBM", (i + left, num(r["fwd_ms"])), ha="center",
                    va="bottom", fontsize=8)
    ax.set_xticks(x, labels, fontsize=8)
    ax.set_yscale("log")
    ax.set_ylabel("ms (log)")
    ax.set_title("Coupled scan, M = 3 (goal: 60% of HBM bandwidth)")
    ax.legend(fontsize=8)

    ax = axes[1, 0]
    rows = read(args.results / "gpu_prefill.csv")
    keys = [k for k in ("torch_s", "triton_s", "mamba_ssm_s", "transformers_s") if k in rows[0]]
    x = list(range(len(rows)))
    for j, key in enumerate(keys):
        ax.bar([i + (j - (len(keys) - 1) / 2) * 0.2 for i in x], [num(r[key]) for r in rows], 0.2,
               label=key[:-2].replace("_", "-"))
    for i, r in enumerate(rows):
        fused = min(num(r[k]) for k in keys if k != "torch_s")
        ax.annotate(f"torch / fused {num(r['torch_s']) / fused:.1f}x", (i, num(r["torch_s"])), ha="center",
                    va="bottom", fontsize=8)
    ax.set_xticks(x, [f"L={r['L']}" for r in rows])
    ax.set_yscale("log")
    ax.set_ylabel("s (log)")
    ax.set_title("Prefill, mamba-2.8b shape, bf16, batch 1 (torch: blocked scan)")
    ax.legend(fontsize=8)

    ax = axes[1, 1]
    rows = read(args.results / "gpu_coupled_vs_attention.csv")
    lengths = [num(r["L"]) for r in rows]
    ax.plot(lengths, [num(r["coupled_s"]) for r in rows], "o-", label="Coupled Mamba time (s)")
    if "coupled_graph_s" in rows[0]:
        ax.plot(lengths, [num(r["coupled_graph_s"]) for r in rows], "^-", label="Coupled Mamba, CUDA graphs (s)")
    att = [(num(r["L"]), num(r["attention_s"])) for r in rows if num(r["attention_s"]) is not None]
    ax.plot([a for a, _ in att], [b for _, b in att], "s-", label="cross-attention time (s)")
    ax2 = ax.twinx()
    ax2.plot(lengths, [num(r["coupled_GiB"]) for r in rows], "o--", color="tab:green", label="Coupled Mamba GiB")
    chunked = [(num(r["L"]), num(r["chunk_GiB"])) for r in rows if num(r.get("chunk_GiB")) is not None]
    if chunked:
        ax2.plot([a for a, _ in chunked], [b for _, b in chunked], "v--", color="tab:olive",
                 label="Coupled Mamba in time chunks, GiB")
    attm = [(num(r["L"]), num(r["attention_GiB"])) for r in rows if num(r["attention_GiB"]) is not None]
    ax2.plot([a for a, _ in attm], [b for _, b in attm], "s--", color="tab:red", label="cross-attention GiB")
    for a in (ax, ax2):
        a.set_xscale("log")
        a.set_yscale("log")
    ax.set_xlabel("sequence length")
    ax.set_ylabel("forward time, s (log)")
    ax2.set_ylabel("peak memory above weights, GiB (log)")
    ax.set_title("Coupled Mamba vs cross-attention fusion (batch 32, hidden 256)")
    lines = ax.get_legend_handles_labels()
    lines2 = ax2.get_legend_handles_labels()
    ax.legend(lines[0] + lines2[0], lines[1] + lines2[1], fontsize=8, loc="upper left")

    fig.tight_layout()
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
