"""Sequential coupled-scan forward: this tree's kernel against a baseline copy of ``sequential.py``, side by side.

The baseline is another version of ``multimodal_mamba/kernels/coupled_scan/sequential.py`` (e.g. main's, while this
tree holds a branch), loaded as a second module of the same package, so that both kernels run in one process on the
same tensors, timed in interleaved rounds (``triton.testing.do_bench``, median per round, best round kept).

Cases:
- ``fusion_layer``: the Coupled Mamba fusion benchmark's scan (batch 32, M 3, dim 512, L 500, N 16, bf16) on tensors
  laid out as a layer hands them over: u, delta time-major views of separate tensors, z half of a wider one (in_proj's
  output), B and C column blocks of x_proj's (batch, L, R + 2N) output, D, no delta_bias. Timed as the whole call
  (B / C packing included: what the layer pays) and as the kernel alone (B / C packed once).
- ``fusion_stacked``: the same shape as ``bench_gpu_coupled_xlane.py`` times it (views of stacked time-major tensors,
  delta_bias), kernel alone: the number the notes compare against.
- ``big_lmajor_fp32``: (8, 3, 1024, 4096, 16), (batch, M, dim, L) float32, kernel alone, with its HBM fraction.
Variants: ``baseline``, ``new`` (this tree, defaults) and, where the case allows unmasked tiles, ``new_masked``
(``SEQ_EVEN_TILES`` off). Kernels are compiled first in parallel worker processes (Triton's disk cache).

    python benchmarks/bench_gpu_coupled_seq_ab.py --baseline PATH/sequential.py [--out DIR] [--cases ...]
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

FUSION = (32, 3, 512, 500, 16)
BIG = (8, 3, 1024, 4096, 16)
CASES = ("fusion_layer", "fusion_stacked", "big_lmajor_fp32")
VARIANTS = ("baseline", "new", "new_masked")


def load_module(variant, baseline_path):
    """The sequential module of a variant: this tree's, or the baseline file as a sibling module."""
    from multimodal_mamba.kernels.coupled_scan import sequential

    if variant != "baseline":
        return sequential
    name = "multimodal_mamba.kernels.coupled_scan._baseline_sequential"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, baseline_path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def layer_inputs(batch, chains, dim, length, state, dtype, rank=16, seed=0):
    """Per-chain tensors as a Coupled Mamba layer's input stage leaves them (see the module docstring)."""
    import torch

    gen = torch.Generator(device="cuda").manual_seed(seed)

    def rand(*shape, scale=1.0, shift=0.0):
        return torch.randn(*shape, device="cuda", generator=gen) * scale + shift

    lists = dict(us=[], deltas=[], zs=[], Bs=[], Cs=[])
    for _ in range(chains):
        lists["us"].append(rand(batch, length, dim).to(dtype).transpose(1, 2))
        lists["deltas"].append(rand(batch, length, dim, scale=0.5, shift=-3.0).to(dtype).transpose(1, 2))
        lists["zs"].append(rand(batch, length, 2 * dim).to(dtype)[..., dim:].transpose(1, 2))
        params = rand(batch, length, rank + 2 * state).to(dtype)
        lists["Bs"].append(params[..., rank:rank + state].transpose(1, 2))
        lists["Cs"].append(params[..., rank + state:].transpose(1, 2))
    lists.update(A=-torch.exp(rand(chains, dim, state, scale=0.5)), D=rand(chains, dim), delta_bias=None)
    return lists


def stacked_inputs(shape, layout, dtype):
    import torch

    from benchmarks.bench_gpu_coupled_scan import make_inputs

    t = make_inputs(*shape, {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype], time_major=layout == "tmajor")
    chains = shape[1]
    split = lambda x: [x[:, m] for m in range(chains)]  # noqa: E731
    return dict(us=split(t["u"]), deltas=split(t["delta"]), zs=split(t["z"]), Bs=split(t["B"]), Cs=split(t["C"]),
                A=t["A"], D=t["D"], delta_bias=t["delta_bias"]), t


