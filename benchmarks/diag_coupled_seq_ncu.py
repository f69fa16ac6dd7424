"""One launch of the sequential coupled-scan forward per given config at one shape, for ncu:

    ncu -k regex:_coupled_seq_fwd_kernel --section WarpStateStats ... python benchmarks/diag_coupled_seq_ncu.py \\
        --shape 32,3,512,500,16 --layout tmajor --configs 8,1,4,1,1,0,0 8,1,4,1,1,1,128
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--shape", default="32,3,512,500,16")
    parser.add_argument("--layout", default="tmajor")
    parser.add_argument("--configs", nargs="+", default=["8,1,4,1,1,0,0", "8,1,4,1,1,1,128"])
    args = parser.parse_args()
    import torch

    from benchmarks.bench_gpu_coupled_scan import make_inputs, run_impl

    shape = tuple(int(v) for v in args.shape.split(","))
    t = make_inputs(*shape, torch.bfloat16, time_major=args.layout == "tmajor")
    with torch.no_grad():
        for text in args.configs:
            run_impl(t, "sequential", tuple(int(v) for v in text.split(",")))
    torch.cuda.synchronize()


if __name__ == "__main__":
    main()
