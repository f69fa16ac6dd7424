"""Where the host time of a Coupled Mamba inference forward goes (the fusion benchmark's model, one length).

Prints: wall time with a final synchronize, the host time of the forward call alone (no synchronize: when the host
is the bottleneck this is most of the wall time), the device synchronizations inside the forward
(``torch.cuda.set_sync_debug_mode``, with the line that caused each), and a cProfile of one forward (top functions
by own time).

    python benchmarks/diag_coupled_host.py [--length 500] [--batch 32]
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import sys
import time
import traceback
import warnings
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import torch  # noqa: E402

from multimodal_mamba import CoupledMambaConfig, CoupledMambaModel, ssm_backend  # noqa: E402
from multimodal_mamba.modeling import ops_mamba_ssm  # noqa: E402,F401

MODALITIES = {"text": 300, "audio": 74, "vision": 35}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--length", type=int, default=500)
    parser.add_argument("--batch", type=int, default=32)
    args = parser.parse_args()
    config = CoupledMambaConfig(modality_dims=MODALITIES, hidden_size=256, num_hidden_layers=4, state_size=16,
                                coupling="mean")
    torch.manual_seed(0)
    model = CoupledMambaModel(config).to("cuda", torch.bfloat16).eval()
    feats = {n: torch.randn(args.batch, args.length, d, device="cuda", dtype=torch.bfloat16)
             for n, d in MODALITIES.items()}
    with torch.no_grad(), ssm_backend("triton"):
        for _ in range(5):
            model(feats)
        torch.cuda.synchronize()
        walls, hosts = [], []
        for _ in range(10):
            start = time.perf_counter()
            model(feats)
            hosts.append(time.perf_counter() - start)
            torch.cuda.synchronize()
            walls.append(time.perf_counter() - start)
        print(f"L {args.length}: wall median {sorted(walls)[5] * 1e3:.3f} ms, host (no sync) median "
              f"{sorted(hosts)[5] * 1e3:.3f} ms", flush=True)
        torch.cuda.set_sync_debug_mode("warn")
        sites = []

        def record(message, category, filename, lineno, file=None, line=None):
            frames = [f for f in traceback.extract_stack()[:-1] if "multimodal_mamba" in f.filename]
            where = f"{frames[-1].filename.split('multimodal_mamba/')[-1]}:{frames[-1].lineno} {frames[-1].line}" \
                if frames else f"{filename}:{lineno}"
            sites.append(f"{str(message)[:60]} at {where}")

        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.showwarning = record
            model(feats)
            torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode(0)
        print(f"synchronizing calls in one forward: {len(sites)}", flush=True)
        for site in sites:
            print("  sync:", site, flush=True)
        profiler = cProfile.Profile()
        profiler.enable()
        model(feats)
        profiler.disable()
        torch.cuda.synchronize()
        text = io.StringIO()
        pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(35)
        print(text.getvalue(), flush=True)
        text = io.StringIO()
        pstats.Stats(profiler, stream=text).sort_stats("cumulative").print_stats(45)
        print(text.getvalue(), flush=True)


if __name__ == "__main__":
    main()
