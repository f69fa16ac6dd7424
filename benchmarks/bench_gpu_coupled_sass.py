"""Offline look at the sequential coupled-scan forward's machine code for an H100/H200 (sm_90): no GPU needed.

Compiles ``multimodal_mamba.kernels.coupled_scan.sequential._coupled_seq_fwd_kernel`` with Triton for target
``cuda:90`` (Triton ships ptxas and cuobjdump), specialized as a launch on the benchmark's tensors would be (bf16
activations, float32 B / C rows, strides divisible by 16, M = 3, N = 16, D, z and delta_bias present), and prints
per configuration (block_d, num_warps, K): registers, spill bytes, and the instruction mix of the main loop per
time step (per lane and per (lane, state)), MUFU (special-function) instructions and shuffles included.

    python benchmarks/bench_gpu_coupled_sass.py [--configs 16,1,4 16,1,1 ...] [--layout lmajor|tmajor] [--even]
        [--state N] [--act bf16|fp32]

What it is for: the kernel's layouts are chosen by Triton's layout propagation, which differs between versions (a
channel's states must stay in one or two lanes; see sequential.py). This checks that on any Triton without a GPU.
"""

from __future__ import annotations

import argparse
import collections
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

try:
    from multimodal_mamba.kernels.coupled_scan import sequential  # noqa: E402
except ImportError:  # an environment with Triton and torch only (e.g. a venv of the device's Triton version)
    import types

    for _name in ("multimodal_mamba", "multimodal_mamba.kernels"):
        _pkg = types.ModuleType(_name)
        _pkg.__path__ = [str(REPO_ROOT / _name.replace(".", "/"))]
        sys.modules[_name] = _pkg
    from multimodal_mamba.kernels.coupled_scan import sequential  # noqa: E402

NVBIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
UNSPECIALIZED = ("length", "n_slots", "stride_A_n", "stride_A_d")


def compile_config(block_d, num_warps, k, lmajor, chains=3, state=16, act="bf16", bc="fp32", save_every=0,
                   prefetch_bc=False, bc_ahead=False, maxnreg=None, xlane=False, even=False):
    fn = sequential._coupled_seq_fwd_kernel
    sig, const = {}, {}
    for p in fn.arg_names:
        if (p[0] in "UZO" and p[1:].isdigit()) or p.startswith("DL"):
            sig[p] = "*" + act
        elif p == "BC" or (p[0] in "BC" and p[1:].isdigit()):  # packed B / C rows (or, before, one per chain)
            sig[p] = "*" + bc
        elif p.endswith("_ptr"):
            sig[p] = "*fp32"
        elif p in ("scale", "inv_scale", "lc_valid", "lc_pad"):
            sig[p] = "fp32"
        elif p.isupper() or p == "N_PAD":
            sig[p] = "constexpr"
        else:
            sig[p] = "i32"
    const.update(M=chains, N=state, N_PAD=triton.next_power_of_2(state), LPC=max(1, 32 * num_warps // block_d),
                 BD=block_d, K=k, SAVE_EVERY=save_every, HAS_D=True, HAS_Z=True, HAS_BIAS=True, SOFTPLUS=True,
                 HAS_H0=False, FAST=True, PREFETCH_BC=prefetch_bc, BC_AHEAD=bc_ahead,
                 XLANE=bool(xlane) and sequential.xlane_applies(block_d, num_warps, k),
                 JS=1 if lmajor else block_d)
    # ("mean" coupling, 32-bit offsets; even: dim and L multiples of (block_d, K), the unmasked tiles)
    const.update({p: v for p, v in (("PAD_LC", False), ("OFF64", False), ("EVEN", even)) if p in fn.arg_names})
    ones = [p for p in ("stride_bc_n",) if p in fn.arg_names] + (
        [f"stride_{t}_l" for t in ("u", "dl", "z", "o")] if lmajor else [f"stride_{t}_d" for t in ("u", "dl", "z", "o")])
    for p in ones:
        const[p], sig[p] = 1, "constexpr"
    divisible = [i for i, p in enumerate(fn.arg_names)
                 if sig[p].startswith("*") or (sig[p] == "i32" and p not in UNSPECIALIZED)]
    src = ASTSource(fn=fn, signature=sig, constexprs=const, attrs={(i,): [["tt.divisibility", 16]] for i in divisible})
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps, **({"maxnreg": maxnreg} if maxnreg else {})})


