"""Measured exp2 throughput on the GPU: the ceiling argument for the coupled scan (gpu_kernels_notes.md).

The coupled scan needs M x N exponentials per (channel, step) and moves 8 bytes per (chain, channel, step) in bf16
(u, delta, z in, y out), i.e. N = 16 exp2 per 8 bytes. If the exponentials can only run on the special-function
unit (``ex2.approx.f32``, what ``tl.exp2`` compiles to), the fraction of the HBM bandwidth any such kernel can reach
is bounded by (exp2 per second) / (2 x bytes per second). This script measures, with Triton kernels whose inner loop
is independent chains of one operation each:

- ``mufu``: ``tl.exp2`` (ex2.approx on the SFU);
- ``poly``: a software exp2 on the FMA / integer pipes (Cody-Waite split, degree-5 polynomial for 2^f on [0, 1),
  exponent added with an integer shift; max relative error ~2e-7 in float32);
- ``mixed``: half of the chains on each (both pipes busy at once);
- ``fma``: a plain fused multiply-add (the FMA pipe's rate, for scale);

and the copy bandwidth (torch ``copy_`` of 1 GiB, read + write). It prints results per second and the implied ceiling
``min(1, rate / (2 * bandwidth))`` for N = 16 bf16 (``2 * bandwidth``: exp2 needed per second at full bandwidth).

    python benchmarks/bench_gpu_exp2.py [--out DIR]
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
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

CHAINS = 8


@triton.jit
def _poly_exp2(x):
    """2**x for x <= 0 (and moderate x > 0) on the FMA / ALU pipes: 2**floor(x) * p(x - floor(x))."""
    x = tl.maximum(x, -126.0)
    xi = tl.floor(x)
    f = x - xi
    # minimax-style coefficients of 2**f on [0, 1) (degree 5)
    p = 1.8775767e-3
    p = p * f + 8.9893397e-3
    p = p * f + 5.5826318e-2
    p = p * f + 2.4015361e-1
    p = p * f + 6.9315308e-1
    p = p * f + 9.9999994e-1
    bits = p.to(tl.int32, bitcast=True) + (xi.to(tl.int32) << 23)
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _rate_kernel(x_ptr, out_ptr, n, ITERS: tl.constexpr, MODE: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(x_ptr + offs, mask=offs < n, other=0.0)
    a0, a1, a2, a3 = x, x + 0.01, x + 0.02, x + 0.03
    a4, a5, a6, a7 = x + 0.04, x + 0.05, x + 0.06, x + 0.07
    for _ in range(ITERS):
        if MODE == 0:  # SFU
            a0, a1, a2, a3 = tl.exp2(a0 - 1.0), tl.exp2(a1 - 1.0), tl.exp2(a2 - 1.0), tl.exp2(a3 - 1.0)
            a4, a5, a6, a7 = tl.exp2(a4 - 1.0), tl.exp2(a5 - 1.0), tl.exp2(a6 - 1.0), tl.exp2(a7 - 1.0)
        elif MODE == 1:  # polynomial
            a0, a1, a2, a3 = _poly_exp2(a0 - 1.0), _poly_exp2(a1 - 1.0), _poly_exp2(a2 - 1.0), _poly_exp2(a3 - 1.0)
            a4, a5, a6, a7 = _poly_exp2(a4 - 1.0), _poly_exp2(a5 - 1.0), _poly_exp2(a6 - 1.0), _poly_exp2(a7 - 1.0)
        elif MODE == 2:  # half and half
            a0, a1, a2, a3 = tl.exp2(a0 - 1.0), tl.exp2(a1 - 1.0), tl.exp2(a2 - 1.0), tl.exp2(a3 - 1.0)
            a4, a5, a6, a7 = _poly_exp2(a4 - 1.0), _poly_exp2(a5 - 1.0), _poly_exp2(a6 - 1.0), _poly_exp2(a7 - 1.0)
        else:  # FMA
            a0, a1, a2, a3 = a0 * 0.75 + 0.25, a1 * 0.75 + 0.25, a2 * 0.75 + 0.25, a3 * 0.75 + 0.25
            a4, a5, a6, a7 = a4 * 0.75 + 0.25, a5 * 0.75 + 0.25, a6 * 0.75 + 0.25, a7 * 0.75 + 0.25
    tl.store(out_ptr + offs, a0 + a1 + a2 + a3 + a4 + a5 + a6 + a7, mask=offs < n)


MODES = {"mufu": 0, "poly": 1, "mixed": 2, "fma": 3}


def poly_accuracy(device):
    x = torch.linspace(-30.0, 0.0, 1 << 20, device=device)
    out = torch.empty_like(x)

    @triton.jit
    def _k(x_ptr, o_ptr, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        tl.store(o_ptr + offs, _poly_exp2(tl.load(x_ptr + offs, mask=offs < n, other=0.0)), mask=offs < n)

    _k[(triton.cdiv(x.numel(), 1024),)](x, out, x.numel(), BLOCK=1024)
    exact = torch.exp2(x.double())
    return ((out.double() - exact).abs() / exact).max().item()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "benchmarks" / "results")
    parser.add_argument("--iters", type=int, default=256)
    args = parser.parse_args()
    from triton.testing import do_bench

    n = 132 * 2048 * 16
    x = -torch.rand(n, device="cuda")
    out = torch.empty_like(x)
    rows = {}
    for name, mode in MODES.items():
        def run(mode=mode):
            _rate_kernel[(triton.cdiv(n, 1024),)](x, out, n, ITERS=args.iters, MODE=mode, BLOCK=1024, num_warps=8)

        ms = do_bench(run, warmup=5, rep=100, return_mode="median")
        rows[name] = n * CHAINS * args.iters / (ms * 1e-3)
    big = torch.empty(1 << 28, device="cuda")  # 1 GiB
    dst = torch.empty_like(big)
    copy_ms = do_bench(lambda: dst.copy_(big), warmup=5, rep=100, return_mode="median")
    bandwidth = 2 * big.numel() * 4 / (copy_ms * 1e-3)
    result = dict(
        device=torch.cuda.get_device_name(), copy_TBps=bandwidth / 1e12,
        **{f"{k}_per_s": v for k, v in rows.items()},
        poly_max_rel_err=poly_accuracy("cuda"),
        exp2_needed_per_s_at_full_bw_N16_bf16=2 * bandwidth,
        ceiling_mufu_only=min(1.0, rows["mufu"] / (2 * bandwidth)),
        ceiling_mixed=min(1.0, rows["mixed"] / (2 * bandwidth)),
    )
    print(json.dumps(result), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu_exp2.json").write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
