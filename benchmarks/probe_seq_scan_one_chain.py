"""Probe: the coupled scan's "sequential" forward (kernels/coupled_scan/sequential.py) run with one chain, i.e. as a
plain selective-scan forward, on the issue's shape (batch 1, dim 5120, N 16, bf16, z, softplus; L 2048 and 8192),
against mamba-ssm's ``selective_scan_fn`` and our chunked Triton forward, over several (block_d, warps, K)
configurations; B / C given as they come (bf16, L-contiguous) and pre-packed (float32, N-contiguous).

    python benchmarks/probe_seq_scan_one_chain.py OUT.json

Result (H200): `benchmarks/results/gpu_seq_scan_one_chain_probe.json`, discussed in gpu_kernels_notes.md.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
sys.path.insert(0, str(REPO_ROOT / "benchmarks"))

import torch  # noqa: E402
from triton.testing import do_bench  # noqa: E402

from bench_gpu_selective_scan import make_inputs  # noqa: E402
from multimodal_mamba.kernels.coupled_scan import sequential  # noqa: E402
from multimodal_mamba.kernels.selective_scan import fused  # noqa: E402

CONFIGS = [None, (16, 1, 4), (8, 1, 4), (4, 1, 4), (8, 1, 8), (4, 1, 8), (2, 1, 4), (8, 1, 2), (16, 1, 8)]


def median_ms(fn):
    return do_bench(fn, warmup=25, rep=100, return_mode="median")


def main(out_path: Path):
    from mamba_ssm.ops.selective_scan_interface import selective_scan_fn

    results = []
    for length in (2048, 8192):
        t = make_inputs(1, 5120, length, 16)
        args = [t[k] for k in ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")]
        u, delta, A, B, C, D, z, bias = args
        reference = fused.selective_scan_triton(*args, True).float()
        theirs = median_ms(lambda: selective_scan_fn(*args, True))
        chunked = median_ms(lambda: fused.selective_scan_triton(*args, True))
        print(f"L {length}: mamba-ssm {theirs * 1e3:.1f} us, ours chunked {chunked * 1e3:.1f} us", flush=True)
        results.append(dict(L=length, mamba=theirs, ours=chunked))
        packed_B = B.float().transpose(-1, -2).contiguous().transpose(-1, -2)  # as prepare_bc packs them
        packed_C = C.float().transpose(-1, -2).contiguous().transpose(-1, -2)
        for config in CONFIGS:
            def one_chain(b=B, c=C, config=config):
                return sequential.coupled_scan_fwd_seq([u], [delta], [z], A[None], [b], [c], D[None], bias[None],
                                                       True, "sum", None, config=config)[0]
            try:
                err = ((one_chain()[:, 0].float() - reference).abs().max() / reference.abs().max()).item()
                ms = median_ms(one_chain)
                ms_packed = median_ms(lambda: one_chain(packed_B, packed_C))
            except Exception as error:  # a configuration that does not compile here
                print(config, "failed", repr(error)[:200], flush=True)
                continue
            print(f"  seq M1 {config}: {ms * 1e3:.1f} us (B/C pre-packed {ms_packed * 1e3:.1f}), ratio to mamba-ssm "
                  f"{ms / theirs:.3f}, rel err {err:.2e}", flush=True)
            results.append(dict(L=length, cfg=str(config), us=ms * 1e3, us_prepacked=ms_packed * 1e3, err=err))
    out_path.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    if not torch.cuda.is_available():
        sys.exit("needs CUDA")
    main(Path(sys.argv[1]))
