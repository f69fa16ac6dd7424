"""CPU prefill: this package's ``MambaCausalLM`` (CPU path) against transformers' ``MambaForCausalLM``.

Both models hold the same random weights (transformers' state_dict loaded into ours). The script checks that their
logits agree, then times a prompt of ``--length`` tokens at batch 1 in the same process, the models interleaved run
by run (the machine is shared and noisy: compare ratios of medians, not absolute times):

- full logits: ``model(input_ids, use_cache=False)``;
- prefill: ``model(input_ids, use_cache=True, logits_to_keep=1)`` (what ``generate`` runs on the prompt).

Ours runs three ways: the default (``"auto"``: on CPU the selective scan and the causal conv run on the C++
kernels of backend ``"cpp"``, built on first use, everything else in eager PyTorch), the eager PyTorch path throughout
(backend ``"torch"``: the chunked scan), and the opt-in compiled path (backend ``"torch_compile"``: the scan and the
conv compiled by ``torch.compile``). One-off build times are reported separately, never inside the timed runs: the
C++ scan kernel's build in an empty cache directory, and for the compiled path the first call in a fresh inductor cache
(a temporary cache directory, so the number is the cold one) and the first call of a second process that finds that
cache on disk (what later runs of a program see).

Each is timed with torch's default number of threads and with one thread (OpenMP threads that wait for each other
suffer most when other processes share the cores); the one-thread runs are also reported in CPU time of the thread,
which leaves out the time other processes held the core. It also times one layer's selective scan alone (time-major
input, as the mixer passes it) on each backend and the sequential reference, and the rest of our eager forward with the
scan replaced by an empty tensor, to show where the time goes. Results go to ``benchmarks/results/cpu_prefill.md``.

    python benchmarks/bench_cpu_prefill.py [--length 2048] [--repeats 7] [--no-compiled] [--no-write]
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

if __name__ == "__main__" and "--compile-probe" not in sys.argv and "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
    # A fresh inductor cache, so that the compile time reported is the cold one (set before torch is imported).
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="bench_cpu_prefill_inductor_")

import torch  # noqa: E402
import transformers  # noqa: E402
from transformers import MambaConfig, MambaForCausalLM  # noqa: E402

import multimodal_mamba.modeling.modeling_mamba_lm as modeling_mamba_lm  # noqa: E402
from multimodal_mamba import MambaCausalLM, last_backend, ssm_backend  # noqa: E402
from multimodal_mamba.kernels import cpu as cpp_kernels  # noqa: E402
from multimodal_mamba.kernels.cpu import selective_scan_cpp  # noqa: E402
from multimodal_mamba.modeling.ops_selective_scan import selective_scan_chunked, selective_scan_ref  # noqa: E402
from multimodal_mamba.modeling.ops_selective_scan_compiled import selective_scan_compiled  # noqa: E402

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
    """Time each callable ``repeats`` times, alternating between them, the garbage collected before each call.

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
            # Collected before each call, so that no call pays for garbage the calls before it left; collections that
            # a call's own allocations trigger stay in its time (a cost its users see: transformers' loop over tokens
            # creates many Python objects; with the collector off inside the calls, as timeit runs, its prefill took
            # ~8 % less and ours ~1 %).
            gc.collect()
            start, start_cpu = time.perf_counter(), time.thread_time()
            fn()
            wall[name].append(time.perf_counter() - start)
            cpu[name].append(time.thread_time() - start_cpu)
    return wall, cpu


def ms(seconds):
    return f"{seconds * 1e3:.1f} ms"


