"""Offline look at the selective-scan kernels' machine code for an H100/H200 (sm_90): no GPU needed.

Compiles ``multimodal_mamba.kernels.selective_scan.fused``'s forward and backward kernels with the local Triton for
target ``cuda:90`` (Triton ships ptxas and cuobjdump), specialized as a launch on the issue's benchmark tensors would
be (batch 1, dim 5120, N 16, L 2048, bf16 u / delta / z / B / C, float32 A / D / delta_bias, (batch, dim, L) memory),
and prints registers, spill bytes and the opcode mix of the innermost loop (the loop over the N states; one pass =
one state of one chunk): total, MUFU, shuffles, shared-memory traffic, barriers, global loads / stores / atomics.

    python benchmarks/bench_gpu_scan_sass.py [--kernel fwd bwd] [--fwd-configs 1,512,1] [--bwd-configs 1,128,1]
        [--save-every 128] [--dump DIR]

``--dump DIR`` writes each variant's TTGIR and SASS there (to read the layouts and conversions). Module constants
of ``fused`` that a kernel reads at trace time are taken as they are (set them before calling ``compile_*``).
"""

from __future__ import annotations

import argparse
import collections
import inspect
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from bench_gpu_coupled_sass import loops  # noqa: E402  (the SASS listing's loops)
from multimodal_mamba.kernels.selective_scan import fused  # noqa: E402

NVBIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")

# the benchmark's shape
BATCH, DIM, LENGTH, STATE = 1, 5120, 2048, 16
BF16 = {"u_ptr", "delta_ptr", "B_ptr", "C_ptr", "z_ptr", "out_ptr", "dout_ptr", "du_ptr", "ddelta_ptr", "dz_ptr"}


def _strides(*shape):
    out, acc = [], 1
    for size in reversed(shape):
        out.append(acc)
        acc *= size
    return tuple(reversed(out))


def _compile(fn, ints, consts, num_warps, maxnreg=None):
    """ints: {name: value} of the integer arguments (1 becomes a constexpr, multiples of 16 get the divisibility
    hint, as a launch specializes them unless the kernel says otherwise); every pointer is 16-byte aligned."""
    sig, const, divisible = {}, {}, []
    skip = set(getattr(fn, "do_not_specialize", ()) or ())
    skip_names = {fn.arg_names[i] if isinstance(i, int) else i for i in skip}
    defaults = {p.name: p.default for p in fn.params if p.is_constexpr and p.default is not inspect.Parameter.empty}
    consts = {**defaults, **consts}
    for i, p in enumerate(fn.arg_names):
        if p in consts:
            sig[p], const[p] = "constexpr", consts[p]
        elif p.endswith("_ptr"):
            sig[p] = "*bf16" if p in BF16 else "*fp32"
            divisible.append(i)
        else:
            value = ints[p]
            if value == 1 and p not in skip_names:
                sig[p], const[p] = "constexpr", 1
            else:
                sig[p] = "i32"
                if value % 16 == 0 and p not in skip_names:
                    divisible.append(i)
    src = ASTSource(fn=fn, signature=sig, constexprs=const, attrs={(i,): [["tt.divisibility", 16]] for i in divisible})
    options = {"num_warps": num_warps}
    if maxnreg is not None:
        options["maxnreg"] = maxnreg
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options)


