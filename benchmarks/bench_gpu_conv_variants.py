"""The Triton causal conv's forward at a Coupled Mamba layer's shapes, per tile configuration: the parallel kernel
(a program per time tile) and the in-place one (a program per channel block walks its tiles backwards, writing over
x), each with the conv state written. x: the first half of in_proj's (batch, L, 2 dim) output (time-major, row stride
2 dim), bf16. Time per call from a CUDA graph of 50 calls (triton.testing.do_bench_cudagraph), checked against the
reference first.

    python benchmarks/bench_gpu_conv_variants.py [--out FILE.json]
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
from triton.testing import do_bench_cudagraph  # noqa: E402

from multimodal_mamba.kernels.causal_conv1d import fused  # noqa: E402
from multimodal_mamba.modeling.ops_selective_scan import causal_conv1d_ref  # noqa: E402

SHAPES = [(32, 512, 125, True), (32, 512, 167, True), (32, 512, 500, False)]  # (batch, dim, L, initial state)
PARALLEL = [(64, 32, 4), (32, 64, 4), (64, 64, 4), (128, 32, 4), (32, 128, 4), (64, 128, 8), (128, 64, 8)]
IN_PLACE = [(32, 128, 8), (32, 64, 4), (16, 128, 4), (32, 128, 4), (64, 128, 8), (16, 64, 2), (32, 256, 8)]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    rows = []
    gen = torch.Generator(device="cuda").manual_seed(0)
    for batch, dim, length, with_init in SHAPES:
        both = torch.randn(batch, length, 2 * dim, device="cuda", dtype=torch.bfloat16, generator=gen)
        x = both.transpose(1, 2)[:, :dim]
        weight = torch.randn(dim, 4, device="cuda", dtype=torch.bfloat16, generator=gen) * 0.5
        bias = torch.randn(dim, device="cuda", dtype=torch.bfloat16, generator=gen)
        init = None
        if with_init:
            init = torch.randn(batch, dim, 4, device="cuda", dtype=torch.bfloat16, generator=gen)[..., 1:]
        state = torch.empty(batch, dim, 4, device="cuda", dtype=torch.bfloat16)
        reference = causal_conv1d_ref(x.float(), weight.float(), bias.float(),
                                      initial_state=init.float() if init is not None else None, activation="silu")
        for in_place, configs in ((False, PARALLEL), (True, IN_PLACE)):
            for config in configs:
                work = both.clone()
                xw = work.transpose(1, 2)[:, :dim]

                def call():
                    return fused.causal_conv1d_fwd(xw, weight, bias, init, "silu", state, in_place, config)

                y = call()
                error = ((y.float() - reference).norm() / reference.norm()).item()
                assert (y.data_ptr() == xw.data_ptr()) == in_place
                us = do_bench_cudagraph(call, rep=50) * 1e3
                row = {"shape": [batch, dim, length, with_init], "in_place": in_place, "config": list(config),
                       "us": round(us, 2), "rel_error": float(f"{error:.2e}")}
                rows.append(row)
                print(json.dumps(row), flush=True)
    if args.out is not None:
        args.out.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
