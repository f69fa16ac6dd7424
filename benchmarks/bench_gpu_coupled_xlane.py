"""Sequential coupled-scan forward, fourth round: the XLANE scheme against the previous defaults, side by side.

Every variant is a config of ``kernels/coupled_scan/sequential.py`` (block_d, num_warps, K, prefetch_bc, bc_ahead,
xlane, maxnreg); xlane 0 with the old default configs is the previous kernel (same code path as before this round).
Compiled first in parallel worker processes (Triton's on-disk cache), then timed one after the other in this process
(``triton.testing.do_bench`` on the kernel call alone, B / C packed once; median per round, best of interleaved
rounds), with each output's relative difference to the chunked kernel's and, per
shape, the HBM fraction (bytes of u, delta, z, B, C read and y written over the copy bandwidth).

    python benchmarks/bench_gpu_coupled_xlane.py [--out DIR] [--workers 12] [--plan fusion,big]
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

FUSION = (32, 3, 512, 500, 16)
BIG = (8, 3, 1024, 4096, 16)
XL = [(8, 1, 4, 1, 1, 1, 128), (4, 1, 8, 1, 1, 1, 128), None]
# (name, shape, layout, dtype, [configs]); the first config of each is the previous default, None the new default
PLAN = {
    "fusion": [("fusion", FUSION, "tmajor", "bf16", [(8, 1, 4, 1, 1, 0, 0)] + XL + [(8, 1, 4, 1, 1, 1, 0)])],
    "big": [("big_lmajor_fp32", BIG, "lmajor", "fp32", [(16, 1, 4, 1, 1, 0, 0)] + XL),
            ("big_lmajor_bf16", BIG, "lmajor", "bf16", [(16, 1, 4, 1, 1, 0, 0)] + XL),
            ("big_tmajor_bf16", BIG, "tmajor", "bf16", [(8, 1, 4, 1, 1, 0, 0)] + XL)],
}


def _inputs(shape, layout, dtype):
    import torch

    from benchmarks.bench_gpu_coupled_scan import make_inputs

    return make_inputs(*shape, {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype],
                       time_major=layout == "tmajor")


def _compile(task):
    _, shape, layout, dtype, cfg = task
    try:
        import torch

        from benchmarks.bench_gpu_coupled_scan import run_impl

        t = _inputs(shape, layout, dtype)
        with torch.no_grad():
            run_impl(t, "sequential", cfg)
        torch.cuda.synchronize()
        return None
    except Exception as error:  # reported, not timed
        return repr(error)[:400]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "benchmarks" / "results")
    parser.add_argument("--workers", type=int, default=12)
    parser.add_argument("--plan", default="fusion,big")
    parser.add_argument("--rep", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=2, help="interleaved timing rounds (kernel call only)")
    args = parser.parse_args()
    tasks = [(name, shape, layout, dtype, cfg) for key in args.plan.split(",") for name, shape, layout, dtype, cfgs
             in PLAN[key] for cfg in cfgs]
    with mp.get_context("spawn").Pool(args.workers) as pool:
        errors = pool.map(_compile, tasks, chunksize=1)
    import torch
    from triton.testing import do_bench

    from benchmarks.bench_gpu_coupled_scan import bytes_moved, copy_bandwidth, run_impl

    bandwidth = copy_bandwidth()
    print(json.dumps(dict(copy_bandwidth_tb_s=bandwidth / 1e12)), flush=True)
    from multimodal_mamba.kernels.coupled_scan import sequential

    results = []
    by_case = {}
    for task, error in zip(tasks, errors):
        by_case.setdefault(task[0], []).append((task, error))
    for name, rows in by_case.items():
        _, shape, layout, dtype, _ = rows[0][0]
        torch.cuda.empty_cache()
        t = _inputs(shape, layout, dtype)
        chains = shape[1]
        with torch.no_grad():
            ref = run_impl(t, "chunked").float()
            lists = [[t[key][:, m] for m in range(chains)] for key in ("u", "delta", "z", "B", "C")]
            Bs, Cs = sequential.prepare_bc(lists[3], lists[4])

            def call(cfg):
                return sequential.coupled_scan_fwd_seq(lists[0], lists[1], lists[2], t["A"], Bs, Cs, t["D"],
                                                       t["delta_bias"], True, "mean", None, config=cfg)[0]
        nbytes = bytes_moved(t)
        times = {i: [] for i in range(len(rows))}
        for _ in range(args.rounds):
            for i, ((_, _, _, _, cfg), error) in enumerate(rows):
                if error is None:
                    with torch.no_grad():
                        times[i].append(do_bench(lambda: call(cfg), warmup=10, rep=args.rep, return_mode="median"))
        for i, ((_, _, _, _, cfg), error) in enumerate(rows):
            row = dict(case=name, shape=list(shape), layout=layout, dtype=dtype,
                       config=list(cfg) if cfg else "default " + str(sequential.default_config(
                           shape[0], shape[2], shape[3], shape[4], layout == "lmajor", None, chains)))
            if error is None:
                with torch.no_grad():
                    y = call(cfg).float()
                ms = min(times[i])
                row.update(ms=round(ms, 4), ms_rounds=[round(v, 4) for v in times[i]],
                           hbm_fraction=round(nbytes / (ms * 1e-3) / bandwidth, 4),
                           rel_diff_vs_chunked=float((y - ref).norm() / ref.norm()))
            else:
                row["error"] = error
            results.append(row)
            print(json.dumps(row), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu_coupled_xlane.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
