"""What a captured Coupled Mamba forward graph keeps allocated, per new input shape.

For the fusion benchmark's model (batch 32, hidden 256, 4 layers, bf16) with ``config.inference_cuda_graphs``, captures
one graph per length (``--lengths``) and prints, after each first call: the memory allocated above what was allocated
before it (what the graph and its capture left behind), and that first call's peak above the same base. Run twice in
one process: with every capture and its warm-up on one persistent side stream (``decode_graphs._capture_stream``, the
code now) and with a new side stream per capture (before session 10 the warm-up took a new one each time), to show
what a stream costs (cuBLAS keeps a workspace per stream).

    python benchmarks/diag_graph_memory.py [--lengths 100 200 300 400] [--out FILE.json]
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

from benchmarks.bench_gpu_coupled_vs_attention import MODALITIES  # noqa: E402
from multimodal_mamba import CoupledMambaConfig, CoupledMambaModel, ssm_backend  # noqa: E402
from multimodal_mamba.modeling import decode_graphs  # noqa: E402


def captures(model, lengths, batch):
    rows = []
    for length in lengths:
        feats = {n: torch.randn(batch, length, d, device="cuda", dtype=torch.bfloat16) for n, d in MODALITIES.items()}
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        with torch.no_grad(), ssm_backend("triton"):
            model(feats, return_last_hidden_state=False)
        torch.cuda.synchronize()
        rows.append({"L": length, "kept_MiB": round((torch.cuda.memory_allocated() - base) / 2**20, 2),
                     "peak_MiB": round((torch.cuda.max_memory_allocated() - base) / 2**20, 2),
                     "inputs_MiB": round(sum(f.numel() * 2 for f in feats.values()) / 2**20, 2)})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[100, 200, 300, 400])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    config = CoupledMambaConfig(modality_dims=MODALITIES, hidden_size=256, num_hidden_layers=4, state_size=16,
                                coupling="mean", inference_cuda_graphs=True)
    torch.manual_seed(0)
    model = CoupledMambaModel(config).to("cuda", torch.bfloat16).eval()
    model.config.inference_cuda_graphs = False
    for length in args.lengths:  # compile every kernel first (eager): their allocations stay out of the numbers
        with torch.no_grad(), ssm_backend("triton"):
            model({n: torch.randn(args.batch, length, d, device="cuda", dtype=torch.bfloat16)
                   for n, d in MODALITIES.items()}, return_last_hidden_state=False)
    model.config.inference_cuda_graphs = True
    result = {}
    print("one persistent capture and warm-up stream", flush=True)
    result["persistent_capture_stream"] = captures(model, args.lengths, args.batch)
    model._forward_graphs.clear()
    torch.cuda.empty_cache()
    print("a new side stream per capture", flush=True)
    original = decode_graphs._capture_stream
    decode_graphs._capture_stream = lambda device: torch.cuda.Stream(device=device)
    try:
        result["new_stream_each_capture"] = captures(model, [length + 8 for length in args.lengths], args.batch)
    finally:
        decode_graphs._capture_stream = original
    print(json.dumps(result, indent=1), flush=True)
    if args.out is not None:
        args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