def compile_probe(length: int, seed: int) -> None:
    """Run in a second process: the first compiled forward with the inductor cache the main process left on disk."""
    config, _, ours = build_models(seed)
    input_ids = torch.randint(0, config.vocab_size, (1, length))
    with torch.no_grad(), ssm_backend("torch_compile"):
        start = time.perf_counter()
        ours(input_ids, use_cache=False)
        first = time.perf_counter() - start
    print(f"FIRST_CALL {first:.3f} {last_backend('selective_scan')}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--length", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-compiled", action="store_true", help="skip the torch_compile backend")
    parser.add_argument("--no-write", action="store_true", help="do not write benchmarks/results/cpu_prefill.md")
    parser.add_argument("--compile-probe", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    argv = sys.argv[1:] if argv is None else argv
    if args.compile_probe:
        return compile_probe(args.length, args.seed)
    compiled = not args.no_compiled

    # The C++ kernel's build, timed in an empty cache directory (the default cache is left as it is).
    build_times = {}
    with tempfile.TemporaryDirectory(prefix="bench_cpu_prefill_cpp_") as cpp_cache:
        previous = os.environ.get("MULTIMODAL_MAMBA_CACHE")
        os.environ["MULTIMODAL_MAMBA_CACHE"] = cpp_cache
        start = time.perf_counter()
        cpp_ok = cpp_kernels.available()
        build_times["C++ scan kernel, empty cache"] = time.perf_counter() - start
        if previous is None:
            del os.environ["MULTIMODAL_MAMBA_CACHE"]
        else:
            os.environ["MULTIMODAL_MAMBA_CACHE"] = previous
    if not cpp_ok:
        raise RuntimeError("the C++ scan kernel did not build here (see the warning above)")

    config, theirs, ours = build_models(args.seed)
    torch.manual_seed(args.seed + 1)
    input_ids = torch.randint(0, config.vocab_size, (1, args.length))
    default_threads = torch.get_num_threads()
    lines = []

    def emit(line=""):
        print(line, flush=True)
        lines.append(line)

    def ours_on(backend):
        def run(**kwargs):
            with ssm_backend(backend):
                return ours(input_ids, **kwargs)
        return run

    variants = {"ours": ours_on("auto"), "ours, torch": ours_on("torch")}
    if compiled:
        variants["ours, torch_compile"] = ours_on("torch_compile")

    with torch.no_grad():
        ref_logits = theirs(input_ids, use_cache=False).logits
        checks, ran = {}, {}
        for name, run in variants.items():
            start = time.perf_counter()
            checks[name] = run(use_cache=False).logits
            ran[name] = last_backend("selective_scan")
            if name == "ours, torch_compile":
                build_times["torch_compile: first full-logits call, cold inductor cache"] = time.perf_counter() - start
                start = time.perf_counter()
                run(use_cache=True, logits_to_keep=1)
                build_times["torch_compile: first prefill call after it"] = time.perf_counter() - start
        expected = {"ours": "cpp", "ours, torch": "torch", "ours, torch_compile": "torch_compile"}
        for name, backend in ran.items():
            if backend != expected[name]:
                raise RuntimeError(f"{name}: the scan ran on {backend!r}, not {expected[name]!r}")
        scale = ref_logits.abs().max().item()
        diffs = {name: (ref_logits - logits).abs().max().item() for name, logits in checks.items()}
        for name, max_abs in diffs.items():
            if not max_abs <= 1e-3 * max(scale, 1.0):
                raise RuntimeError(f"{name} logits disagree: max abs diff {max_abs:.3g} (max |logit| {scale:.3g})")

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
        scans = {
            "scan, cpp": lambda: selective_scan_cpp(*scan_args, **scan_kwargs),
            "scan, torch": lambda: selective_scan_chunked(*scan_args, **scan_kwargs),
        }
        if compiled:
            scans["scan, torch_compile"] = lambda: selective_scan_compiled(*scan_args, **scan_kwargs)
        scan_ref = selective_scan_ref(*scan_args, **scan_kwargs)
        scan_err = {name.split(", ")[1]: (fn() - scan_ref).abs().max().item() for name, fn in scans.items()}

        def ours_without_scan():
            modeling_mamba_lm.selective_scan = no_scan
            try:
                ours(input_ids, use_cache=False)
            finally:
                modeling_mamba_lm.selective_scan = real_scan

        results, cpu_results = {}, {}
        for threads in dict.fromkeys([default_threads, 1]):
            torch.set_num_threads(threads)
            runs = {}
            for key, kwargs in (("full", dict(use_cache=False)), ("prefill", dict(use_cache=True, logits_to_keep=1))):
                fns = {"transformers": lambda kw=kwargs: theirs(input_ids, **kw)}
                fns.update({name: (lambda kw=kwargs, run=run: run(**kw)) for name, run in variants.items()})
                runs[key] = interleaved(fns, args.repeats)
            parts = {**scans, "reference scan": lambda: selective_scan_ref(*scan_args, **scan_kwargs),
                     "ours without the scans": ours_without_scan}
            runs["parts"] = interleaved(parts, args.repeats)
            results[threads] = {key: wall for key, (wall, _) in runs.items()}
            if threads == 1:
                cpu_results = {key: cpu for key, (_, cpu) in runs.items()}
        torch.set_num_threads(default_threads)

    if compiled:  # a second process, with the inductor cache this one left on disk
        probe = subprocess.run(
            [sys.executable, str(Path(__file__).resolve()), "--compile-probe", "--length", str(args.length),
             "--seed", str(args.seed)],
            capture_output=True, text=True, env=dict(os.environ), cwd=str(REPO_ROOT),
        )
        found = [line.split() for line in probe.stdout.splitlines() if line.startswith("FIRST_CALL")]
        if found and found[0][2] == "torch_compile":
            build_times["torch_compile: first call of a second process, warm inductor cache"] = float(found[0][1])

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    emit("# CPU prefill: MambaCausalLM (this package, CPU path) vs transformers MambaForCausalLM")
    emit()
    command = "python benchmarks/bench_cpu_prefill.py" + "".join(" " + a for a in argv)
    emit(f"Command: `{command}` (from the repository root)")
    emit()
    emit(
        f"Machine: {platform.machine()}, {os.cpu_count()} CPUs (1-minute load average {load:.2f} at the end), "
        f"torch {torch.__version__}, transformers {transformers.__version__}, Python {platform.python_version()}; "
        f"C++ scan kernel: {cpp_kernels.lanes()} float32 lanes per vector."
    )
    emit(
        f"Model: MambaConfig({', '.join(f'{k}={v}' for k, v in CONFIG.items())}), float32, seed {args.seed}; batch 1, "
        f"prompt of {args.length} tokens. Ours: the default (backend \"auto\": the scan and the conv on `cpp`, the "
        "rest eager PyTorch), the eager PyTorch path throughout (backend `torch`)"
        + (" and the opt-in compiled path (backend `torch_compile`)" if compiled else "")
        + "; logits max abs diff to transformers: "
        + ", ".join(f"{name} {diff:.2g}" for name, diff in diffs.items()) + f" (max |logit| {scale:.3g})."
    )
    emit(f"Times: median of {args.repeats} runs after a warm-up, the models interleaved run by run.")
    emit()
    names = {"full": "full logits, `use_cache=False`", "prefill": "prefill, `use_cache=True, logits_to_keep=1`"}
    columns = {"ours": "ours, default (`cpp` scan + conv)", "ours, torch": "ours, eager `torch`"}
    if compiled:
        columns["ours, torch_compile"] = "ours, `torch_compile`"
    rows = [(str(threads), res) for threads, res in results.items()] + [("1, CPU time", cpu_results)]
    emit("| threads | run | transformers | " + " | ".join(f"{label} | speed-up" for label in columns.values()) + " |")
    emit("|---|---|---|" + "---|---|" * len(columns))
    for threads, res in rows:
        for key, label in names.items():
            t_theirs = statistics.median(res[key]["transformers"])
            row = f"| {threads} | {label} | {ms(t_theirs)} |"
            for name in columns:
                t_ours = statistics.median(res[key][name])
                row += f" {ms(t_ours)} | **{t_theirs / t_ours:.1f}x** |"
            emit(row)
    emit()
    emit("(\"1, CPU time\": the same one-thread runs, timed by the CPU time of the thread, which leaves out the time "
         "other processes held the core; the other rows are wall-clock times.)")
    emit()
    emit("One-off build / compile times (not in the times above): "
         + "; ".join(f"{name}: {seconds:.1f} s" for name, seconds in build_times.items()) + ".")
    emit()
    dim = config.intermediate_size
    emit(
        f"Where our time goes (medians): one layer's selective scan (batch 1, dim {dim}, L {args.length}, "
        f"N {config.state_size}, with z and D, time-major input; max abs diff to the reference "
        + ", ".join(f"{name} {err:.1g}" for name, err in scan_err.items())
        + f") and our eager full-logits forward with the {config.num_hidden_layers} scans replaced by an empty tensor:"
    )
    emit()
    layers = config.num_hidden_layers
    header = ("| threads | " + " | ".join(scans) + " | scan, sequential reference | ours without the scans | "
              f"ours, default full logits | = without scans + {layers} x cpp scan |")
    emit(header)
    emit("|" + "---|" * (header.count("|") - 1))
    for threads, res in rows:
        parts = {k: statistics.median(v) for k, v in res["parts"].items()}
        full = statistics.median(res["full"]["ours"])
        estimate = parts["ours without the scans"] + layers * parts["scan, cpp"]
        row = f"| {threads} | " + " | ".join(ms(parts[name]) for name in scans) + " |"
        row += f" {ms(parts['reference scan'])} | {ms(parts['ours without the scans'])} | {ms(full)} | {ms(estimate)} |"
        emit(row)
    emit()
    emit("All runs (ms):")
    emit()
    for threads, res in rows:
        for key, timings in res.items():
            for who, ts in timings.items():
                emit(f"- threads {threads}, {key}, {who}: " + ", ".join(f"{t * 1e3:.0f}" for t in ts))
    cache = os.environ.get("TORCHINDUCTOR_CACHE_DIR", "")
    if os.path.basename(cache).startswith("bench_cpu_prefill_inductor_"):
        shutil.rmtree(cache, ignore_errors=True)
    if not args.no_write:
        out = REPO_ROOT / "benchmarks" / "results" / "cpu_prefill.md"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text("\n".join(lines) + "\n")
        print(f"\nwritten to {out.relative_to(REPO_ROOT)}")


if __name__ == "__main__":
    main()
