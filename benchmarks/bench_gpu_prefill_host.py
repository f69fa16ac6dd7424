"""Host (CPU) side of a batch-1 prefill on the fused CUDA path: where the per-layer launch overhead goes.

At batch 1 the mamba-2.8b-shaped prefill (64 layers) is host-bound: the Python and launch work per layer takes
longer than the layer's kernels. This script measures, on one process:

- the whole model's wall time at several lengths (L 16: GPU time negligible, so wall = host time) and the per-layer
  host time derived from it;
- per-component host time on one real mixer (L 64: every kernel finishes long before the next launch, so a loop
  of N calls with one sync at the end measures the host side): the projections, the conv and scan entry points
  and their wrappers, the transposes, A, the RMSNorm, the whole mixer and block;
- the cost of a Triton launch through ``JITFunction.__getitem__`` against a cached ``CompiledKernel`` runner;
- optionally (``--cprofile``) a cProfile of prefills at L 64, sorted by own time.

    python benchmarks/bench_gpu_prefill_host.py [--out DIR] [--layers 64] [--cprofile] [--repo PATH]

``--repo PATH`` imports the package from another checkout (e.g. a copy of the previous commit: before / after in one
command).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def parse():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--layers", type=int, default=64)
    parser.add_argument("--lengths", type=int, nargs="+", default=[16, 512, 2048])
    parser.add_argument("--cprofile", action="store_true")
    parser.add_argument("--repo", type=Path, default=Path(__file__).resolve().parents[1])
    parser.add_argument("--label", default="")
    parser.add_argument("--device", default="cuda")
    return parser.parse_args()


ARGS = parse()
sys.path.insert(0, str(ARGS.repo.resolve()))

import torch  # noqa: E402
from transformers import MambaConfig  # noqa: E402

from multimodal_mamba import MambaCausalLM, last_backend  # noqa: E402

RESULTS = {}


def sync():
    if ARGS.device == "cuda":
        torch.cuda.synchronize()


def record(key, value):
    key = f"{ARGS.label}{key}"
    RESULTS[key] = value
    print(json.dumps({key: value}), flush=True)


def wall(fn, repeats=7, warmup=2):
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def host_us(fn, calls=200):
    """Host microseconds per call: ``calls`` calls back to back, one sync at the end (the kernels are tiny)."""
    for _ in range(5):
        fn()
    sync()
    best = None
    for _ in range(3):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        sync()
        t = (time.perf_counter() - start) / calls * 1e6
        best = t if best is None else min(best, t)
    return round(best, 1)


def main():
    device = ARGS.device
    shape = dict(vocab_size=50280, hidden_size=2560, num_hidden_layers=ARGS.layers, state_size=16, expand=2,
                 conv_kernel=4)
    if device != "cuda":  # a CPU dry run of the script itself
        shape.update(hidden_size=64, num_hidden_layers=2, vocab_size=1000)
    config = MambaConfig(**shape)
    torch.manual_seed(0)
    with torch.device(device):
        model = MambaCausalLM(config).to(torch.bfloat16).eval()
    record("repo", str(ARGS.repo))
    layers = config.num_hidden_layers
    with torch.no_grad():
        for length in ARGS.lengths:
            x = torch.randint(0, config.vocab_size - 1, (1, length), device=device)
            t_full = wall(lambda: model(x, use_cache=False))
            record(f"prefill_L{length}_ms/full_logits", round(t_full * 1e3, 2))
            t = wall(lambda: model(x, use_cache=True, logits_to_keep=1))
            record(f"prefill_L{length}_ms/generate_prefill", round(t * 1e3, 2))
            if length == ARGS.lengths[0]:
                record(f"host_us_per_layer/L{length}_full_logits_wall_over_layers", round(t_full * 1e6 / layers, 1))
        record("scan_backend", last_backend("selective_scan"))
        if device == "cuda":
            try:
                import triton

                from multimodal_mamba.kernels import utils as kernel_utils

                record("fast_launch_supported", kernel_utils.fast_launch_supported())
                record("triton_launch_enter_hook", repr(triton.knobs.runtime.launch_enter_hook)[:80])
            except (ImportError, AttributeError):  # an older checkout: no CachedLaunch
                record("fast_launch_supported", None)
        record("conv_backend", last_backend("causal_conv1d"))

        # one mixer's pieces at L 64
        block = model.backbone.layers[0]
        mixer = block.mixer
        hidden = torch.randn(1, 64, config.hidden_size, device=device, dtype=torch.bfloat16)
        normed = block.norm(hidden, input_dtype=block.norm.weight.dtype)
        items = {}
        items["block"] = lambda: block(hidden)
        items["mixer"] = lambda: mixer(normed)
        items["norm"] = lambda: block.norm(hidden, input_dtype=block.norm.weight.dtype)
        items["in_proj"] = lambda: mixer.in_proj(normed)
        x, z = mixer.input_stage(normed)
        items["input_stage"] = lambda: mixer.input_stage(normed)
        delta, B, C = mixer.ssm_parameters(x)
        items["ssm_parameters"] = lambda: mixer.ssm_parameters(x)
        items["x_proj"] = lambda: mixer.x_proj(x.transpose(1, 2))
        ts = torch.randn(1, 64, mixer.time_step_rank, device=device, dtype=torch.bfloat16)
        items["dt_proj"] = lambda: mixer.dt_proj(ts)
        items["ssm_A"] = lambda: mixer.ssm_A()
        from multimodal_mamba.modeling import modeling_mamba_lm as lm
        from multimodal_mamba.modeling import ops_selective_scan as ops

        weight = mixer.conv1d.weight.squeeze(1)
        xin = mixer.in_proj(normed).transpose(1, 2).chunk(2, dim=1)[0]
        items["causal_conv1d(dispatch)"] = lambda: ops.causal_conv1d(xin, weight, mixer.conv1d.bias, activation="silu")
        if hasattr(lm, "_time_contiguous"):
            items["_time_contiguous"] = lambda: lm._time_contiguous(x, delta, z, B, C)
            xc, dc, zc, Bc, Cc = lm._time_contiguous(x, delta, z, B, C)
        else:
            xc, dc, zc, Bc, Cc = x, delta, z, B, C
        A = mixer.ssm_A()
        items["selective_scan(dispatch)"] = lambda: ops.selective_scan(xc, dc, A, Bc, Cc, mixer.D, z=zc,
                                                                     delta_softplus=True)
        items["_check_selective_scan_inputs"] = lambda: ops._check_selective_scan_inputs(
            xc, dc, A, Bc, Cc, mixer.D, zc, None, None)
        items["out_proj"] = lambda: mixer.out_proj(xc.transpose(1, 2))
        items["torch.empty"] = lambda: torch.empty(1, 5120, 64, device=device, dtype=torch.bfloat16)
        items["tensor.add"] = lambda: hidden + hidden
        if device == "cuda":
            import triton

            from multimodal_mamba import kernels
            from multimodal_mamba.kernels.causal_conv1d import fused as conv_fused
            from multimodal_mamba.kernels.selective_scan import fused as scan_fused
            from multimodal_mamba.kernels.transpose import fused as tr_fused

            items["accepts_selective_scan"] = lambda: kernels.accepts_selective_scan(
                xc, dc, A, Bc, Cc, mixer.D, z=zc, delta_softplus=True)
            items["selective_scan_triton"] = lambda: scan_fused.selective_scan_triton(xc, dc, A, Bc, Cc, mixer.D, z=zc)
            items["selective_scan_fwd"] = lambda: scan_fused.selective_scan_fwd(xc, dc, A, Bc, Cc, mixer.D, zc)
            items["causal_conv1d_triton"] = lambda: conv_fused.causal_conv1d_triton(xin, weight, mixer.conv1d.bias,
                                                                                   activation="silu")
            items["causal_conv1d_fwd"] = lambda: conv_fused.causal_conv1d_fwd(xin, weight, mixer.conv1d.bias, None,
                                                                             "silu")
            items["channel_major_many(3)"] = lambda: tr_fused.channel_major_many(x.transpose(1, 2), z.transpose(1, 2),
                                                                                delta.transpose(1, 2))
            items["channel_major_many(2)"] = lambda: tr_fused.channel_major_many(B.transpose(1, 2), C.transpose(1, 2))
            # a Triton launch: JITFunction[grid](...) vs a cached CompiledKernel runner
            src = x.transpose(1, 2)
            out = torch.empty(1, src.shape[2], src.shape[1], device=device, dtype=src.dtype)
            grid = (triton.cdiv(src.shape[1], 64), triton.cdiv(src.shape[2], 64), 1)
            args = (src, out, src.shape[1], src.shape[2], *src.stride(), *out.stride())
            items["triton_jit_launch(transpose, 10 args)"] = lambda: tr_fused._transpose_kernel[grid](
                *args, BLOCK_L=64, BLOCK_C=64, num_warps=4)
            compiled = tr_fused._transpose_kernel[grid](*args, BLOCK_L=64, BLOCK_C=64, num_warps=4)
            try:
                runner = compiled[grid]
                runner(*args, 64, 64)
                sync()
                items["triton_compiled_runner(transpose)"] = lambda: runner(*args, 64, 64)
            except Exception as error:  # pragma: no cover - depends on the Triton version
                record("compiled_runner_error", repr(error)[:300])
            try:
                function, run = compiled.function, compiled.run
                stream = torch.cuda.current_stream().cuda_stream
                packed = compiled.packed_metadata
                record("compiled_run_signature_ok", True)
                items["triton_compiled_run(transpose)"] = lambda: run(
                    grid[0], grid[1], grid[2], stream, function, packed, None, None, None, *args, 64, 64)
            except Exception as error:  # pragma: no cover
                record("compiled_run_error", repr(error)[:300])
        for name, fn in items.items():
            try:
                record(f"host_us/{name}", host_us(fn))
            except Exception as error:
                record(f"host_us/{name}", f"error {repr(error)[:200]}")

        if ARGS.cprofile:
            import cProfile
            import io
            import pstats

            x = torch.randint(0, config.vocab_size - 1, (1, 64), device=device)
            model(x, use_cache=False)
            sync()
            profiler = cProfile.Profile()
            profiler.enable()
            for _ in range(10):
                model(x, use_cache=False)
            sync()
            profiler.disable()
            for key in ("tottime", "cumulative"):
                text = io.StringIO()
                pstats.Stats(profiler, stream=text).sort_stats(key).print_stats(45)
                print(f"--- cProfile ({key}), 10 prefills at L 64, {layers} layers\n" + text.getvalue()[-9000:],
                      flush=True)
                if ARGS.out:
                    (ARGS.out / f"cprofile_prefill_{ARGS.label or 'x'}_{key}.txt").write_text(text.getvalue())
    if ARGS.out:
        ARGS.out.mkdir(parents=True, exist_ok=True)
        path = ARGS.out / "prefill_host.json"
        merged = json.loads(path.read_text()) if path.exists() else {}
        merged.update(RESULTS)
        path.write_text(json.dumps(merged, indent=1))


if __name__ == "__main__":
    main()
