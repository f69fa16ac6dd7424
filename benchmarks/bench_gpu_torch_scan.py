"""The PyTorch-only selective scan on the GPU (the blocked scan, backend "torch" on CUDA) against the fused kernels.

Shape of one mamba-2.8b layer: batch 1, dim 5120, N 16, bf16 u / delta / z / B / C in the time-major layout the mixer
passes ((batch, L, dim) memory), float32 A / D / delta_bias, z gate, softplus. For each length: forward time (no grad)
of mamba-ssm, the Triton kernel, the CPU-tuned chunked scan (``selective_scan_chunked``, L 512 only: it is slow on a
GPU) and the blocked scan for a grid of (block, segment elements, contraction by matmul or multiply-sum); then forward
+ backward and peak memory of the best configuration against mamba-ssm, and the relative differences. Writes the best
configuration to ``--out/torch_scan_best.json`` (``bench_gpu_prefill.py --torch-config`` reads it) and a table to
``--out/gpu_torch_scan.md``.

    python benchmarks/bench_gpu_torch_scan.py [--lengths 512 2048] [--out DIR]
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import torch  # noqa: E402
from triton.testing import do_bench  # noqa: E402

from multimodal_mamba.modeling import ops_mamba_ssm  # noqa: E402,F401
from multimodal_mamba.modeling import ops_selective_scan_blocked as blocked  # noqa: E402
from multimodal_mamba.modeling.ops_selective_scan import selective_scan_chunked  # noqa: E402

try:
    from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
except Exception:  # pragma: no cover
    selective_scan_fn = None
try:
    from multimodal_mamba.kernels.selective_scan.fused import selective_scan_triton
except Exception:  # pragma: no cover
    selective_scan_triton = None


def make_inputs(batch, dim, length, state, seed=0, requires_grad=False):
    gen = torch.Generator(device="cuda").manual_seed(seed)

    def rand(*shape, scale=1.0):
        return torch.randn(*shape, device="cuda", generator=gen) * scale

    def act(scale=1.0):
        return rand(batch, length, dim, scale=scale).to(torch.bfloat16).transpose(1, 2)

    def bc():
        return rand(batch, length, state).to(torch.bfloat16).transpose(1, 2)

    t = dict(u=act(), delta=act(0.5), A=-torch.exp(rand(dim, state, scale=0.5)), B=bc(), C=bc(), D=rand(dim),
             z=act(), delta_bias=rand(dim, scale=0.5) - 3.0)
    if requires_grad:
        for v in t.values():
            v.requires_grad_(True)
    return t


def call(fn, t, **kw):
    return fn(t["u"], t["delta"], t["A"], t["B"], t["C"], t["D"], z=t["z"], delta_bias=t["delta_bias"],
              delta_softplus=True, **kw)


def mamba(t):
    return selective_scan_fn(t["u"], t["delta"], t["A"], t["B"], t["C"], t["D"], t["z"], t["delta_bias"], True)


def ms(fn, rep=200):
    return do_bench(fn, warmup=10, rep=rep, return_mode="median")


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def set_config(block, segment, contract):
    blocked.BLOCK, blocked.SEGMENT_ELEMENTS, blocked.CONTRACT_BY_MATMUL = block, segment, contract


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[512, 2048])
    parser.add_argument("--dim", type=int, default=5120)
    parser.add_argument("--state", type=int, default=16)
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "benchmarks" / "results")
    args = parser.parse_args()
    default = (blocked.BLOCK, blocked.SEGMENT_ELEMENTS, blocked.CONTRACT_BY_MATMUL)
    grid = list(itertools.product([8, 16, 32], [1 << 25, 1 << 26, 1 << 27], [True, False]))
    rows, totals = [], {}
    for length in args.lengths:
        t = make_inputs(1, args.dim, length, args.state)
        row = dict(L=length)
        with torch.no_grad():
            if selective_scan_fn is not None:
                row["mamba_ssm_fwd_ms"] = ms(lambda: mamba(t))
                ref = mamba(t)
            if selective_scan_triton is not None:
                row["triton_fwd_ms"] = ms(lambda: call(selective_scan_triton, t))
            if length <= 512:
                row["chunked_fwd_ms"] = ms(lambda: call(selective_scan_chunked, t), rep=50)
            for config in grid:
                set_config(*config)
                elapsed = ms(lambda: call(blocked.selective_scan_blocked, t), rep=100)
                totals[config] = totals.get(config, 0.0) + elapsed / length
                print(json.dumps(dict(L=length, block=config[0], segment=config[1], matmul=config[2],
                                      ms=round(elapsed, 4))), flush=True)
            set_config(*default)
            row["blocked_default_fwd_ms"] = ms(lambda: call(blocked.selective_scan_blocked, t))
            if selective_scan_fn is not None:
                row["rel_diff_vs_mamba_ssm"] = rel(call(blocked.selective_scan_blocked, t), ref)
        rows.append(row)
        print(json.dumps(row), flush=True)
    best = min(totals, key=totals.get)
    print("best (block, segment, matmul):", best, flush=True)
    (args.out).mkdir(parents=True, exist_ok=True)
    (args.out / "torch_scan_best.json").write_text(json.dumps(dict(block=best[0], segment=best[1], matmul=best[2])))
    set_config(*best)
    for row in rows:
        length = row["L"]
        t = make_inputs(1, args.dim, length, args.state)
        with torch.no_grad():
            row["blocked_best_fwd_ms"] = ms(lambda: call(blocked.selective_scan_blocked, t))
        if "mamba_ssm_fwd_ms" in row:
            row["best_over_mamba_ssm_fwd"] = row["blocked_best_fwd_ms"] / row["mamba_ssm_fwd_ms"]
        tg = make_inputs(1, args.dim, length, args.state, requires_grad=True)
        leaves = list(tg.values())
        grad = torch.randn_like(tg["u"])

        def step(fn):
            torch.autograd.grad(fn(), leaves, grad)

        row["blocked_fwdbwd_ms"] = ms(lambda: step(lambda: call(blocked.selective_scan_blocked, tg)), rep=100)
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step(lambda: call(blocked.selective_scan_blocked, tg))
        torch.cuda.synchronize()
        row["blocked_fwdbwd_peak_MiB"] = (torch.cuda.max_memory_allocated() - base) / 2**20
        row["L_dim_N_fp32_MiB"] = length * args.dim * args.state * 4 / 2**20
        if selective_scan_fn is not None:
            row["mamba_ssm_fwdbwd_ms"] = ms(lambda: step(lambda: mamba(tg)))
            row["best_over_mamba_ssm_fwdbwd"] = row["blocked_fwdbwd_ms"] / row["mamba_ssm_fwdbwd_ms"]
            g_ours = torch.autograd.grad(call(blocked.selective_scan_blocked, tg), leaves, grad)
            g_theirs = torch.autograd.grad(mamba(tg), leaves, grad)
            row["max_rel_diff_grads_vs_mamba_ssm"] = max(rel(a, b) for a, b in zip(g_ours, g_theirs))
        print(json.dumps(row), flush=True)
    fields = []
    for r in rows:
        fields += [k for k in r if k not in fields]
    fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)  # noqa: E731
    lines = [
        "# The PyTorch-only selective scan on the GPU (blocked scan) vs the fused kernels",
        "",
        f"Device: {torch.cuda.get_device_name()}; torch {torch.__version__}; batch 1, dim {args.dim}, N {args.state}, "
        "bf16 time-major u / delta / z / B / C, z gate, softplus. Median ms (`triton.testing.do_bench`). "
        "`chunked`: the CPU-tuned chunked scan on the GPU. `blocked_best`: the blocked scan with the best "
        f"(block, segment elements, matmul contraction) of the sweep = {best}; `blocked_default`: the defaults "
        f"{default}. Peak memory: forward + backward above the inputs.",
        "",
        "Command: `python benchmarks/bench_gpu_torch_scan.py`",
        "",
        "| " + " | ".join(fields) + " |",
        "|" + "---|" * len(fields),
    ]
    for r in rows:
        lines.append("| " + " | ".join(fmt(r.get(k, "-")) for k in fields) + " |")
    (args.out / "gpu_torch_scan.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