def loops(sass):
    """[(start, end, [instructions])] of every loop (a backward branch) of a cuobjdump -sass listing."""
    ins, index = [], {}
    for line in sass.splitlines():
        m = re.match(r"\s+/\*([0-9a-f]{4,})\*/\s+(.*?);", line)
        if m:
            index[int(m.group(1), 16)] = len(ins)
            ins.append(m.group(2).strip())
    found = []
    for i, text in enumerate(ins):
        m = re.search(r"BRA\s.*?0x([0-9a-f]+)", text)
        if m and int(m.group(1), 16) in index and index[int(m.group(1), 16)] <= i:
            start = index[int(m.group(1), 16)]
            found.append((start, i, ins[start:i + 1]))
    return found


def loop_mix(sass):
    """Opcode counts of the longest loop (a backward branch) of a cuobjdump -sass listing (the whole listing if it
    has no loop)."""
    found = loops(sass)
    if found:
        body = max(found, key=lambda loop: loop[1] - loop[0])[2]
    else:
        body = [m.group(1).strip() for m in re.finditer(r"\s+/\*[0-9a-f]{4,}\*/\s+(.*?);", sass)]
    counts = collections.Counter()
    for text in body:
        op = re.sub(r"^@!?U?P\w+\s+", "", text).split()[0]
        counts[op if op.startswith("MUFU") else op.split(".")[0]] += 1
    return counts


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", default=["16,1,4", "16,1,2", "8,1,4", "32,1,1", "16,1,1"],
                        help="block_d,num_warps,K[,prefetch_bc,bc_ahead[,xlane]] (0/1)")
    parser.add_argument("--layout", choices=["lmajor", "tmajor"], nargs="+", default=["lmajor", "tmajor"])
    parser.add_argument("--maxnreg", type=int, default=None, help="register cap (ptxas .maxnreg)")
    parser.add_argument("--even", action="store_true", help="specialize for dim, L multiples of (block_d, K)")
    parser.add_argument("--state", type=int, default=16, help="N, the state size")
    parser.add_argument("--act", choices=["bf16", "fp32"], default="bf16", help="dtype of u, delta, z and out")
    parser.add_argument("--dump", default=None, help="write each config's main-loop SASS to DUMP_<config>.sass")
    args = parser.parse_args()
    print(f"triton {triton.__version__}, target sm_90; M 3, N {args.state}, {args.act} activations, float32 B / C",
          flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        for layout in args.layout:
            for text in args.configs:
                values = [int(v) for v in text.split(",")]
                block_d, num_warps, k = values[:3]
                prefetch_bc, bc_ahead = (bool(v) for v in (values[3:5] if len(values) >= 5 else (0, 0)))
                xlane = len(values) == 6 and bool(values[5])
                compiled = compile_config(block_d, num_warps, k, layout == "lmajor", prefetch_bc=prefetch_bc,
                                          bc_ahead=bc_ahead, maxnreg=args.maxnreg, xlane=xlane, even=args.even,
                                          state=args.state, act=args.act)
                cubin = Path(tmp) / "k.cubin"
                cubin.write_bytes(compiled.asm["cubin"])
                usage = subprocess.run([f"{NVBIN}/cuobjdump", "-res-usage", str(cubin)], capture_output=True,
                                       text=True).stdout
                sass = subprocess.run([f"{NVBIN}/cuobjdump", "-sass", str(cubin)], capture_output=True,
                                      text=True).stdout
                regs = re.search(r"REG:(\d+)", usage).group(1)
                spill = re.search(r"STACK:(\d+)", usage).group(1)
                mix = loop_mix(sass)
                if args.dump:
                    found = loops(sass)
                    body = max(found, key=lambda loop: loop[1] - loop[0])[2] if found else []
                    Path(f"{args.dump}_{layout}_{'_'.join(map(str, values))}.sass").write_text("\n".join(body))
                total = sum(mix.values())
                lanes = max(1, 32 * num_warps // block_d)
                mufu = sum(v for key, v in mix.items() if key.startswith("MUFU"))
                print(f"{layout} {tuple(values)}: regs {regs}, spill {spill} B; per step per lane "
                      f"{total / k:.0f} instr ({total / k / max(1, args.state / lanes):.1f} per (lane, state)), MUFU "
                      f"{mufu / k:.1f}, SHFL {mix['SHFL'] / k:.1f}, LDG {mix['LDG'] / k:.1f}", flush=True)


if __name__ == "__main__":
    main()
