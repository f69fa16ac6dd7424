"""How close can the sequential coupled-scan forward get to the HBM goal? The kernel against stripped copies of itself.

Issue 6 asks the coupled scan (M = 3) for >= 60 % of the measured HBM bandwidth for the bytes it must move (u, delta,
z read and y written once; B and C). The kernel is limited by instructions, not bytes (gpu_kernels_notes.md). This
script measures what is left when parts of the work are removed, to tell which parts stand between the kernel and
the goal and whether a kernel of this design could reach it at all. Each variant is the source of this tree's
``multimodal_mamba/kernels/coupled_scan/sequential.py`` with named functions redefined at the end of the module
(Triton resolves a kernel's helpers by name when it compiles), loaded as a sibling module:

- ``full``: the kernel as it is;
- ``no_readout``: the readout <C, h> and its reduce-scatter over a channel's lanes removed (y = D u, gated);
- ``no_bc``: B = C = 1, no B / C loads or L1 prefetches;
- ``decays_only``: both: per (channel, step) only the M N decays exp2(dt A), the coupled recurrence
  H = sum_m (a^m H + dt^m u^m), softplus, the gate and the loads and stores of u, delta, z and y;
- ``io_only``: ``decays_only`` without the decays (H = sum_m (H + dt^m u^m)): what the loads, stores and the
  per-(channel, step) work of the walk through time cost by themselves;
- ``stream_elementwise`` (not a kernel variant): the same bytes moved by ``torch.addcmul`` per chain (u, delta, z
  read, y written, coalesced): the cost of the bytes alone.
Outputs of the stripped variants are not the scan's; only their times mean something. ``--baseline PATH`` adds another
version of sequential.py (e.g. main's) as the variant ``baseline``, checked against ``full`` (relative difference).

Per row: ms (``triton.testing.do_bench`` median, best of ``--rounds`` interleaved rounds), hbm_fraction (the full
scan's bytes over the time, against the copy bandwidth measured in the same run) and sfu_busy: the MUFU work of the
full scan (M N decays + softplus (2) and gate (2) per chain and (channel, step)) at the SFUs' measured rate
(``gpu_exp2.json``: 4.07e12 exp2 / s on the H200) over the time: the fraction of the run the special-function units
would be busy. A kernel at 60 % of HBM at float32 N 16 needs sfu_busy >= 0.78.

    python benchmarks/bench_gpu_coupled_scan_floor.py [--baseline PATH] [--cases ...] [--out DIR]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import multiprocessing as mp
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

SEQUENTIAL = REPO_ROOT / "multimodal_mamba" / "kernels" / "coupled_scan" / "sequential.py"
SFU_EXP2_PER_S = 4.07e12  # measured, results/gpu_exp2.json

_NO_READOUT = '''

@triton.jit
def _xscatter(acc, offs_acc, jj, K: tl.constexpr, JS: tl.constexpr, FAST: tl.constexpr):
    return tl.zeros([acc.shape[0], acc.shape[2]], dtype=tl.float32)
'''
_NO_BC = '''

@triton.jit
def _load_bc(row_ptrs, m: tl.constexpr, mask_n, EVEN_N: tl.constexpr, M: tl.constexpr, N: tl.constexpr):
    one = tl.full(row_ptrs.shape, 1.0, tl.float32)
    return one, one


@triton.jit
def _prefetch_bc_steps(BC, t_first, length, offs_pf_line, ROW: tl.constexpr, OFF64: tl.constexpr):
    pass
'''
_NO_DECAYS = '''

@triton.jit
def _xstep(H, A2, dt_k, dtu_k, lc, Bv, Cv, FAST: tl.constexpr):
    h = H + dtu_k[None, :, :]
    return h, tl.sum(h, axis=0)
'''
STRIPPED = {"no_readout": _NO_READOUT, "no_bc": _NO_BC, "decays_only": _NO_READOUT + _NO_BC,
            "io_only": _NO_READOUT + _NO_BC + _NO_DECAYS}

# (batch, M, dim, L, N, activation dtype[, "tmajor": time-major memory]); configs None = the kernel's default_config
CASES = {
    "big_fp32_n16": ((8, 3, 1024, 4096, 16, "fp32"), [None]),
    "big_bf16_n16": ((8, 3, 1024, 4096, 16, "bf16"), [None]),
    "big_fp32_n8": ((8, 3, 1024, 4096, 8, "fp32"), [None]),
    "big_fp32_n16_tmajor": ((8, 3, 1024, 4096, 16, "fp32", "tmajor"), [None]),
}


def load_variant(variant, baseline_path=None):
    """The sequential module of a variant (see the module docstring), cached in sys.modules."""
    from multimodal_mamba.kernels.coupled_scan import sequential

    if variant == "full":
        return sequential
    name = f"multimodal_mamba.kernels.coupled_scan._floor_{variant}"
    if name not in sys.modules:
        path = Path(baseline_path) if variant == "baseline" else SEQUENTIAL
        source = path.read_text() + STRIPPED.get(variant, "")
        module = importlib.util.module_from_spec(importlib.util.spec_from_loader(name, loader=None, origin=str(path)))
        sys.modules[name] = module
        filename = f"<{name}>"
        _remember_source(filename, source)  # (Triton's jit reads each function's source through inspect)
        exec(compile(source, filename, "exec"), module.__dict__)
    return sys.modules[name]


def _remember_source(filename, source):
    """Let ``inspect.getsource`` (which Triton's jit uses) find the source of an exec'd module."""
    import linecache

    linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)


def inputs(shape):
    import torch

    from benchmarks.bench_gpu_coupled_scan import make_inputs

    batch, chains, dim, length, state, dtype = shape[:6]
    t = make_inputs(batch, chains, dim, length, state, {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype],
                    time_major=shape[6:] == ("tmajor",))
    split = lambda x: [x[:, m] for m in range(chains)]  # noqa: E731
    return dict(us=split(t["u"]), deltas=split(t["delta"]), zs=split(t["z"]), Bs=split(t["B"]), Cs=split(t["C"]),
                A=t["A"], D=t["D"], delta_bias=t["delta_bias"])


def scan_call(module, lists, config):
    """The variant's forward on ``lists`` with B / C packed once (the kernel alone)."""
    Bs, Cs = module.prepare_bc(lists["Bs"], lists["Cs"])

    def call():
        return module.coupled_scan_fwd_seq(lists["us"], lists["deltas"], lists["zs"], lists["A"], Bs, Cs, lists["D"],
                                           lists["delta_bias"], True, "mean", None, config=config)[0]
    return call


def _compile(task):
    case, variant, config, baseline_path = task
    try:
        import torch

        module = load_variant(variant, baseline_path)
        with torch.no_grad():
            scan_call(module, inputs(CASES[case][0]), config)()
        torch.cuda.synchronize()
        return None
    except Exception as error:  # reported, not timed
        return repr(error)[:400]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline", type=Path, default=None, help="another version's sequential.py")
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "benchmarks" / "results")
    parser.add_argument("--variants", nargs="+", default=None, choices=["full", *STRIPPED, "baseline"],
                        help="default: full, the stripped ones, and baseline when --baseline is given")
    parser.add_argument("--workers", type=int, default=12)
    parser.add_argument("--rep", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    variants = args.variants or ["full", *STRIPPED] + (["baseline"] if args.baseline else [])
    tasks = [(case, variant, config, str(args.baseline) if args.baseline else None)
             for case in args.cases for config in CASES[case][1] for variant in variants]
    with mp.get_context("spawn").Pool(args.workers) as pool:
        errors = dict(zip([t[:3] for t in tasks], pool.map(_compile, tasks, chunksize=1)))
    import torch
    from triton.testing import do_bench

    from benchmarks.bench_gpu_coupled_scan import copy_bandwidth

    bandwidth = copy_bandwidth()
    print(json.dumps(dict(copy_bandwidth_tb_s=round(bandwidth / 1e12, 3))), flush=True)
    results = []
    for case in args.cases:
        shape, configs = CASES[case]
        batch, chains, dim, length, state = shape[:5]
        torch.cuda.empty_cache()
        lists = inputs(shape)
        nbytes = sum(t.numel() * t.element_size() for key in ("us", "deltas", "zs", "Bs", "Cs") for t in lists[key])
        nbytes += sum(t.numel() * t.element_size() for t in lists["us"])  # y
        mufu = batch * dim * length * chains * (state + 4)
        rows = []
        for config in configs:
            for variant in variants:
                error = errors[(case, variant, config)]
                if error:
                    print(json.dumps(dict(case=case, variant=variant, config=config, error=error)), flush=True)
                    continue
                rows.append(dict(variant=variant, config=config, ms=[],
                                 fn=scan_call(load_variant(variant, args.baseline), lists, config)))
        # the same bytes streamed by an elementwise op (u, delta, z read, y written; coalesced): what moving them costs
        # when nothing else does
        stream_out = [torch.empty_like(u) for u in lists["us"]]

        def stream(chains=tuple(zip(lists["us"], lists["deltas"], lists["zs"], stream_out))):
            for u, dl, z, y in chains:
                torch.addcmul(dl, u, z, out=y)
        rows.append(dict(variant="stream_elementwise", config=None, ms=[], fn=stream))
        for _ in range(args.rounds):
            for row in rows:
                with torch.no_grad():
                    row["ms"].append(do_bench(row["fn"], warmup=10, rep=args.rep, return_mode="median"))
        with torch.no_grad():
            full = {row["config"]: row["fn"]().float() for row in rows if row["variant"] == "full"}
        for row in rows:
            ms = min(row["ms"])
            out = dict(case=case, shape=shape, variant=row["variant"], config=row["config"] or "default",
                       ms=round(ms, 4), ms_rounds=[round(v, 4) for v in row["ms"]],
                       hbm_fraction=round(nbytes / (ms * 1e-3) / bandwidth, 4),
                       sfu_busy=round(mufu / SFU_EXP2_PER_S / (ms * 1e-3), 4))
            ref = full.get(row["config"])
            if row["variant"] == "baseline" and ref is not None:
                with torch.no_grad():
                    y = row["fn"]().float()
                out["rel_diff_vs_full"] = float((y - ref).norm() / ref.norm())
            results.append(out)
            print(json.dumps(out), flush=True)
        del lists, full
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu_coupled_scan_floor.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
