"""Where the wall time of a graphed Coupled Mamba forward (``config.inference_cuda_graphs``) goes, beyond its kernels.

For the fusion benchmark's model at one length, prints medians (ms) of: the whole graphed call (wall, with a final
synchronize); the replay of the captured graph alone (wall, and device time between CUDA events); the host steps of
``_graphed_forward`` before the replay (feature split, finiteness check with its synchronization, the parameter
walk of the signature, the key lookup); the copies into the static inputs; the output clone; and the GPU kernel time
of one eager forward (torch.profiler) for comparison, then the graphed call once more (after the profiler).

    python benchmarks/diag_coupled_graph_wall.py [--length 500] [--batch 32] [--repeats 30]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import torch  # noqa: E402

from multimodal_mamba import CoupledMambaConfig, CoupledMambaModel, ssm_backend  # noqa: E402
from multimodal_mamba.modeling import ops_mamba_ssm  # noqa: E402,F401
from multimodal_mamba.modeling.forward_graphs import _clone_tree  # noqa: E402

MODALITIES = {"text": 300, "audio": 74, "vision": 35}


def median_ms(fn, repeats, sync=True):
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if sync:
            torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--length", type=int, default=500)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--chunk", type=int, default=None, help="config.inference_chunk_size")
    args = parser.parse_args()
    config = CoupledMambaConfig(modality_dims=MODALITIES, hidden_size=256, num_hidden_layers=4, state_size=16,
                                coupling="mean", inference_cuda_graphs=True, inference_chunk_size=args.chunk)
    torch.manual_seed(0)
    model = CoupledMambaModel(config).to("cuda", torch.bfloat16).eval()
    feats = {n: torch.randn(args.batch, args.length, d, device="cuda", dtype=torch.bfloat16)
             for n, d in MODALITIES.items()}
    names = config.modality_names
    result = {"length": args.length, "batch": args.batch, "chunk": args.chunk}
    with torch.no_grad(), ssm_backend("triton"):
        for _ in range(3):
            model(feats)
        torch.cuda.synchronize()
        result["graphed_call"] = median_ms(lambda: model(feats), args.repeats)
        (captured,) = [g for g in model._forward_graphs._graphs.values() if g is not None]
        result["replay_only"] = median_ms(captured.graph.replay, args.repeats)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        device_ms = []
        for _ in range(args.repeats):
            start.record()
            captured.graph.replay()
            end.record()
            end.synchronize()
            device_ms.append(start.elapsed_time(end))
        result["replay_device"] = statistics.median(device_ms)
        features = model._split_features(feats)
        result["split_features"] = median_ms(lambda: model._split_features(feats), args.repeats, sync=False)
        result["check_finite"] = median_ms(lambda: model._check_finite(names, features), args.repeats)
        walk = lambda: [p for module in model.modules() for p in module._parameters.values() if p is not None]  # noqa: E731
        result["parameter_walk"] = median_ms(walk, args.repeats, sync=False)
        storage = walk()
        result["key"] = median_ms(lambda: tuple(p.data_ptr() for p in storage), args.repeats, sync=False)
        tensors = list(feats.values())
        result["static_copies"] = median_ms(
            lambda: [s.copy_(t) for s, t in zip(captured.static_inputs, tensors)], args.repeats)
        result["output_clone"] = median_ms(lambda: _clone_tree(captured.static_output), args.repeats)
        model.config.inference_cuda_graphs = False
        result["eager_call"] = median_ms(lambda: model(feats), args.repeats)
        from torch.profiler import ProfilerActivity, profile

        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            model(feats)
            torch.cuda.synchronize()
        events = [e for e in prof.events() if e.device_type.name == "CUDA"]
        result["eager_kernel_time"] = sum(e.time_range.elapsed_us() for e in events) / 1e3
        result["eager_kernels"] = len(events)
        model.config.inference_cuda_graphs = True  # the same call again, now that the profiler has run once
        result["graphed_call_after_profiler"] = median_ms(lambda: model(feats), args.repeats)
    print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in result.items()}), flush=True)


if __name__ == "__main__":
    main()
