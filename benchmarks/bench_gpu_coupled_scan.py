"""GPU coupled selective scan (M = 3): achieved fraction of the measured HBM bandwidth, and the PyTorch path.

The issue's goal: the Triton coupled scan moves the bytes it must (u, delta, z read, y written, once; B, C read;
A, D, delta_bias are negligible) at >= 60% of the measured device-to-device copy bandwidth. The script measures
that ceiling in the same run, times the forward (``triton.testing.do_bench``, median) and prints

    fraction = (bytes it must move / time) / copy bandwidth

with the arithmetic floor beside it: the scan needs M * N exponentials per (channel, step), and the H200's special
function units (16 per SM per clock, 132 SMs, about 1.98 GHz: about 4.2e12 exp2/s) bound it from below too. At
N = 16 in bf16 that floor is about twice the HBM floor, so no kernel that computes every exponential can exceed
about 50% of HBM bandwidth there; float32 I/O and N = 8 are printed as well. Forward + backward and the chunked
PyTorch path ("torch" backend) are timed for comparison.

Two forward kernels: "sequential" (the default, ``kernels/coupled_scan/sequential.py``: a thread walks the sequence
for its channel's states) and "chunked" (the earlier kernel of ``fused.py``, timed beside it as fwd_chunked_ms).
fwd_tmajor_ms: the default kernel on time-major (batch, M, L, dim) memory, the layout a Coupled Mamba layer's
activations have (read in place, no copy).

    python benchmarks/bench_gpu_coupled_scan.py [--out DIR]
    python benchmarks/bench_gpu_coupled_scan.py --sweep [--sweep-shape B M DIM L N]
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import torch  # noqa: E402
import triton  # noqa: E402
from triton.testing import do_bench  # noqa: E402

from multimodal_mamba.kernels.coupled_scan import fused  # noqa: E402
from multimodal_mamba.modeling.ops_coupled_scan import coupled_selective_scan_chunked  # noqa: E402

SFU_EXP2_PER_S = 132 * 16 * 1.98e9  # nominal: 16 MUFU results / SM / clock on Hopper


def make_inputs(batch, chains, dim, length, state, dtype, requires_grad=False, seed=0, time_major=False):
    gen = torch.Generator(device="cuda").manual_seed(seed)

    def rand(*shape, scale=1.0):
        return torch.randn(*shape, device="cuda", generator=gen) * scale

    def act(scale=1.0):
        if time_major:
            return rand(batch, chains, length, dim, scale=scale).to(dtype).transpose(-1, -2)
        return rand(batch, chains, dim, length, scale=scale).to(dtype)

    t = dict(
        u=act(), delta=act(0.5), A=-torch.exp(rand(chains, dim, state, scale=0.5)),
        B=rand(batch, chains, state, length).to(dtype), C=rand(batch, chains, state, length).to(dtype),
        D=rand(chains, dim), z=act(), delta_bias=rand(chains, dim, scale=0.5) - 3.0,
    )
    if requires_grad:
        for v in t.values():
            v.requires_grad_(True)
    return t


ARGS = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")


def run_triton(t, coupling="mean"):
    return fused.coupled_selective_scan_triton(*(t[k] for k in ARGS), True, coupling)


def run_impl(t, impl, config=None, coupling="mean"):
    return fused.coupled_scan_fwd(*(t[k] for k in ARGS), True, coupling, None, False, config=config, impl=impl)[0]


def run_torch(t, coupling="mean"):
    return coupled_selective_scan_chunked(*(t[k] for k in ARGS), True, coupling)


def bytes_moved(t):
    total = 0
    for key in ("u", "delta", "z", "B", "C"):
        total += t[key].numel() * t[key].element_size()
    total += t["u"].numel() * t["u"].element_size()  # y written
    return total


def copy_bandwidth():
    src = torch.empty(1024**3, dtype=torch.bfloat16, device="cuda").normal_()
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src), warmup=20, rep=100, return_mode="median")
    return 2 * src.numel() * 2 / (ms * 1e-3)


def measure(batch, chains, dim, length, state, dtype, bandwidth, with_torch=True):
    t = make_inputs(batch, chains, dim, length, state, dtype)
    with torch.no_grad():
        fwd_ms = do_bench(lambda: run_triton(t), warmup=25, rep=200, return_mode="median")
        fwd_chunked_ms = do_bench(lambda: run_impl(t, "chunked"), warmup=10, rep=100, return_mode="median")
        y_seq, y_chunked = run_impl(t, "sequential").float(), run_impl(t, "chunked").float()
        seq_vs_chunked = ((y_seq - y_chunked).norm() / y_chunked.norm()).item()
        del y_seq, y_chunked
        tm = make_inputs(batch, chains, dim, length, state, dtype, time_major=True)
        fwd_tmajor_ms = do_bench(lambda: run_triton(tm), warmup=10, rep=100, return_mode="median")
        del tm
        moved = bytes_moved(t)
        hbm_floor_ms = moved / bandwidth * 1e3
        sfu_floor_ms = batch * chains * dim * length * state / SFU_EXP2_PER_S * 1e3
        row = dict(
            batch=batch, M=chains, dim=dim, L=length, N=state, dtype=str(dtype).replace("torch.", ""),
            fwd_ms=fwd_ms, GB=moved / 1e9, achieved_TBps=moved / (fwd_ms * 1e-3) / 1e12,
            hbm_fraction=hbm_floor_ms / fwd_ms, hbm_floor_ms=hbm_floor_ms, sfu_floor_ms=sfu_floor_ms,
            sfu_ceiling=hbm_floor_ms / sfu_floor_ms, fwd_chunked_ms=fwd_chunked_ms, fwd_tmajor_ms=fwd_tmajor_ms,
            rel_diff_seq_vs_chunked=seq_vs_chunked,
        )
        if with_torch:
            row["torch_fwd_ms"] = do_bench(lambda: run_torch(t), warmup=2, rep=20, return_mode="median")
            y_triton, y_torch = run_triton(t), run_torch(t)
            row["rel_diff_vs_torch"] = ((y_triton.float() - y_torch.float()).norm() / y_torch.float().norm()).item()
    tg = make_inputs(batch, chains, dim, length, state, dtype, requires_grad=True)
    grad = torch.randn_like(tg["u"])
    leaves = list(tg.values())

    def step():
        torch.autograd.grad(run_triton(tg), leaves, grad)

    row["fwdbwd_ms"] = do_bench(step, warmup=10, rep=100, return_mode="median")
    print(json.dumps({k: (float(f"{v:.4g}") if isinstance(v, float) else v) for k, v in row.items()}), flush=True)
    return row


FWD_SWEEP = [(1, 256, 1), (2, 256, 1), (1, 128, 1), (2, 128, 1), (4, 128, 1), (1, 256, 2), (2, 256, 2), (4, 256, 4),
             (1, 512, 2)]  # the chunked forward's (block_d, block_t, num_warps)
# the sequential forward's (block_d, num_warps, K): 32 / block_d lanes per channel when block_d < 32 per warp
SEQ_SWEEP = [(16, 1, 4), (16, 1, 1), (16, 1, 2), (16, 1, 8), (8, 1, 4), (8, 1, 1), (8, 1, 2), (32, 1, 1), (32, 1, 2),
             (32, 1, 4), (64, 2, 1), (64, 2, 2), (4, 1, 2), (4, 1, 4), (16, 1, 4, True, True), (8, 1, 4, True, True),
             (16, 1, 8, True, True), (4, 1, 4, True, True)]  # (..., prefetch_bc, bc_ahead); 3-tuples: the default
BWD_SWEEP = [(1, 128, 1), (1, 64, 1), (2, 64, 1), (2, 128, 1), (1, 256, 2), (1, 128, 2), (4, 64, 2), (4, 128, 4)]


def sweep_sequential(batch, chains, dim, length, state, dtype, layouts=("lmajor", "tmajor")):
    results = []
    for layout in layouts:
        t = make_inputs(batch, chains, dim, length, state, dtype, time_major=layout == "tmajor")
        with torch.no_grad():
            ref = run_impl(t, "chunked").float()
            for cfg in SEQ_SWEEP:
                try:
                    ms = do_bench(lambda: run_impl(t, "sequential", cfg), warmup=10, rep=60, return_mode="median")
                    y = run_impl(t, "sequential", cfg).float()
                    err = ((y - ref).norm() / ref.norm()).item()
                except Exception as error:
                    ms, err = float("nan"), float("nan")
                    print("seq", cfg, "failed", repr(error)[:200], flush=True)
                results.append(dict(kind="fwd_seq", layout=layout, config=str(cfg), ms=ms, rel_diff=err))
                print(json.dumps(results[-1]), flush=True)
    return results


def sweep(batch, chains, dim, length, state, dtype, chunked=True, layouts=("lmajor", "tmajor")):
    results = sweep_sequential(batch, chains, dim, length, state, dtype, layouts)
    for layout in ("lmajor", "tmajor") if chunked else ():
        t = make_inputs(batch, chains, dim, length, state, dtype, time_major=layout == "tmajor")
        args = [t[k] for k in ARGS]
        for cfg in FWD_SWEEP:
            try:
                ms = do_bench(lambda: fused.coupled_scan_fwd(*args, True, "mean", None, False, config=cfg,
                                                             impl="chunked"),
                              warmup=20, rep=100, return_mode="median")
            except Exception as error:
                ms = float("nan")
                print("fwd", cfg, "failed", repr(error)[:200], flush=True)
            results.append(dict(kind="fwd", layout=layout, config=str(cfg), ms=ms))
            print(json.dumps(results[-1]), flush=True)
        dout = torch.randn_like(t["u"])
        for cfg in BWD_SWEEP:
            try:
                _, _, states, meta = fused.coupled_scan_fwd(*args, True, "mean", None, True,
                                                           config=(cfg[0], cfg[1], 1), impl="chunked")
                ms = do_bench(lambda: fused.coupled_scan_bwd(*args, True, "mean", states, meta["block_t"], dout,
                                                             config=cfg),
                              warmup=10, rep=60, return_mode="median")
            except Exception as error:
                ms = float("nan")
                print("bwd", cfg, "failed", repr(error)[:200], flush=True)
            results.append(dict(kind="bwd", layout=layout, config=str(cfg), ms=ms))
            print(json.dumps(results[-1]), flush=True)
    return results


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sweep", action="store_true")
    parser.add_argument("--sweep-shape", type=int, nargs=5, default=[8, 3, 1024, 4096, 16],
                        metavar=("BATCH", "M", "DIM", "L", "N"), help="shape of --sweep (default: the benchmark's)")
    parser.add_argument("--sweep-sequential-only", action="store_true", help="--sweep: only the sequential forward")
    parser.add_argument("--sweep-layouts", nargs="+", default=["lmajor", "tmajor"], choices=["lmajor", "tmajor"])
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "benchmarks" / "results")
    args = parser.parse_args()
    print(f"{torch.cuda.get_device_name()} torch {torch.__version__} triton {triton.__version__}", flush=True)
    if args.sweep:
        shape = tuple(args.sweep_shape)
        t = make_inputs(*shape, torch.bfloat16)
        with torch.no_grad():
            print(json.dumps(dict(shape=shape, default_fwd_ms=do_bench(lambda: run_triton(t), return_mode="median"))),
                  flush=True)
        results = sweep(*shape, torch.bfloat16, chunked=not args.sweep_sequential_only,
                        layouts=tuple(args.sweep_layouts))
        args.out.mkdir(parents=True, exist_ok=True)
        name = "gpu_coupled_scan_sweep" + "".join(f"_{v}" for v in shape) + ".json"
        (args.out / name).write_text(json.dumps(results, indent=1))
        return
    bandwidth = copy_bandwidth()
    print(f"copy bandwidth {bandwidth / 1e12:.2f} TB/s (read + write)", flush=True)
    rows = [
        measure(8, 3, 1024, 4096, 16, torch.bfloat16, bandwidth, with_torch=False),  # (torch path: 1216 ms, notes)
        measure(8, 3, 1024, 4096, 16, torch.float32, bandwidth, with_torch=False),
        measure(8, 3, 1024, 4096, 8, torch.bfloat16, bandwidth, with_torch=False),
        measure(16, 3, 256, 500, 16, torch.bfloat16, bandwidth),  # Coupled Mamba's own scale (L = 500)
        measure(32, 3, 512, 500, 16, torch.bfloat16, bandwidth, with_torch=False),  # the fusion benchmark's scan
    ]
    args.out.mkdir(parents=True, exist_ok=True)
    fields = ["batch", "M", "dim", "L", "N", "dtype", "fwd_ms", "GB", "achieved_TBps", "hbm_fraction", "hbm_floor_ms",
              "sfu_floor_ms", "sfu_ceiling", "fwd_chunked_ms", "fwd_tmajor_ms", "fwdbwd_ms", "torch_fwd_ms",
              "rel_diff_vs_torch", "rel_diff_seq_vs_chunked"]
    with open(args.out / "gpu_coupled_scan.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)  # noqa: E731
    lines = [
        "# Coupled selective scan on the GPU (M = 3, coupling='mean'): fraction of HBM bandwidth",
        "",
        f"Device: {torch.cuda.get_device_name()}; torch {torch.__version__}, triton {triton.__version__}. Measured "
        f"copy bandwidth (read + write): {bandwidth / 1e12:.2f} TB/s. hbm_fraction = (bytes it must move / forward "
        f"time) / copy bandwidth (goal >= 0.6). sfu_floor_ms: M*N exp2 per (channel, step) at the nominal "
        f"{SFU_EXP2_PER_S / 1e12:.1f}e12 exp2/s; sfu_ceiling = hbm_floor_ms / sfu_floor_ms, the largest hbm_fraction "
        f"any kernel that computes every decay can reach. fwd_ms: the default (sequential) forward on (batch, M, dim, "
        f"L) inputs; fwd_chunked_ms: the earlier chunked forward; fwd_tmajor_ms: the default forward on time-major "
        f"memory. fwdbwd_ms: forward + the chunked backward. torch = the chunked PyTorch path on the same GPU.",
        "",
        "Command: `python benchmarks/bench_gpu_coupled_scan.py`",
        "",
        "| " + " | ".join(fields) + " |",
        "|" + "---|" * len(fields),
    ]
    for r in rows:
        lines.append("| " + " | ".join(fmt(r.get(k, "-")) for k in fields) + " |")
    (args.out / "gpu_coupled_scan.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
