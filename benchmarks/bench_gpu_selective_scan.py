"""GPU selective scan: this package's Triton kernels against mamba-ssm's CUDA ``selective_scan_fn``, in one run.

The issue's shape: batch 1, dim 5120, N 16, L 2048 and 8192, bf16 u / delta / z / B / C, float32 A, D, delta_bias,
z gate and delta_softplus. Both run on the same inputs in the same process; the script prints the median times
(``triton.testing.do_bench``) and the ratio ours / mamba-ssm (goal <= 1.0) for the forward and for forward +
backward, checks that the two agree, and also times ours on the time-major layout the mixers pass ((batch, L, dim)
memory; mamba-ssm then needs contiguous copies, which its wrapper makes, so that is timed for it too).

    python benchmarks/bench_gpu_selective_scan.py [--lengths 2048 8192] [--out DIR]
    python benchmarks/bench_gpu_selective_scan.py --sweep     # block-size sweep of the kernels (tuning)
    python benchmarks/bench_gpu_selective_scan.py --saves     # the forward's state-save modes, backward chunk

mamba-ssm must be importable (see ../shared/wheels/README.md for the H200 wheels). Results: a markdown table and
a CSV in --out (default benchmarks/results/).
"""

from __future__ import annotations

import argparse
import csv
import json
import platform
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import torch  # noqa: E402
import triton  # noqa: E402
from triton.testing import do_bench  # noqa: E402

from multimodal_mamba.kernels.selective_scan import fused  # noqa: E402

try:
    from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
except Exception as error:  # pragma: no cover - depends on the machine
    selective_scan_fn = None
    MAMBA_ERROR = repr(error)


def make_inputs(batch, dim, length, state, dtype=torch.bfloat16, time_major=False, seed=0, requires_grad=False):
    gen = torch.Generator(device="cuda").manual_seed(seed)

    def rand(*shape, scale=1.0):
        return torch.randn(*shape, device="cuda", generator=gen) * scale

    def act(scale=1.0):
        if time_major:
            return rand(batch, length, dim, scale=scale).to(dtype).transpose(1, 2)
        return rand(batch, dim, length, scale=scale).to(dtype)

    u, delta, z = act(), act(0.5), act()
    A = -torch.exp(rand(dim, state, scale=0.5))
    B, C = rand(batch, state, length).to(dtype), rand(batch, state, length).to(dtype)
    D, bias = rand(dim), rand(dim, scale=0.5) - 3.0
    tensors = dict(u=u, delta=delta, A=A, B=B, C=C, D=D, z=z, delta_bias=bias)
    if requires_grad:
        for t in tensors.values():
            t.requires_grad_(True)
    return tensors


def ours(t):
    return fused.selective_scan_triton(t["u"], t["delta"], t["A"], t["B"], t["C"], t["D"], t["z"], t["delta_bias"], True)


def theirs(t):
    return selective_scan_fn(t["u"], t["delta"], t["A"], t["B"], t["C"], t["D"], t["z"], t["delta_bias"], True)


def leaves(t):
    return [v for v in t.values() if v.requires_grad]


def time_fwd(fn, t):
    with torch.no_grad():
        return do_bench(lambda: fn(t), warmup=50, rep=300, return_mode="median")


def time_fwd_bwd(fn, t):
    grad = torch.randn_like(t["u"])

    def step():
        out = fn(t)
        torch.autograd.grad(out, leaves(t), grad)

    return do_bench(step, warmup=50, rep=300, return_mode="median")


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def compare(length, dim, batch, state):
    rows = []
    for layout in ("lmajor", "tmajor"):
        t = make_inputs(batch, dim, length, state, time_major=layout == "tmajor", requires_grad=True)
        row = dict(L=length, layout=layout)
        row["ours_fwd_ms"] = time_fwd(ours, t)
        row["ours_fwdbwd_ms"] = time_fwd_bwd(ours, t)
        if selective_scan_fn is not None:
            row["mamba_fwd_ms"] = time_fwd(theirs, t)
            row["mamba_fwdbwd_ms"] = time_fwd_bwd(theirs, t)
            row["fwd_ratio"] = row["ours_fwd_ms"] / row["mamba_fwd_ms"]
            row["fwdbwd_ratio"] = row["ours_fwdbwd_ms"] / row["mamba_fwdbwd_ms"]
            with torch.no_grad():
                row["rel_diff_out"] = rel(ours(t), theirs(t))
            grad = torch.randn_like(t["u"])
            g_ours = torch.autograd.grad(ours(t), leaves(t), grad)
            g_theirs = torch.autograd.grad(theirs(t), leaves(t), grad)
            row["rel_diff_grads_max"] = max(rel(a, b) for a, b in zip(g_ours, g_theirs))
        rows.append(row)
        print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}), flush=True)
    return rows


