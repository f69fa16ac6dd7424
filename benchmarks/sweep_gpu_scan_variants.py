"""Selective-scan kernel variants against mamba-ssm in one process (issue 6's shape: batch 1, dim 5120, N 16, bf16,
z gate, delta_softplus): kernel-only forward and backward times per variant, then whole forward + backward
autograd steps of chosen settings, each next to mamba-ssm's time measured in the same process.

A setting is a dict of ``fused`` module attributes (FWD_CONFIGS / BWD_CONFIGS tables, FWD_FOLD_H, BWD_FLIP_ASM,
BWD_FOLD_H, FAST_MATH, CVT_ASM, FWD_CARRY_SUM, FWD_MAXNREG, ...), applied for the measurement and restored after.

    python benchmarks/sweep_gpu_scan_variants.py [--lengths 2048 8192] [--only fwd bwd step] [--out DIR]

Writes ``sweep_scan_variants.json`` in --out.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
sys.path.insert(0, str(REPO_ROOT / "benchmarks"))

import torch  # noqa: E402
from triton.testing import do_bench  # noqa: E402

from bench_gpu_selective_scan import make_inputs, ours, selective_scan_fn, theirs, time_fwd, time_fwd_bwd  # noqa: E402
from multimodal_mamba.kernels.selective_scan import fused  # noqa: E402

# settings: the old kernels (main before this branch: every new flag off), the first device round's (flip, fold),
# the module's defaults ({}), and single changes of the defaults
OLD = dict(FWD_FOLD_H=False, BWD_FLIP_ASM=False, BWD_FOLD_H=False, FAST_MATH=False,
           CVT_ASM={"fwd": False, "bwd": False}, FWD_CARRY_SUM=False, FWD_MAXNREG={"infer": None, "train": None})
ROUND1 = dict(OLD, FWD_FOLD_H=True, BWD_FLIP_ASM=True, BWD_FOLD_H=True)
DEFAULT = {}
REPEATS = 3  # the close A/B pairs are timed this many times, alternating


def tables(fwd=(1, 512, 1, False), bwd=(1, 128, 1, False)):
    return dict(FWD_CONFIGS={"lmajor": fwd, "tmajor": fwd}, BWD_CONFIGS={"lmajor": bwd, "tmajor": bwd})


FWD_VARIANTS = [
    ("old", dict(OLD, **tables())),
    ("round1 (fold)", dict(ROUND1, **tables())),
] + [(name, setting) for _ in range(REPEATS) for name, setting in (
    ("default", DEFAULT),
    ("default + carry sum", dict(FWD_CARRY_SUM=True)),
    ("default, no cap", dict(FWD_MAXNREG={"infer": None, "train": None})),
)]
BWD_VARIANTS = [  # (name, setting, save_every of the forward that feeds it)
    ("old", dict(OLD, **tables()), 128),
    ("round1 (flip fold)", dict(ROUND1, **tables()), 128),
] + [(name, setting, 128) for _ in range(REPEATS) for name, setting in (
    ("default", DEFAULT),
    ("default + bwd cvt", dict(CVT_ASM={"fwd": True, "bwd": True})),
)]
STEP_VARIANTS = [
    ("old", dict(OLD, **tables())),
    ("default", DEFAULT),
    ("default + carry sum", dict(FWD_CARRY_SUM=True)),
]


class applied:
    def __init__(self, setting):
        self.setting = setting

    def __enter__(self):
        self.saved = {k: getattr(fused, k) for k in self.setting}
        for k, v in self.setting.items():
            setattr(fused, k, v)

    def __exit__(self, *exc):
        for k, v in self.saved.items():
            setattr(fused, k, v)


def args_of(t):
    return [t[k] for k in ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")]


def run(lengths, only, out):
    results = []

    def record(**row):
        results.append(row)
        print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}), flush=True)

    for length in lengths:
        t = make_inputs(1, 5120, length, 16, requires_grad=True)
        args = args_of(t)
        if selective_scan_fn is not None:
            record(kind="mamba_ssm", L=length, layout="lmajor", fwd_ms=time_fwd(theirs, t),
                   step_ms=time_fwd_bwd(theirs, t))
        if "fwd" in only:
            for name, setting in FWD_VARIANTS:
                with applied(setting):
                    cfg = fused.FWD_CONFIGS["lmajor"]
                    ms = do_bench(lambda: fused.selective_scan_fwd(*args, True, None), warmup=25, rep=150,
                                  return_mode="median")
                    row = dict(kind="fwd", L=length, variant=name, ms=ms)
                    for every in (128, 256):
                        if every <= cfg[1]:
                            row[f"save{every}_ms"] = do_bench(
                                lambda: fused.selective_scan_fwd(*args, True, None, save_states=True,
                                                                 save_every=every),
                                warmup=25, rep=150, return_mode="median")
                record(**row)
        if "bwd" in only:
            dout = torch.randn_like(t["u"])
            plain = [a.detach() for a in args]
            for name, setting, every in BWD_VARIANTS:
                with applied(setting):
                    _, _, states, meta = fused.selective_scan_fwd(*plain, True, None, save_states=True,
                                                                  save_every=every)
                    ms = do_bench(lambda: fused.selective_scan_bwd(*plain, True, states, meta["block_t"], dout),
                                  warmup=10, rep=100, return_mode="median")
                record(kind="bwd", L=length, variant=name, ms=ms)
        if "step" in only:
            layouts = ("lmajor", "tmajor") if length <= 2048 else ("lmajor",)
            for layout in layouts:
                tt = t if layout == "lmajor" else make_inputs(1, 5120, length, 16, time_major=True,
                                                              requires_grad=True)
                anchor = {}
                if selective_scan_fn is not None and layout != "lmajor":
                    anchor = dict(mamba_fwd_ms=time_fwd(theirs, tt), mamba_step_ms=time_fwd_bwd(theirs, tt))
                for name, setting in STEP_VARIANTS:
                    with applied(setting):
                        record(kind="step", L=length, layout=layout, variant=name, fwd_ms=time_fwd(ours, tt),
                               step_ms=time_fwd_bwd(ours, tt), **anchor)
        if selective_scan_fn is not None:  # the anchor again (drift over the run)
            record(kind="mamba_ssm_again", L=length, layout="lmajor", fwd_ms=time_fwd(theirs, t),
                   step_ms=time_fwd_bwd(theirs, t))
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "sweep_scan_variants.json").write_text(json.dumps(results, indent=1))
    return results


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[2048, 8192])
    parser.add_argument("--only", nargs="+", default=["fwd", "bwd", "step"], choices=["fwd", "bwd", "step"])
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    run(args.lengths, args.only, args.out)


if __name__ == "__main__":
    main()
