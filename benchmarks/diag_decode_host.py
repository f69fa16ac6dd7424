"""Where generate()'s time per token goes beyond the GPU step (batch 1 and 16, mamba-2.8b shape, bf16): a diagnostic.

Prints, per batch: generate() ms/token (128 new tokens after a 16-token prompt, prefill included, as the anchors), the
GPU time of one replayed decode step, the prefill of the 16-token prompt, and the host syncs of a decode step
(``torch.cuda.set_sync_debug_mode``: each synchronizing call with the line of Python that made it). A sync per step
keeps the host from running ahead of the GPU, so each step then pays its host time on top of the GPU time.

    python benchmarks/diag_decode_host.py [--out DIR]
"""

from __future__ import annotations

import collections
import json
import sys
import traceback
import warnings
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT / "benchmarks"))
sys.path.insert(0, str(REPO_ROOT))

import torch  # noqa: E402

import bench_gpu_generate as gen  # noqa: E402


def syncs_during(fn):
    """Run fn with CUDA sync warnings on; returns {innermost frame in our or transformers' code: count}."""
    counts = collections.Counter()

    def show(message, category, filename, lineno, file=None, line=None):
        frames = [f for f in traceback.extract_stack()[:-1] if "warnings" not in f.filename]
        ours = [f for f in frames if "multimodal_mamba" in f.filename or "transformers" in f.filename]
        where = ours[-1] if ours else frames[-1]
        counts[f"{Path(where.filename).name}:{where.lineno} {where.line}"] += 1

    previous = warnings.showwarning
    warnings.showwarning = show
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                fn()
            finally:
                torch.cuda.set_sync_debug_mode("default")
    finally:
        warnings.showwarning = previous
    return dict(counts)


def main():
    args, systems = gen.decode_bench_setup(default_out=None)
    ours = systems["ours"]
    results = {}
    for batch in (1, 16):
        ids = torch.randint(1, 50000, (batch, gen.PROMPT), device="cuda")
        gen.ours_generate(ours, ids, True, 8)  # capture this bucket's graph
        per_token = gen.median_time(lambda: gen.ours_generate(ours, ids, True), repeats=5) / gen.NEW * 1e3
        step = gen.graph_step_ms(ours, batch)
        with torch.no_grad():
            prefill = gen.median_time(lambda: ours(ids, use_cache=True, logits_to_keep=1), repeats=5) * 1e3
        new = 16
        syncs = syncs_during(lambda: gen.ours_generate(ours, ids, True, new))
        results[f"b{batch}"] = {
            "generate_ms_per_token": per_token, "gpu_step_ms": step, "prefill16_ms": prefill,
            "prefill16_ms_per_token": prefill / gen.NEW,
            "unexplained_ms_per_token": per_token - step - prefill / gen.NEW,
            f"syncs_in_generate_of_{new}_tokens": syncs,
        }
        print(json.dumps({f"b{batch}": results[f"b{batch}"]}, indent=1), flush=True)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "diag_decode_host.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
