"""Why the sequential coupled-scan forward is slow: time its variants side by side on the GPU (one process).

Each variant is a launch configuration of ``kernels/coupled_scan/sequential.py``: (block_d, num_warps, K,
prefetch_bc, bc_ahead), i.e. channels per warp (32 / block_d lanes per channel), steps per chunk, whether the next
chunk's B / C rows are prefetched into L1 a chunk ahead, and whether each step's B / C rows are loaded into registers
one step ahead. Also M = 1 against M = 3 for the same configuration (what one chain costs). The variants are compiled
first in parallel worker processes (Triton's on-disk cache), then timed one after the other here
(``triton.testing.do_bench``, median), with the relative difference to the chunked kernel's output.

    python benchmarks/bench_gpu_coupled_seq_variants.py [--out DIR] [--workers 12]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

BC_MODES = [(0, 0), (1, 0), (0, 1), (1, 1)]
# (shape (batch, M, dim, L, N), layout, [(block_d, num_warps, K)], [(prefetch_bc, bc_ahead)])
PLAN = [
    ((8, 3, 1024, 4096, 16), "lmajor", [(16, 1, 4), (16, 1, 8), (8, 1, 4), (8, 1, 8), (4, 1, 4), (16, 1, 2)],
     BC_MODES),
    ((8, 1, 1024, 4096, 16), "lmajor", [(16, 1, 4), (8, 1, 4)], [(0, 0), (1, 1)]),
    ((8, 3, 1024, 4096, 16), "tmajor", [(16, 1, 2), (16, 1, 4), (8, 1, 2), (8, 1, 4)], [(0, 0), (1, 0), (1, 1)]),
    ((32, 3, 512, 500, 16), "tmajor", [(16, 1, 2), (16, 1, 4), (8, 1, 2), (8, 1, 4), (4, 1, 2), (4, 1, 4)],
     [(0, 0), (1, 0), (0, 1), (1, 1)]),
]


def variants():
    for shape, layout, configs, modes in PLAN:
        for cfg in configs:
            for mode in modes:
                yield shape, layout, tuple(cfg) + tuple(bool(v) for v in mode)


def _inputs(shape, layout):
    from benchmarks.bench_gpu_coupled_scan import make_inputs
    import torch

    return make_inputs(*shape, torch.bfloat16, time_major=layout == "tmajor")


def _compile(task):
    """Worker: launch one variant once (fills Triton's cache). Returns an error string or None."""
    shape, layout, cfg = task
    try:
        import torch
        from benchmarks.bench_gpu_coupled_scan import run_impl

        t = _inputs(shape, layout)
        with torch.no_grad():
            run_impl(t, "sequential", cfg)
        torch.cuda.synchronize()
        return None
    except Exception as error:  # reported, timed as NaN
        return repr(error)[:300]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "benchmarks" / "results")
    parser.add_argument("--workers", type=int, default=12)
    args = parser.parse_args()
    tasks = list(variants())
    with mp.get_context("spawn").Pool(args.workers) as pool:
        errors = pool.map(_compile, tasks, chunksize=1)
    import torch
    from triton.testing import do_bench

    from benchmarks.bench_gpu_coupled_scan import run_impl

    results, cache = [], {}
    for (shape, layout, cfg), error in zip(tasks, errors):
        key = (shape, layout)
        if key not in cache:
            cache.clear()
            t = _inputs(shape, layout)
            with torch.no_grad():
                chunked_ms = do_bench(lambda: run_impl(t, "chunked"), warmup=10, rep=60, return_mode="median")
                cache[key] = (t, run_impl(t, "chunked").float())
            print(json.dumps(dict(shape=list(shape), layout=layout, kernel="chunked", ms=chunked_ms)), flush=True)
            results.append(dict(shape=list(shape), layout=layout, kernel="chunked", ms=chunked_ms))
        t, ref = cache[key]
        row = dict(shape=list(shape), layout=layout, config=list(cfg))
        if error is None:
            with torch.no_grad():
                row["ms"] = do_bench(lambda: run_impl(t, "sequential", cfg), warmup=10, rep=60,
                                     return_mode="median")
                y = run_impl(t, "sequential", cfg).float()
                row["rel_diff_vs_chunked"] = ((y - ref).norm() / ref.norm()).item()
        else:
            row["error"] = error
        results.append(row)
        print(json.dumps(row), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu_coupled_seq_variants.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