def compile_fwd(block_d=1, block_t=512, num_warps=1, save_every=128, save_states=True, unroll=False, maxnreg=None,
                **extra):
    n_chunks = triton.cdiv(LENGTH, block_t)
    n_slots = n_chunks * (block_t // save_every) + 1 if save_states else 2
    act = _strides(BATCH, DIM, LENGTH)
    bc = _strides(BATCH, 1, STATE, LENGTH)
    ints = dict(dim=DIM, length=LENGTH, dim_per_group=DIM, n_chunks=n_chunks, n_slots=n_slots)
    for name in ("u", "delta", "z", "out"):
        ints.update(zip([f"stride_{name}_b", f"stride_{name}_d", f"stride_{name}_l"], act))
    ints.update(stride_A_d=STATE, stride_A_n=1)
    for name in ("B", "C"):
        ints.update(zip([f"stride_{name}_b", f"stride_{name}_g", f"stride_{name}_n", f"stride_{name}_l"], bc))
    consts = dict(N=STATE, BLOCK_D=block_d, BLOCK_T=block_t, HAS_D=True, HAS_Z=True, HAS_BIAS=True, SOFTPLUS=True,
                  HAS_H0=False, SAVE_STATES=save_states, SAME_GROUP=True, UNROLL_N=unroll, N_PAD=STATE,
                  SAVE_EVERY=save_every if save_states else block_t, SAVE_MODE=fused.FWD_SAVE_MODE)
    consts.update(extra)
    return _compile(fused._selective_scan_fwd_kernel, ints, consts, num_warps, maxnreg)


def compile_bwd(block_d=1, block_t=128, num_warps=1, unroll=False, opts=None, bc_mode=1, maxnreg=None, **extra):
    gb_acc, da_store, excl_rev, bc_padded = opts if opts is not None else fused.BWD_OPTS
    n_chunks = triton.cdiv(LENGTH, block_t)
    act = _strides(BATCH, DIM, LENGTH)
    bc = _strides(BATCH, 1, STATE, LENGTH)
    part = _strides(64, BATCH, 1, STATE, n_chunks * block_t)
    ints = dict(dim=DIM, length=LENGTH, dim_per_group=DIM, n_chunks=n_chunks, blocks_per_group=DIM // block_d,
                n_saved=n_chunks + 1, state_step=1, n_partials=64)
    for name in ("u", "delta", "z", "dout", "du", "ddelta", "dz"):
        ints.update(zip([f"stride_{name}_b", f"stride_{name}_d", f"stride_{name}_l"], act))
    ints.update(stride_A_d=STATE, stride_A_n=1)
    for name in ("B", "C"):
        ints.update(zip([f"stride_{name}_b", f"stride_{name}_g", f"stride_{name}_n", f"stride_{name}_l"], bc))
    ints.update(zip(["stride_dB_p", "stride_dB_b", "stride_dB_g", "stride_dB_n", "stride_dB_l"], part))
    consts = dict(N=STATE, BLOCK_D=block_d, BLOCK_T=block_t, HAS_D=True, HAS_Z=True, HAS_BIAS=True, SOFTPLUS=True,
                  HAS_DFINAL=False, SAME_GROUP=True, BC_MODE=bc_mode, UNROLL_N=unroll, N_PAD=STATE, GB_ACC=gb_acc,
                  DA_STORE=da_store, EXCL_REV=excl_rev, BC_PADDED=bc_padded)
    consts.update(extra)
    return _compile(fused._selective_scan_bwd_kernel, ints, consts, num_warps, maxnreg)


def mix(instructions):
    counts = collections.Counter()
    for text in instructions:
        op = re.sub(r"^@!?U?P\w+\s+", "", text).split()[0]
        counts[op if op.startswith(("MUFU", "STS", "LDS")) else op.split(".")[0]] += 1
    return counts


def report(name, compiled, dump=None):
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp) / "k.cubin"
        cubin.write_bytes(compiled.asm["cubin"])
        usage = subprocess.run([f"{NVBIN}/cuobjdump", "-res-usage", str(cubin)], capture_output=True, text=True).stdout
        sass = subprocess.run([f"{NVBIN}/cuobjdump", "-sass", str(cubin)], capture_output=True, text=True).stdout
    if dump is not None:
        dump.mkdir(parents=True, exist_ok=True)
        (dump / f"{name}.ttgir").write_text(compiled.asm["ttgir"])
        (dump / f"{name}.sass").write_text(sass)
    regs = re.search(r"REG:(\d+)", usage).group(1)
    spill = re.search(r"STACK:(\d+)", usage).group(1)
    shared = re.search(r"SHARED:(\d+)", usage)
    all_loops = loops(sass)
    # the innermost loop holding the exponentials: the state loop
    inner = [lp for lp in all_loops if any(t.startswith("MUFU.EX2") or " MUFU.EX2" in t for t in lp[2])]
    inner = min(inner, key=lambda lp: lp[1] - lp[0]) if inner else max(all_loops, key=lambda lp: lp[1] - lp[0])
    counts = mix(inner[2])
    keys = ["MUFU.EX2", "SHFL", "STS", "STS.128", "LDS", "LDS.128", "LDSM", "BAR", "LDG", "STG", "RED", "ATOM",
            "F2FP", "PRMT", "SHF", "FFMA", "FMUL", "FADD"]
    detail = ", ".join(f"{k} {counts[k]}" for k in keys if counts.get(k))
    print(f"{name}: regs {regs}, spill {spill} B, shared {shared.group(1) if shared else '?'} B; state loop "
          f"{sum(counts.values())} instr ({detail})", flush=True)
    return counts


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kernel", nargs="+", default=["fwd", "bwd"], choices=["fwd", "bwd"])
    parser.add_argument("--fwd-configs", nargs="+", default=["1,512,1"])
    parser.add_argument("--bwd-configs", nargs="+", default=["1,128,1"])
    parser.add_argument("--save-every", type=int, nargs="+", default=[0, 128], help="0: inference (no saves)")
    parser.add_argument("--dump", type=Path, default=None)
    args = parser.parse_args()
    print(f"triton {triton.__version__}, target sm_90; batch {BATCH}, dim {DIM}, L {LENGTH}, N {STATE}, bf16",
          flush=True)
    if "fwd" in args.kernel:
        for text in args.fwd_configs:
            block_d, block_t, warps = (int(v) for v in text.split(","))
            for every in args.save_every:
                for fold in (False, True):
                    compiled = compile_fwd(block_d, block_t, warps, save_every=every or block_t, save_states=every > 0,
                                           FOLD_H=fold)
                    report(f"fwd_{block_d}_{block_t}_{warps}_save{every}{'_fold' if fold else ''}", compiled, args.dump)
    if "bwd" in args.kernel:
        for text in args.bwd_configs:
            block_d, block_t, warps = (int(v) for v in text.split(","))
            for flip, fold, acc in ((False, False, False), (True, False, False), (True, True, False),
                                    (True, True, True)):
                name = f"bwd_{block_d}_{block_t}_{warps}" + "_flip" * flip + "_fold" * fold + "_dacc" * acc
                report(name, compile_bwd(block_d, block_t, warps, FLIP_ASM=flip, FOLD_H=fold, DA_ACC=acc), args.dump)


if __name__ == "__main__":
    main()
