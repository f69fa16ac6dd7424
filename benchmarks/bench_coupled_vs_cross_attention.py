"""Coupled Mamba against cross-attention fusion of the same width: inference time and peak memory vs length.

The paper's Figures 3 and 4 (``shared/anchors/README.md``) compare GPU memory and inference time of Coupled Mamba
and a cross-attention fusion at sequence lengths 100..500 (device, batch and width not stated). This script
measures both models on this machine's CPU at lengths 100..500 and on up to 16K:

- ``coupled``: ``CoupledMambaForSequenceClassification`` with the paper's configuration (text 768 / audio 74 /
  vision 35, hidden 128, 3 layers, d_state 64, expand 2), coupling "mean", on the chunked PyTorch scan;
- ``xattn``: the same input projections, pooling, fusion and head, but each of the 3 layers replaces the coupled
  Mamba blocks by, per modality, pre-norm multi-head cross-attention (4 heads) from the modality to the
  concatenation of the other modalities (MulT-style), plus a pre-norm MLP of expansion 2: the same width;
  ``xattn`` materializes the attention matrix (softmax(QK^T) V, as the paper's baseline did);
- ``xattn_sdpa``: the same, through ``torch.nn.functional.scaled_dot_product_attention`` (PyTorch's fused
  attention, which avoids materializing the matrix where it can).

Every point runs in a fresh subprocess (``--point``) so that peak memory is that process's own: peak resident
memory (VmHWM, reset through /proc/self/clear_refs) during one forward minus the resident memory before it.
Time is the fastest of the timed forwards after one warm-up (the least disturbed by other work on a shared
machine; one run at L > 2000) (batch ``--batch``, no grad, eval mode). The machine is
shared: compare the ratio in each row, measured in the same command, not the absolute times.
Results go to ``benchmarks/results/coupled_vs_cross_attention.md``.

    python benchmarks/bench_coupled_vs_cross_attention.py [--lengths 100 200 300 400 500 1000 2000 4000 8000 16000]
        [--batch 1] [--threads 2] [--max-eager 4000]
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

PAPER = {  # Figures 3 and 4: (cross-attention, Coupled Mamba)
    "memory_gb": {100: (1.36, 1.17), 200: (2.93, 1.39), 300: (5.27, 1.56), 400: (8.49, 1.75), 500: (12.61, 2.05)},
    "time_s": {100: (0.0587, 0.0306), 200: (0.0648, 0.0343), 300: (0.0726, 0.0363), 400: (0.0754, 0.0374),
               500: (0.0791, 0.0396)},
}


def _rss_kb(field):
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not found in /proc/self/status")


def build_model(kind, heads=4):
    import torch
    from torch import nn
    import torch.nn.functional as F

    from multimodal_mamba import CoupledMambaConfig, CoupledMambaForSequenceClassification
    from multimodal_mamba.modeling.modeling_coupled_mamba import CoupledMambaClassificationHead, CoupledMambaInputProjection

    config = CoupledMambaConfig(num_labels=1)  # the paper's: text 768 / audio 74 / vision 35, hidden 128, 3 layers
    if kind == "coupled":
        return CoupledMambaForSequenceClassification(config).eval(), config

    class CrossAttentionLayer(nn.Module):
        """Per modality: x + CrossAttn(LN(x), LN(others)); x + MLP(LN(x)). Hidden 128, 4 heads, MLP expansion 2."""

        def __init__(self):
            super().__init__()
            size = config.hidden_size
            self.blocks = nn.ModuleList()
            for _ in config.modality_names:
                self.blocks.append(nn.ModuleDict(dict(
                    norm_q=nn.LayerNorm(size), norm_kv=nn.LayerNorm(size), q=nn.Linear(size, size),
                    k=nn.Linear(size, size), v=nn.Linear(size, size), o=nn.Linear(size, size),
                    norm_mlp=nn.LayerNorm(size), mlp=nn.Sequential(nn.Linear(size, config.expand * size), nn.GELU(),
                                                                   nn.Linear(config.expand * size, size)),
                )))

        def attend(self, q, k, v):
            if kind == "xattn_sdpa":
                return F.scaled_dot_product_attention(q, k, v)
            weights = torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1)
            return weights @ v

        def forward(self, streams):
            outputs = []
            for m, block in enumerate(self.blocks):
                x = streams[m]
                others = torch.cat([s for i, s in enumerate(streams) if i != m], dim=1)
                batch, length, size = x.shape
                split = lambda t: t.view(batch, -1, heads, size // heads).transpose(1, 2)  # noqa: E731
                kv = block["norm_kv"](others)
                attended = self.attend(split(block["q"](block["norm_q"](x))), split(block["k"](kv)), split(block["v"](kv)))
                x = x + block["o"](attended.transpose(1, 2).reshape(batch, length, size))
                outputs.append(x + block["mlp"](block["norm_mlp"](x)))
            return outputs

    class CrossAttentionFusion(nn.Module):
        def __init__(self):
            super().__init__()
            self.projections = nn.ModuleList(
                [CoupledMambaInputProjection(dim, config) for dim in config.modality_dims.values()]
            )
            self.layers = nn.ModuleList([CrossAttentionLayer() for _ in range(config.num_hidden_layers)])
            self.norms = nn.ModuleList([nn.LayerNorm(config.hidden_size) for _ in config.modality_names])
            self.fusion_logits = nn.Parameter(torch.zeros(len(config.modality_names)))
            self.classifier = CoupledMambaClassificationHead(config.hidden_size, config)

        def forward(self, input_features):
            parts = torch.split(input_features, list(config.modality_dims.values()), dim=-1)
            streams = [proj(part) for proj, part in zip(self.projections, parts)]
            for layer in self.layers:
                streams = layer(streams)
            pooled = torch.stack([norm(s).mean(1) for norm, s in zip(self.norms, streams)], dim=1)
            fused = (pooled * torch.softmax(self.fusion_logits, 0)[None, :, None]).sum(1)
            return self.classifier(fused)

    return CrossAttentionFusion().eval(), config


def run_point(kind, length, batch, repeats, threads):
    """Measure one (model, length) in this process; prints a JSON line."""
    import torch

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model, config = build_model(kind)
    params = sum(p.numel() for p in model.parameters())
    features = torch.randn(batch, length, sum(config.modality_dims.values()))

    def forward():
        with torch.no_grad():
            out = model(features)
            return out.logits if hasattr(out, "logits") else out

    before = _rss_kb("VmRSS")
    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")  # reset VmHWM to the current RSS
    start = time.perf_counter()
    forward()
    first = time.perf_counter() - start
    peak = _rss_kb("VmHWM")
    times = [first]
    if first < 60:  # a warm-up already ran (the first call); time the repeats
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            forward()
            times.append(time.perf_counter() - start)
    print(json.dumps(dict(kind=kind, length=length, batch=batch, params=params, time_s=min(times),
                          runs=len(times), peak_mb=(peak - before) / 1024.0)))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[100, 200, 300, 400, 500, 1000, 2000, 4000, 8000, 16000])
    parser.add_argument("--kinds", nargs="+", default=["coupled", "xattn", "xattn_sdpa"])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--max-eager", type=int, default=4000,
                        help="longest length for the materialized-attention baseline (its matrix grows as L^2)")
    parser.add_argument("--output", default=str(REPO_ROOT / "benchmarks" / "results" / "coupled_vs_cross_attention.md"))
    parser.add_argument("--no-write", action="store_true")
    parser.add_argument("--point", nargs=2, metavar=("KIND", "LENGTH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.point:
        run_point(args.point[0], int(args.point[1]), args.batch, args.repeats, args.threads)
        return

    import torch
    import transformers

    rows = {}
    total_start = time.perf_counter()
    for length in args.lengths:
        for kind in args.kinds:
            if kind == "xattn" and length > args.max_eager:
                continue
            repeats = args.repeats if length <= 2000 else 1
            command = [sys.executable, __file__, "--point", kind, str(length), "--batch", str(args.batch),
                       "--threads", str(args.threads), "--repeats", str(repeats)]
            result = subprocess.run(command, capture_output=True, text=True, timeout=1800)
            if result.returncode != 0:
                rows[(kind, length)] = {"error": result.stderr.strip().splitlines()[-1] if result.stderr else "failed"}
            else:
                rows[(kind, length)] = json.loads(result.stdout.strip().splitlines()[-1])
            print(kind, length, rows[(kind, length)], flush=True)
    total = time.perf_counter() - total_start

    def cell(kind, length, key, fmt):
        row = rows.get((kind, length))
        if row is None:
            return "not run" if kind != "xattn" else f"not run (L > {args.max_eager})"
        if "error" in row:
            return "error: " + row["error"][:60]
        return fmt.format(row[key])

    params = {kind: rows[(kind, args.lengths[0])].get("params") for kind in args.kinds if (kind, args.lengths[0]) in rows}
    lines = [
        "# Coupled Mamba vs cross-attention fusion of the same width: inference time and peak memory (CPU)",
        "",
        f"Command: `python {shlex.join(['benchmarks/bench_coupled_vs_cross_attention.py'] + sys.argv[1:])}`",
        "",
        f"Machine: {platform.machine()} CPU, {args.threads} threads (shared machine: compare ratios within a row); "
        f"torch {torch.__version__}, transformers {transformers.__version__}. Batch {args.batch}, float32, no grad; time = "
        f"fastest of {args.repeats} runs after a warm-up (1 run for L > 2000). "
        f"Total time {total:.0f} s.",
        "",
        "Models (the paper's configuration: text 768 / audio 74 / vision 35 features, hidden 128, 3 layers): "
        f"`coupled` = CoupledMambaForSequenceClassification, d_state 64, expand 2, coupling mean, chunked PyTorch "
        f"scan ({params.get('coupled')} parameters); `xattn` = per-modality cross-attention to the other modalities "
        f"(4 heads) + MLP (expansion 2), materialized softmax(QK^T)V ({params.get('xattn')} parameters); "
        "`xattn_sdpa` = the same through torch's scaled_dot_product_attention. Peak memory = peak resident memory "
        "of a fresh process during one forward minus its resident memory before (weights and inputs excluded).",
        "",
        "| L | coupled time (s) | xattn time (s) | xattn_sdpa time (s) | xattn / coupled time | coupled peak (MB) "
        "| xattn peak (MB) | xattn_sdpa peak (MB) | xattn / coupled memory |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for length in args.lengths:
        ratio_t = ratio_m = "-"
        c, x = rows.get(("coupled", length)), rows.get(("xattn", length))
        if c and x and "error" not in c and "error" not in x:
            ratio_t = f"{x['time_s'] / c['time_s']:.2f}"
            ratio_m = f"{x['peak_mb'] / max(c['peak_mb'], 1e-9):.2f}"
        lines.append(
            f"| {length} | {cell('coupled', length, 'time_s', '{:.4f}')} | {cell('xattn', length, 'time_s', '{:.4f}')} "
            f"| {cell('xattn_sdpa', length, 'time_s', '{:.4f}')} | {ratio_t} | {cell('coupled', length, 'peak_mb', '{:.1f}')} "
            f"| {cell('xattn', length, 'peak_mb', '{:.1f}')} | {cell('xattn_sdpa', length, 'peak_mb', '{:.1f}')} | {ratio_m} |"
        )
    lines += [
        "",
        "Paper anchors (Figures 3 and 4; GPU, batch and width not stated), cross-attention vs Coupled Mamba:",
        "",
        "| L | paper memory (GB) xattn / coupled | ratio | paper time (s) xattn / coupled | ratio |",
        "|---|---|---|---|---|",
    ]
    for length, (mx, mc) in PAPER["memory_gb"].items():
        tx, tc = PAPER["time_s"][length]
        lines.append(f"| {length} | {mx} / {mc} | {mx / mc:.2f} | {tx} / {tc} | {tx / tc:.2f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if not args.no_write:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(text)
        print(f"written to {args.output}")


if __name__ == "__main__":
    main()