def case_inputs(case):
    if case == "fusion_layer":
        import torch

        return layer_inputs(*FUSION, torch.bfloat16), None
    if case == "fusion_stacked":
        return stacked_inputs(FUSION, "tmajor", "bf16")
    return stacked_inputs(BIG, "lmajor", "fp32")


def applies(case, variant, module):
    """new_masked only where the new kernel would drop the masks (dim and L multiples of its block_d and K)."""
    return variant != "new_masked" or hasattr(module, "SEQ_EVEN_TILES")


def scan_call(module, variant, lists, packed):
    """A function running the variant's forward on ``lists``: the whole call (packed False: B / C packing
    included) or the kernel alone (packed True: B / C packed once, here)."""
    Bs, Cs = module.prepare_bc(lists["Bs"], lists["Cs"]) if packed else (lists["Bs"], lists["Cs"])

    def call():
        if hasattr(module, "SEQ_EVEN_TILES"):
            module.SEQ_EVEN_TILES = variant != "new_masked"
        return module.coupled_scan_fwd_seq(lists["us"], lists["deltas"], lists["zs"], lists["A"], Bs, Cs, lists["D"],
                                           lists["delta_bias"], True, "mean", None)[0]
    return call


def _compile(task):
    case, variant, baseline_path = task
    try:
        import torch

        module = load_module(variant, baseline_path)
        if not applies(case, variant, module):
            return None
        lists, _ = case_inputs(case)
        with torch.no_grad():
            scan_call(module, variant, lists, True)()
        torch.cuda.synchronize()
        return None
    except Exception as error:  # reported, not timed
        return repr(error)[:400]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline", type=Path, required=True, help="the baseline version's sequential.py")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "benchmarks" / "results")
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=CASES)
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--rep", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    tasks = [(case, variant, str(args.baseline)) for case in args.cases for variant in VARIANTS]
    with mp.get_context("spawn").Pool(args.workers) as pool:
        errors = dict(zip([t[:2] for t in tasks], pool.map(_compile, tasks, chunksize=1)))
    import torch
    from triton.testing import do_bench

    from benchmarks.bench_gpu_coupled_scan import copy_bandwidth

    bandwidth = copy_bandwidth()
    print(json.dumps(dict(copy_bandwidth_tb_s=round(bandwidth / 1e12, 3))), flush=True)
    results = []
    for case in args.cases:
        torch.cuda.empty_cache()
        lists, _ = case_inputs(case)
        ref_module = load_module("baseline", args.baseline)
        with torch.no_grad():
            ref = scan_call(ref_module, "baseline", lists, True)().float()
        # bytes the scan must move: u, delta, z read and y written once, B and C read (as given)
        nbytes = sum(t.numel() * t.element_size() for key in ("us", "deltas", "zs", "Bs", "Cs") for t in lists[key])
        nbytes += sum(t.numel() * t.element_size() for t in lists["us"])
        rows = []
        for variant in VARIANTS:
            module = load_module(variant, args.baseline)
            if not applies(case, variant, module) or errors[(case, variant)]:
                if errors.get((case, variant)):
                    print(json.dumps(dict(case=case, variant=variant, error=errors[(case, variant)])), flush=True)
                continue
            for packed in ((True, False) if case == "fusion_layer" else (True,)):
                rows.append(dict(variant=variant, packed=packed, fn=scan_call(module, variant, lists, packed), ms=[]))
        for _ in range(args.rounds):
            for row in rows:
                with torch.no_grad():
                    row["ms"].append(do_bench(row["fn"], warmup=10, rep=args.rep, return_mode="median"))
        for row in rows:
            with torch.no_grad():
                y = row["fn"]().float()
            ms = min(row["ms"])
            out = dict(case=case, variant=row["variant"], timed="kernel" if row["packed"] else "call with B/C packing",
                       ms=round(ms, 4), ms_rounds=[round(v, 4) for v in row["ms"]],
                       hbm_fraction=round(nbytes / (ms * 1e-3) / bandwidth, 4),
                       rel_diff_vs_baseline=float((y - ref).norm() / ref.norm()))
            results.append(out)
            print(json.dumps(out), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu_coupled_seq_ab.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