FWD_SWEEP = [
    (1, 256, 1, False), (1, 512, 1, False), (1, 512, 1, True), (1, 256, 1, True), (1, 1024, 2, False),
    (1, 1024, 2, True), (2, 256, 1, True), (1, 1024, 4, True),
]
# backward: (config, opts = (gb_acc, da_store, excl_rev, bc_padded), dB / dC mode: 1 atomics on the contiguous
# layout, 2 atomics striped, 3 skipped (timing only), partials (None: the default)); see fused._bwd_state
_V0, _V1, _V2 = (False, False, False, False), (True, True, False, True), (True, True, True, True)
BWD_SWEEP = [
    ((1, 256, 1, False), _V0, 2, None), ((1, 256, 1, False), _V0, 1, None),
    ((1, 256, 1, False), (True, False, False, False), 2, None), ((1, 256, 1, False), (True, True, False, False), 2, None),
    ((1, 256, 1, False), (False, False, False, True), 1, None),
    ((1, 256, 1, False), _V1, 2, None), ((1, 256, 1, False), _V1, 1, None), ((1, 256, 1, False), _V1, 3, None),
    ((1, 256, 1, False), _V2, 1, None), ((1, 256, 1, False), _V2, 2, None),
    ((1, 256, 1, False), _V1, 1, 16), ((1, 256, 1, False), _V1, 1, 64),
    ((1, 128, 1, False), _V1, 1, None), ((1, 128, 1, False), _V2, 1, None), ((1, 128, 1, False), _V1, 2, None),
    ((1, 128, 1, False), _V1, 1, 64), ((1, 64, 1, False), _V1, 1, None), ((1, 512, 2, False), _V1, 1, None),
    ((2, 128, 1, False), _V1, 1, None), ((2, 256, 2, False), _V1, 1, None), ((1, 256, 1, True), _V1, 1, None),
]

# the short list (--focus): the winners of the full list's run and their neighbours
BWD_SWEEP_FOCUS = [
    ((1, 128, 1, False), _V2, 1, None), ((1, 128, 1, False), _V2, 1, 64), ((1, 128, 1, False), _V2, 1, 16),
    ((1, 128, 1, False), _V2, 1, 256), ((1, 256, 1, False), _V2, 1, None), ((1, 256, 1, False), _V2, 1, 64),
    ((1, 128, 1, False), _V2, 3, None), ((1, 128, 1, False), _V0, 2, None), ((1, 256, 1, False), _V0, 2, 256),
    ((1, 512, 2, False), _V2, 1, None),
]


