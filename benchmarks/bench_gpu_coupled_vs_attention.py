"""Coupled Mamba against a cross-attention fusion model of the same width: inference time and peak GPU memory.

The Coupled Mamba paper (Figures 3 and 4) compares its model with cross-attention fusion at sequence lengths
100..500 (anchors in ../shared/anchors/README.md). Here both run on the same GPU, the same three modalities, batch,
width and depth:

- ``CoupledMambaModel`` (coupling "mean", the coupled scan on the "triton" backend);
- ``CrossAttentionFusion``: per layer and modality, multi-head cross-attention from that modality to the other two
  (keys and values concatenated), then a feed-forward block, pre-norm residuals (MulT-style). Attention is computed
  explicitly (scores materialized, as in MulT's implementation); pass ``--sdpa`` for PyTorch's fused attention.

Both return the fused representation: the attention model its pooled (batch, hidden) vector, Coupled Mamba its pooled
and fused vectors (``return_last_hidden_state=False``; ``--keep-last-hidden-state`` adds its (batch, M, L, hidden)
final states, as runs before session 10 did).

For each length the script reports the forward time (no grad, median) and the peak memory above the weights and
inputs, and the ratios attention / Coupled Mamba (goal at L = 500: >= 3x faster, >= 8x less memory; linear growth
beyond). Lengths where attention runs out of memory are reported as such.

Columns ``chunk_*``: the same Coupled Mamba model with ``config.inference_chunk_size`` (``--chunk``, default 64):
time chunks through all layers with carried states, so its memory grows with the chunk, not with L (the outputs
excepted); eager and, with ``--graphs``, as CUDA graphs.

    python benchmarks/bench_gpu_coupled_vs_attention.py [--batch 32] [--hidden 256] [--layers 4] [--chunk 64]
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import torch  # noqa: E402
from torch import nn  # noqa: E402
from torch.nn import functional as F  # noqa: E402

from multimodal_mamba import CoupledMambaConfig, CoupledMambaModel, last_backend, ssm_backend  # noqa: E402
from multimodal_mamba.modeling import ops_mamba_ssm  # noqa: E402,F401

MODALITIES = {"text": 300, "audio": 74, "vision": 35}  # CMU-MOSI / MOSEI feature sizes


class CrossAttentionBlock(nn.Module):
    def __init__(self, hidden, heads, sdpa):
        super().__init__()
        self.heads, self.sdpa = heads, sdpa
        self.norm_q, self.norm_kv, self.norm_ff = nn.LayerNorm(hidden), nn.LayerNorm(hidden), nn.LayerNorm(hidden)
        self.q, self.k, self.v, self.o = (nn.Linear(hidden, hidden) for _ in range(4))
        self.ff = nn.Sequential(nn.Linear(hidden, 4 * hidden), nn.GELU(), nn.Linear(4 * hidden, hidden))

    def forward(self, x, context):
        b, lq, h = x.shape
        q = self.q(self.norm_q(x)).view(b, lq, self.heads, -1).transpose(1, 2)
        kv = self.norm_kv(context)
        k = self.k(kv).view(b, kv.shape[1], self.heads, -1).transpose(1, 2)
        v = self.v(kv).view(b, kv.shape[1], self.heads, -1).transpose(1, 2)
        if self.sdpa:
            att = F.scaled_dot_product_attention(q, k, v)
        else:
            scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
            att = scores.softmax(dim=-1) @ v
        x = x + self.o(att.transpose(1, 2).reshape(b, lq, h))
        return x + self.ff(self.norm_ff(x))


class CrossAttentionFusion(nn.Module):
    """M modality streams; in every layer each attends to the concatenation of the others."""

    def __init__(self, dims, hidden, layers, heads, sdpa):
        super().__init__()
        self.names = list(dims)
        self.proj = nn.ModuleDict({n: nn.Linear(d, hidden) for n, d in dims.items()})
        self.layers = nn.ModuleList(
            nn.ModuleDict({n: CrossAttentionBlock(hidden, heads, sdpa) for n in self.names}) for _ in range(layers)
        )

    def forward(self, feats):
        xs = {n: self.proj[n](feats[n]) for n in self.names}
        for layer in self.layers:
            xs = {n: layer[n](xs[n], torch.cat([xs[o] for o in self.names if o != n], dim=1)) for n in self.names}
        return torch.stack([xs[n].mean(1) for n in self.names], 1).mean(1)


def measure(model, feats, repeats=7, **kwargs):
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    with torch.no_grad():
        model(feats, **kwargs)
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            model(feats, **kwargs)
            torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2], peak / 2**30


def measure_graphed(coupled, feats, **kwargs):
    """``measure`` with config.inference_cuda_graphs on: the first call captures (its peak counts); the graph is
    dropped afterwards. Raises if no graph was captured (the timings would be the eager forward's)."""
    coupled.config.inference_cuda_graphs = True
    try:
        result = measure(coupled, feats, **kwargs)
    finally:
        coupled.config.inference_cuda_graphs = False
        captured = len(coupled._forward_graphs)
        coupled._forward_graphs.clear()
        torch.cuda.empty_cache()
    if captured != 1:
        raise RuntimeError(f"the graphed forward did not capture ({captured} graphs)")
    return result


def gpu_time(model, feats, **kwargs):
    """Seconds of GPU kernel time in one no-grad forward (torch.profiler): the forward's cost without the host's
    launch overhead, which bounds the wall time from below when the host keeps ahead."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    with torch.no_grad():
        torch.cuda.synchronize()
        with torch_profile(activities=[ProfilerActivity.CUDA]) as prof:
            model(feats, **kwargs)
            torch.cuda.synchronize()
    events = [e for e in prof.events() if e.device_type.name == "CUDA"]
    return sum(e.time_range.elapsed_us() for e in events) / 1e6, len(events)


def profile(coupled, attention, batch, length):
    """Where the time of one no-grad forward goes: CUDA time per kernel (top 15) and the number of launches."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    feats = {n: torch.randn(batch, length, d, device="cuda", dtype=torch.bfloat16) for n, d in MODALITIES.items()}
    for name, model in (("coupled", coupled), ("attention", attention)):
        with torch.no_grad(), ssm_backend("triton"):
            for _ in range(3):
                model(feats)
            torch.cuda.synchronize()
            with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                model(feats)
                torch.cuda.synchronize()
        events = [e for e in prof.events() if e.device_type.name == "CUDA"]
        total = sum(e.time_range.elapsed_us() for e in events)
        print(f"== {name}, L {length}: {len(events)} kernels, {total / 1e3:.3f} ms of GPU time", flush=True)
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=15, max_name_column_width=60),
              flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--state", type=int, default=16)
    parser.add_argument("--lengths", type=int, nargs="+",
                        default=[100, 200, 300, 400, 500, 1000, 2000, 4000, 8000, 16000])
    parser.add_argument("--sdpa", action="store_true")
    parser.add_argument("--graphs", action=argparse.BooleanOptionalAction, default=True,
                        help="also time Coupled Mamba with config.inference_cuda_graphs (columns coupled_graph_*)")
    parser.add_argument("--chunk", type=int, default=64,
                        help="config.inference_chunk_size of the chunk_* columns (0: skip them)")
    parser.add_argument("--gpu-time-max-length", type=int, default=2000,
                        help="also measure the GPU kernel time (profiler) of one forward up to this length")
    parser.add_argument("--profile", type=int, default=0, metavar="L",
                        help="only profile one forward of each model at length L (CUDA time per kernel, launches)")
    parser.add_argument("--keep-last-hidden-state", action="store_true",
                        help="Coupled Mamba also returns its (batch, M, L, hidden) final states (by default it returns "
                             "the pooled and fused vectors only, as the attention model returns its pooled vector)")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "benchmarks" / "results")
    args = parser.parse_args()
    outputs = dict(return_last_hidden_state=args.keep_last_hidden_state)
    dtype = torch.bfloat16
    config = CoupledMambaConfig(modality_dims=MODALITIES, hidden_size=args.hidden, num_hidden_layers=args.layers,
                                state_size=args.state, coupling="mean")
    torch.manual_seed(0)
    coupled = CoupledMambaModel(config).to("cuda", dtype).eval()
    attention = CrossAttentionFusion(MODALITIES, args.hidden, args.layers, args.heads, args.sdpa).to("cuda", dtype)
    attention.eval()
    params = lambda m: sum(p.numel() for p in m.parameters()) / 1e6  # noqa: E731
    print(f"params: coupled {params(coupled):.2f} M, attention {params(attention):.2f} M", flush=True)
    if args.profile:
        profile(coupled, attention, args.batch, args.profile)
        return
    rows = []
    for length in args.lengths:
        feats = {n: torch.randn(args.batch, length, d, device="cuda", dtype=dtype) for n, d in MODALITIES.items()}
        row = dict(L=length)
        with ssm_backend("triton"):
            row["coupled_s"], row["coupled_GiB"] = measure(coupled, feats, **outputs)
            assert last_backend("coupled_selective_scan") == "triton"
            if args.graphs:
                row["coupled_graph_s"], row["coupled_graph_GiB"] = measure_graphed(coupled, feats, **outputs)
            if args.chunk and length > args.chunk:
                coupled.config.inference_chunk_size = args.chunk
                try:
                    row["chunk_s"], row["chunk_GiB"] = measure(coupled, feats, **outputs)
                    if args.graphs:
                        row["chunk_graph_s"], row["chunk_graph_GiB"] = measure_graphed(coupled, feats, **outputs)
                finally:
                    coupled.config.inference_chunk_size = None
        try:
            row["attention_s"], row["attention_GiB"] = measure(attention, feats)
            row["time_ratio"] = row["attention_s"] / row["coupled_s"]
            if "coupled_graph_s" in row:
                row["graph_time_ratio"] = row["attention_s"] / row["coupled_graph_s"]
            row["memory_ratio"] = row["attention_GiB"] / max(row["coupled_GiB"], 1e-9)
            if "chunk_s" in row:
                row["chunk_time_ratio"] = row["attention_s"] / row["chunk_s"]
                row["chunk_memory_ratio"] = row["attention_GiB"] / max(row["chunk_GiB"], 1e-9)
            if "chunk_graph_s" in row:
                row["chunk_graph_time_ratio"] = row["attention_s"] / row["chunk_graph_s"]
                row["chunk_graph_memory_ratio"] = row["attention_GiB"] / max(row["chunk_graph_GiB"], 1e-9)
        except torch.OutOfMemoryError:
            row["attention_s"] = row["attention_GiB"] = "OOM"
        torch.cuda.empty_cache()
        rows.append(row)
        print(json.dumps({k: (round(v, 5) if isinstance(v, float) else v) for k, v in row.items()}), flush=True)
    # GPU kernel time (torch.profiler) in a second pass, after every wall time, so that no timed call follows a
    # profiled one (checked: the graphed forward at L 500 took 2.73 ms before and 2.75 ms after a profiled forward,
    # benchmarks/diag_coupled_graph_wall.py)
    for row in rows:
        if row["L"] > args.gpu_time_max_length:
            continue
        feats = {n: torch.randn(args.batch, row["L"], d, device="cuda", dtype=dtype) for n, d in MODALITIES.items()}
        with ssm_backend("triton"):
            row["coupled_gpu_s"], row["coupled_kernels"] = gpu_time(coupled, feats, **outputs)
            if "chunk_s" in row:
                coupled.config.inference_chunk_size = args.chunk
                try:
                    row["chunk_gpu_s"], row["chunk_kernels"] = gpu_time(coupled, feats, **outputs)
                finally:
                    coupled.config.inference_chunk_size = None
        if isinstance(row.get("attention_s"), float):
            row["attention_gpu_s"], row["attention_kernels"] = gpu_time(attention, feats)
            row["gpu_time_ratio"] = row["attention_gpu_s"] / row["coupled_gpu_s"]
    args.out.mkdir(parents=True, exist_ok=True)
    fields = ["L", "coupled_s", "attention_s", "time_ratio", "coupled_GiB", "attention_GiB", "memory_ratio",
              "coupled_gpu_s", "attention_gpu_s", "gpu_time_ratio", "coupled_kernels", "attention_kernels",
              "coupled_graph_s", "graph_time_ratio", "coupled_graph_GiB", "chunk_s", "chunk_time_ratio", "chunk_GiB",
              "chunk_memory_ratio", "chunk_gpu_s", "chunk_kernels", "chunk_graph_s", "chunk_graph_time_ratio",
              "chunk_graph_GiB", "chunk_graph_memory_ratio"]
    with open(args.out / "gpu_coupled_vs_attention.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)  # noqa: E731
    lines = [
        "# Coupled Mamba vs cross-attention fusion of the same width (inference, bf16)",
        "",
        f"Device: {torch.cuda.get_device_name()}; batch {args.batch}, hidden {args.hidden}, {args.layers} layers, "
        f"3 modalities {MODALITIES}; Coupled Mamba state {args.state}, coupling 'mean', Triton coupled scan; "
        f"attention: {args.heads} heads, {'SDPA' if args.sdpa else 'explicit (materialized) attention, as MulT'}. "
        f"Time: forward, no grad, median of 7 (wall clock, host launches included). Memory: peak above weights and "
        f"inputs. *_gpu_s: GPU kernel time of one forward (torch.profiler), *_kernels: its kernel count. "
        f"coupled_graph_*: the same Coupled Mamba model with config.inference_cuda_graphs=True (one CUDA graph per "
        f"input shape, captured on the first call, whose peak memory counts). chunk_*: the same model with "
        f"config.inference_chunk_size={args.chunk} (time chunks through all layers, states carried), eager and "
        f"graphed. Outputs: the attention model returns its pooled (batch, hidden) vector; Coupled Mamba returns "
        f"{'also its (batch, M, L, hidden) final states' if args.keep_last_hidden_state else 'its pooled and fused vectors only (return_last_hidden_state=False)'}. "
        f"Ratios: attention / coupled.",
        "",
        "Command: `" + " ".join(["python benchmarks/bench_gpu_coupled_vs_attention.py"] + sys.argv[1:]) + "`",
        "",
        "| " + " | ".join(fields) + " |",
        "|" + "---|" * len(fields),
    ]
    for r in rows:
        lines.append("| " + " | ".join(fmt(r.get(k, "-")) for k in fields) + " |")
    (args.out / "gpu_coupled_vs_attention.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
