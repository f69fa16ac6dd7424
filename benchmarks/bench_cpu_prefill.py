"""CPU prefill: this package's ``MambaCausalLM`` (PyTorch path) against transformers' ``MambaForCausalLM``.

Both models hold the same random weights (transformers' state_dict loaded into ours). The script checks that their
logits agree, then times a prompt of ``--length`` tokens at batch 1 in the same process, the two models interleaved
run by run (the machine is shared and noisy: compare ratios of medians, not absolute times):

- full logits: ``model(input_ids, use_cache=False)``;
- prefill: ``model(input_ids, use_cache=True, logits_to_keep=1)`` (what ``generate`` runs on the prompt).

Each is timed with torch's default number of threads and with one thread (OpenMP threads that wait for each other
suffer most when other processes share the cores); the one-thread runs are also reported in CPU time of the thread,
which leaves out the time other processes held the core. It also times one layer's selective scan alone (time-major input,
as the mixer passes it) against the sequential reference, and the rest of our forward with the scan replaced by an
empty tensor, to show where the time goes. Results go to ``benchmarks/results/cpu_prefill.md``.

    python benchmarks/bench_cpu_prefill.py [--length 2048] [--repeats 7] [--no-write]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import torch  # noqa: E402
import transformers  # noqa: E402
from transformers import MambaConfig, MambaForCausalLM  # noqa: E402

import multimodal_mamba.modeling.modeling_mamba_lm as modeling_mamba_lm  # noqa: E402
from multimodal_mamba import MambaCausalLM, last_backend  # noqa: E402
from multimodal_mamba.modeling.ops_selective_scan import selective_scan_chunked, selective_scan_ref  # noqa: E402

CONFIG = dict(vocab_size=1024, hidden_size=256, num_hidden_layers=4, state_size=16, expand=2, conv_kernel=4)


def build_models(seed: int):
    config = MambaConfig(**CONFIG)
    torch.manual_seed(seed)
    theirs = MambaForCausalLM(config).eval()
    ours = MambaCausalLM(config).eval()
    missing, unexpected = ours.load_state_dict(theirs.state_dict(), strict=False)
    missing = [k for k in missing if k != "lm_head.weight"]  # tied to the embeddings
    if missing or unexpected:
        raise RuntimeError(f"state_dict mismatch: missing {missing}, unexpected {unexpected}")
    return config, theirs, ours


def interleaved(fns: dict, repeats: int, warmup: int = 1):
    """Time each callable ``repeats`` times, alternating between them.

    Returns {name: [wall seconds, ...]} and {name: [CPU seconds of this thread, ...]} (the latter only means
    something with one thread: it leaves out the time other processes held the core).
    """
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    wall = {name: [] for name in fns}
    cpu = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start, start_cpu = time.perf_counter(), time.thread_time()
            fn()
            wall[name].append(time.perf_counter() - start)
            cpu[name].append(time.thread_time() - start_cpu)
    return wall, cpu


def ms(seconds):
    return f"{seconds * 1e3:.1f} ms"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--length", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-write", action="store_true", help="do not write benchmarks/results/cpu_prefill.md")
    args = parser.parse_args(argv)
    argv = sys.argv[1:] if argv is None else argv

    config, theirs, ours = build_models(args.seed)
    torch.manual_seed(args.seed + 1)
    input_ids = torch.randint(0, config.vocab_size, (1, args.length))
    default_threads = torch.get_num_threads()
    lines = []

    def emit(line=""):
        print(line, flush=True)
        lines.append(line)

    with torch.no_grad():
        ref_logits = theirs(input_ids, use_cache=False).logits
        our_logits = ours(input_ids, use_cache=False).logits
        backend = last_backend("selective_scan")
        max_abs = (ref_logits - our_logits).abs().max().item()
        scale = ref_logits.abs().max().item()
        if not max_abs <= 1e-3 * max(scale, 1.0):
            raise RuntimeError(f"logits disagree: max abs diff {max_abs:.3g} (max |logit| {scale:.3g})")

        # One layer's scan inputs, as the mixer passes them (time-major views), and a stand-in for the scan.
        captured = []
        real_scan = modeling_mamba_lm.selective_scan

        def capture(*a, **k):
            captured.append((a, k))
            return real_scan(*a, **k)

        def no_scan(x, *a, **k):
            return torch.empty_like(x)

        modeling_mamba_lm.selective_scan = capture
        ours(input_ids, use_cache=False)
        modeling_mamba_lm.selective_scan = real_scan
        scan_args, scan_kwargs = captured[0]
        scan_err = (selective_scan_chunked(*scan_args, **scan_kwargs)
                    - selective_scan_ref(*scan_args, **scan_kwargs)).abs().max().item()

        def ours_without_scan():
            modeling_mamba_lm.selective_scan = no_scan
            try:
                ours(input_ids, use_cache=False)
            finally:
                modeling_mamba_lm.selective_scan = real_scan

        results, cpu_results = {}, {}
        for threads in dict.fromkeys([default_threads, 1]):
            torch.set_num_threads(threads)
            runs = {
                "full": interleaved({
                    "transformers": lambda: theirs(input_ids, use_cache=False),
                    "ours": lambda: ours(input_ids, use_cache=False),
                }, args.repeats),
                "prefill": interleaved({
                    "transformers": lambda: theirs(input_ids, use_cache=True, logits_to_keep=1),
                    "ours": lambda: ours(input_ids, use_cache=True, logits_to_keep=1),
                }, args.repeats),
                "parts": interleaved({
                    "scan": lambda: selective_scan_chunked(*scan_args, **scan_kwargs),
                    "reference scan": lambda: selective_scan_ref(*scan_args, **scan_kwargs),
                    "ours without the scans": ours_without_scan,
                }, args.repeats),
            }
            results[threads] = {key: wall for key, (wall, _) in runs.items()}
            if threads == 1:
                cpu_results = {key: cpu for key, (_, cpu) in runs.items()}
        torch.set_num_threads(default_threads)

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    emit("# CPU prefill: MambaCausalLM (this package, PyTorch path) vs transformers MambaForCausalLM")
    emit()
    command = "python benchmarks/bench_cpu_prefill.py" + "".join(" " + a for a in argv)
    emit(f"Command: `{command}` (from the repository root)")
    emit()
    emit(
        f"Machine: {platform.machine()}, {os.cpu_count()} CPUs (1-minute load average {load:.1f} at the end), "
        f"torch {torch.__version__}, transformers {transformers.__version__}, Python {platform.python_version()}."
    )
    emit(
        f"Model: MambaConfig({', '.join(f'{k}={v}' for k, v in CONFIG.items())}), float32, seed {args.seed}; batch 1, "
        f"prompt of {args.length} tokens; our scan backend: `{backend}`; logits max abs diff {max_abs:.2g} "
        f"(max |logit| {scale:.3g})."
    )
    emit(f"Times: median of {args.repeats} runs after a warm-up, the two models interleaved run by run.")
    emit()
    emit("| threads | run | transformers | ours | speed-up |")
    emit("|---|---|---|---|---|")
    names = {"full": "full logits, `use_cache=False`", "prefill": "prefill, `use_cache=True, logits_to_keep=1`"}
    rows = [(str(threads), res) for threads, res in results.items()] + [("1, CPU time", cpu_results)]
    for threads, res in rows:
        for key, label in names.items():
            t_theirs = statistics.median(res[key]["transformers"])
            t_ours = statistics.median(res[key]["ours"])
            emit(f"| {threads} | {label} | {ms(t_theirs)} | {ms(t_ours)} | **{t_theirs / t_ours:.1f}x** |")
    emit()
    emit("(\"1, CPU time\": the same one-thread runs, timed by the CPU time of the thread, which leaves out the time "
         "other processes held the core; the other rows are wall-clock times.)")
    emit()
    dim = config.intermediate_size
    emit(
        f"Where our time goes (medians): one layer's selective scan (batch 1, dim {dim}, L {args.length}, "
        f"N {config.state_size}, with z and D, time-major input; max abs diff to the reference {scan_err:.1g}) and our "
        f"full-logits forward with the {config.num_hidden_layers} scans replaced by an empty tensor:"
    )
    emit()
    emit("| threads | scan (torch backend) | scan (sequential reference) | ours without the scans | "
         f"ours, full logits | = without scans + {config.num_hidden_layers} x scan |")
    emit("|---|---|---|---|---|---|")
    for threads, res in rows:
        parts = {k: statistics.median(v) for k, v in res["parts"].items()}
        full = statistics.median(res["full"]["ours"])
        estimate = parts["ours without the scans"] + config.num_hidden_layers * parts["scan"]
        emit(f"| {threads} | {ms(parts['scan'])} | {ms(parts['reference scan'])} | "
             f"{ms(parts['ours without the scans'])} | {ms(full)} | {ms(estimate)} |")
    emit()
    emit("All runs (ms):")
    emit()
    for threads, res in rows:
        for key, timings in res.items():
            for who, ts in timings.items():
                emit(f"- threads {threads}, {key}, {who}: " + ", ".join(f"{t * 1e3:.0f}" for t in ts))
    if not args.no_write:
        out = REPO_ROOT / "benchmarks" / "results" / "cpu_prefill.md"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text("\n".join(lines) + "\n")
        print(f"\nwritten to {out.relative_to(REPO_ROOT)}")


if __name__ == "__main__":
    main()