def sweep(length, dim, batch, state, focus=False):
    results = []
    t = make_inputs(batch, dim, length, state)
    args = [t[k] for k in ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")]
    for cfg in FWD_SWEEP:
        try:
            ms = do_bench(lambda: fused.selective_scan_fwd(*args, True, None, save_states=False, config=cfg),
                          warmup=25, rep=100, return_mode="median")
        except Exception as error:  # a config that does not compile / fit
            ms = float("nan")
            print("fwd", cfg, "failed:", repr(error)[:200], flush=True)
        results.append(dict(kind="fwd", L=length, config=str(cfg), ms=ms))
        print(json.dumps(results[-1]), flush=True)
    for every in (128, 256, 512):  # the forward in training: it also saves a state every backward chunk
        ms = do_bench(lambda: fused.selective_scan_fwd(*args, True, None, save_states=True, config=(1, 512, 1, False),
                                                       save_every=every), warmup=25, rep=100, return_mode="median")
        results.append(dict(kind="fwd_save", L=length, save_every=every, ms=ms))
        print(json.dumps(results[-1]), flush=True)
    dout = torch.randn_like(t["u"])
    for cfg, opts, mode, partials in (BWD_SWEEP_FOCUS if focus else BWD_SWEEP):
        block_d, block_t, warps, unroll = cfg
        try:
            _, _, states, meta = fused.selective_scan_fwd(*args, True, None, save_states=True,
                                                          config=(1, 512, 1, False), save_every=block_t)
            ms = do_bench(lambda: fused.selective_scan_bwd(*args, True, states, meta["block_t"], dout, config=cfg,
                                                           bc_mode=mode, opts=opts, partials=partials),
                          warmup=10, rep=60, return_mode="median")
            results.append(dict(kind="bwd", L=length, config=str(cfg), opts=str(opts), bc_mode=mode,
                                partials=partials, ms=ms))
            print(json.dumps(results[-1]), flush=True)
        except Exception as error:
            print("bwd", cfg, opts, mode, "failed:", repr(error)[:300], flush=True)
    return results


def saves_sweep(length, dim, batch, state):
    """The forward's state-save modes (fused.FWD_SAVE_MODE) and the backward's chunk, kernel-only and in the step."""
    results = []
    mode0, bwd0 = fused.FWD_SAVE_MODE, dict(fused.BWD_CONFIGS)
    t = make_inputs(batch, dim, length, state)
    args = [t[k] for k in ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")]
    ms = do_bench(lambda: fused.selective_scan_fwd(*args, True, None), warmup=25, rep=100, return_mode="median")
    results.append(dict(kind="fwd", L=length, ms=ms))
    print(json.dumps(results[-1]), flush=True)
    for mode in (0, 1):
        fused.FWD_SAVE_MODE = mode
        for every in (128, 256, 512):
            ms = do_bench(lambda: fused.selective_scan_fwd(*args, True, None, save_states=True, save_every=every),
                          warmup=25, rep=100, return_mode="median")
            results.append(dict(kind="fwd_save", L=length, save_mode=mode, save_every=every, ms=ms))
            print(json.dumps(results[-1]), flush=True)
    for layout in ("lmajor", "tmajor"):
        t = make_inputs(batch, dim, length, state, time_major=layout == "tmajor", requires_grad=True)
        if selective_scan_fn is not None:
            results.append(dict(kind="step", L=length, layout=layout, who="mamba-ssm", ms=time_fwd_bwd(theirs, t)))
            print(json.dumps(results[-1]), flush=True)
        for mode, bwd_t in ((0, 256), (1, 256), (0, 128), (1, 128)):
            fused.FWD_SAVE_MODE = mode
            fused.BWD_CONFIGS = {k: (1, bwd_t, 1, False) for k in bwd0}
            results.append(dict(kind="step", L=length, layout=layout, save_mode=mode, bwd_t=bwd_t,
                                ms=time_fwd_bwd(ours, t)))
            print(json.dumps(results[-1]), flush=True)
    fused.FWD_SAVE_MODE, fused.BWD_CONFIGS = mode0, bwd0
    return results


def profile_step(length, dim, batch, state, layout="lmajor"):
    """GPU time per kernel of ours' forward + backward autograd step (where the time outside the scan goes)."""
    t = make_inputs(batch, dim, length, state, time_major=layout == "tmajor", requires_grad=True)
    grad = torch.randn_like(t["u"])

    def step():
        torch.autograd.grad(ours(t), leaves(t), grad)

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            step()
        torch.cuda.synchronize()
    print(f"profile L {length} {layout} (5 steps)", flush=True)
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=14, max_name_column_width=60), flush=True)


def copy_bandwidth():
    """Device-to-device copy, bytes read + written per second (the HBM ceiling the goals are measured against)."""
    src = torch.empty(2 * 1024**3 // 2, dtype=torch.bfloat16, device="cuda").normal_()
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src), warmup=20, rep=100, return_mode="median")
    return 2 * src.numel() * 2 / (ms * 1e-3) / 1e12


def write_results(rows, out_dir: Path, args):
    out_dir.mkdir(parents=True, exist_ok=True)
    fields = ["L", "layout", "ours_fwd_ms", "mamba_fwd_ms", "fwd_ratio", "ours_fwdbwd_ms", "mamba_fwdbwd_ms",
              "fwdbwd_ratio", "rel_diff_out", "rel_diff_grads_max"]
    with open(out_dir / "gpu_selective_scan.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)  # noqa: E731
    lines = [
        "# Selective scan on the GPU: Triton (ours) vs mamba-ssm's CUDA kernel",
        "",
        f"Device: {torch.cuda.get_device_name()}; torch {torch.__version__}, triton {triton.__version__}; "
        f"batch {args.batch}, dim {args.dim}, N {args.state}, bf16 u/delta/z/B/C, fp32 A/D/delta_bias, z gate, "
        f"delta_softplus. Median of `triton.testing.do_bench`. Ratio = ours / mamba-ssm (goal <= 1.0). "
        f"lmajor = (batch, dim, L) contiguous (mamba-ssm's layout); tmajor = (batch, L, dim) memory, as the mixers "
        f"pass it (mamba-ssm's wrapper copies it to contiguous first, and that copy is in its time).",
        "",
        "Command: `python benchmarks/bench_gpu_selective_scan.py`",
        "",
        "| L | layout | ours fwd ms | mamba-ssm fwd ms | fwd ratio | ours fwd+bwd ms | mamba-ssm fwd+bwd ms | "
        "fwd+bwd ratio | rel. diff out | max rel. diff grads |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append("| " + " | ".join(fmt(r.get(k, "-")) for k in fields) + " |")
    (out_dir / "gpu_selective_scan.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[2048, 8192])
    parser.add_argument("--dim", type=int, default=5120)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--state", type=int, default=16)
    parser.add_argument("--sweep", action="store_true", help="time block-size configurations instead")
    parser.add_argument("--profile", action="store_true", help="with --sweep: per-kernel GPU time of one step")
    parser.add_argument("--saves", action="store_true",
                        help="the forward's state-save modes and the backward chunk (kernel-only and fwd + bwd)")
    parser.add_argument("--focus", action="store_true", help="with --sweep: the short backward list")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "benchmarks" / "results")
    args = parser.parse_args()
    print(f"{platform.node()} {torch.cuda.get_device_name()} torch {torch.__version__} triton {triton.__version__}",
          flush=True)
    if selective_scan_fn is None:
        print("mamba-ssm not importable:", MAMBA_ERROR, flush=True)
    if args.saves:
        results = []
        for length in args.lengths:
            results += saves_sweep(length, args.dim, args.batch, args.state)
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "gpu_selective_scan_saves.json").write_text(json.dumps(results, indent=1))
        return
    if args.sweep:
        if selective_scan_fn is not None:  # the bar, first (the sweep may be cut short)
            for length in args.lengths:
                t = make_inputs(args.batch, args.dim, length, args.state, requires_grad=True)
                print(json.dumps(dict(L=length, mamba_fwd_ms=time_fwd(theirs, t),
                                      mamba_fwdbwd_ms=time_fwd_bwd(theirs, t), ours_fwd_ms=time_fwd(ours, t),
                                      ours_fwdbwd_ms=time_fwd_bwd(ours, t))), flush=True)
        if args.profile:
            for length in args.lengths:
                profile_step(length, args.dim, args.batch, args.state)
        results = []
        for length in args.lengths:
            results += sweep(length, args.dim, args.batch, args.state, args.focus)
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "gpu_selective_scan_sweep.json").write_text(json.dumps(results, indent=1))
        return
    print(f"copy bandwidth {copy_bandwidth():.2f} TB/s (read + write)", flush=True)
    rows = []
    for length in args.lengths:
        rows += compare(length, args.dim, args.batch, args.state)
    write_results(rows, args.out, args)


if __name__ == "__main__":
    main()
