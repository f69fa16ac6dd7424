"""generate() on the GPU: this package (CUDA-graph decode) vs transformers' MambaForCausalLM vs mamba-ssm, one run.

Model: a Mamba-1 LM of mamba-2.8b's shape (d_model 2560, 64 layers, d_state 16, expand 2, vocab 50280), random
weights in bf16 (../shared/anchors/README.md). The same weights go into all three systems:

- ours: ``MambaCausalLM`` + ``model.generate()`` (prefill on the fused path, decode replayed from a CUDA graph per
  batch-size bucket), and the same with ``decode_cuda_graph=False`` (eager decode);
- transformers: ``MambaForCausalLM`` + ``generate()`` (its fused kernels when mamba-ssm / causal-conv1d import);
- mamba-ssm: ``MambaLMHeadModel.generate(cg=True)`` (its CUDA-graph decode) when mamba-ssm imports.

Decode = ``generate`` of 128 new tokens (greedy, no early stop) after a 16-token prompt, divided by 128 (the anchors'
definition; it includes the prompt's prefill: ours replays it from a CUDA graph once the prompt's shape has been seen
twice, as in the timed calls; ``ours_cuda_graph_eager_prefill`` is the same with ``config.prefill_cuda_graph = False``). Prefill = one forward over L tokens at batch 1 (full logits, as the
anchors) and, for ours, what generate runs on a prompt (``use_cache=True, logits_to_keep=1``). Goals (issue 7):
decode <= 2.5 ms/token at batch 1, <= 3.0 ms/step at batch 16, prefill L 2048 <= 45 ms.

``--vl`` adds the end-to-end VL-Mamba: a SigLIP-SO400M-shaped tower (384 px, patch 14: 729 image tokens), the
VSS-L2 connector and the same LM; image + question -> 128 new tokens; latency and tokens/s at batch 1 and 16.
``--profile`` prints the top CUDA kernels of our prefill and of one eager decode step.

    python benchmarks/bench_gpu_generate.py [--out DIR] [--vl] [--profile] [--skip-transformers]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
# --package-root DIR: import multimodal_mamba from another checkout (a copy of an earlier commit: before / after in
# one command, with the same anchors)
_ROOT_ARG = next((sys.argv[i + 1] for i, a in enumerate(sys.argv[:-1]) if a == "--package-root"), None)
PACKAGE_ROOT = Path(_ROOT_ARG).resolve() if _ROOT_ARG else REPO_ROOT
if str(PACKAGE_ROOT) not in sys.path:
    sys.path.insert(0, str(PACKAGE_ROOT))

import torch  # noqa: E402
import transformers  # noqa: E402
from transformers import MambaConfig  # noqa: E402

from multimodal_mamba import MambaCausalLM, last_backend  # noqa: E402

SHAPE = dict(vocab_size=50280, hidden_size=2560, num_hidden_layers=64, state_size=16, expand=2, conv_kernel=4)
PROMPT, NEW = 16, 128
PREFILL_REPEATS = 7  # median of 7 forwards per system and length (batch-1 prefill times vary by a few ms)
RESULTS = {}


def median_time(fn, repeats=3, warmup=1):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def json_recorder(results: dict, filename: str):
    """``record(key, value, out)``: stores value under key in ``results``, prints it as a JSON line and rewrites
    ``out / filename`` with all of ``results`` (so a run cut short keeps what it measured)."""

    def record(key, value, out):
        results[key] = value
        print(json.dumps({key: value}), flush=True)
        (out / filename).write_text(json.dumps(results, indent=1))

    return record


record = json_recorder(RESULTS, "generate_results.json")


def apply_settings(module, base: dict, setting: dict):
    """Sets ``module``'s attributes (a kernel module's configuration constants) to ``base`` updated by ``setting``,
    JSON lists back to tuples."""
    for name, value in {**base, **setting}.items():
        setattr(module, name, tuple(value) if isinstance(value, list) else value)


def ours_generate(model, ids, graph=True, new=NEW):
    return model.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False, decode_cuda_graph=graph)


def graph_step_ms(model, batch):
    """GPU time (ms) of one decode step at ``batch`` rows: 50 back-to-back replays of the captured graph of the
    first bucket that holds them (median of 3)."""
    bucket = next(b for b in model.decode_graphs._buckets.values()
                  if b.graph is not None and b.input_ids.shape[0] >= batch)
    return median_time(lambda: [bucket.graph.replay() for _ in range(50)], repeats=3) / 50 * 1e3


def alternating_generate_ms(model, ids, settings: dict, apply, rounds=2, batches=(16, 1)):
    """generate() ms per new token under each named setting (``apply(setting)`` before its calls), the settings
    alternating ``rounds`` times, at each batch size (``ids[:batch]``): graphs captured afresh, a warm-up call, the
    median of 3. Returns {"b<batch>/<name>": [ms, ...]}."""
    times = {f"b{batch}/{name}": [] for batch in batches for name in settings}
    for _ in range(rounds):
        for name, setting in settings.items():
            apply(setting)
            for batch in batches:
                model.decode_graphs.clear()
                ours_generate(model, ids[:batch], True, 8)
                seconds = median_time(lambda: ours_generate(model, ids[:batch], True), repeats=3, warmup=1)
                times[f"b{batch}/{name}"].append(round(seconds / NEW * 1e3, 3))
    return times


def fresh_graph_step_ms(model, ids, batch=16):
    """The decode step's GPU time (ms) at ``batch`` rows with the kernels' current settings: the graphs captured
    afresh by a short generate on ``ids[:batch]``, then ``graph_step_ms`` (rounded to 0.1 us)."""
    model.decode_graphs.clear()
    ours_generate(model, ids[:batch], True, 4)
    return round(graph_step_ms(model, batch), 4)


def decode_bench_setup(default_out=REPO_ROOT / "benchmarks" / "results"):
    """The decode benchmarks' command line (``--out``) and models: ours and mamba-ssm where it imports, without
    transformers. Returns (args, systems)."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, default=default_out)
    args = parser.parse_args()
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
    args.skip_transformers = True
    _, systems = build_models(args)
    return args, systems


def profile_top(fn, label, out, rows=25):
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=rows, max_name_column_width=70)
    print(f"--- profile: {label}\n{table}", flush=True)
    (out / f"profile_{label}.txt").write_text(table)


def build_models(args):
    config = MambaConfig(**SHAPE)
    torch.manual_seed(0)
    with torch.device("cuda"):
        ours = MambaCausalLM(config).to(torch.bfloat16).eval()
    ours.generation_config.pad_token_id = 0
    ours.generation_config.eos_token_id = None
    systems = {"ours": ours}
    if not args.skip_transformers:
        from transformers import MambaForCausalLM

        with torch.device("cuda"):
            theirs = MambaForCausalLM(config).to(torch.bfloat16).eval()
        theirs.load_state_dict(ours.state_dict(), strict=False)
        theirs.generation_config.pad_token_id = 0
        theirs.generation_config.eos_token_id = None
        systems["transformers"] = theirs
    try:
        from mamba_ssm.models.config_mamba import MambaConfig as SSMConfig
        from mamba_ssm.models.mixer_seq_simple import MambaLMHeadModel

        ssm_config = SSMConfig(d_model=2560, n_layer=64, vocab_size=50280, ssm_cfg={"layer": "Mamba1"}, rms_norm=True,
                               residual_in_fp32=True, fused_add_norm=True, pad_vocab_size_multiple=8)
        ssm = MambaLMHeadModel(ssm_config, device="cuda", dtype=torch.bfloat16).eval()
        state = {k.replace("backbone.embeddings.", "backbone.embedding."): v for k, v in ours.state_dict().items()}
        missing, unexpected = ssm.load_state_dict(state, strict=False)
        print("mamba-ssm weights: missing", missing, "unexpected", unexpected, flush=True)
        systems["mamba_ssm"] = ssm
    except Exception as error:  # pragma: no cover - depends on the machine
        print("mamba-ssm unavailable:", repr(error)[:200], flush=True)
    return config, systems


def bench_lm(args, out):
    config, systems = build_models(args)
    ours = systems["ours"]
    with torch.no_grad():
        # correctness first: greedy tokens, graph vs eager (identical) and vs the others (bf16: agree for a while)
        ids = torch.randint(0, 50000, (1, PROMPT), device="cuda")
        graphed, eager = ours_generate(ours, ids, True, 32), ours_generate(ours, ids, False, 32)
        record("ours_graph_equals_eager_32_tokens", bool(torch.equal(graphed, eager)), out)
        if "transformers" in systems:
            theirs = systems["transformers"].generate(ids, max_new_tokens=32, min_new_tokens=32, do_sample=False)
            record("tokens_agreeing_with_transformers", int((theirs[0] == graphed[0]).cumprod(0).sum()) - PROMPT, out)
        if "mamba_ssm" in systems:
            ssm_out = systems["mamba_ssm"].generate(input_ids=ids, max_length=PROMPT + 32, cg=True, top_k=1)
            record("tokens_agreeing_with_mamba_ssm", int((ssm_out[0] == graphed[0]).cumprod(0).sum()) - PROMPT, out)

        warm = torch.randint(0, 50000, (1, 2048), device="cuda")
        for _ in range(5):  # clocks up, kernels compiled, before the first timed length
            ours(warm, use_cache=False)
        torch.cuda.synchronize()
        for length in args.lengths:
            x = torch.randint(0, 50000, (1, length), device="cuda")
            rep = PREFILL_REPEATS
            record(f"prefill_L{length}_ms/ours_full_logits",
                   round(median_time(lambda: ours(x, use_cache=False), repeats=rep) * 1e3, 2), out)
            record(f"prefill_L{length}_ms/ours_generate_prefill",
                   round(median_time(lambda: ours(x, use_cache=True, logits_to_keep=1), repeats=rep) * 1e3, 2), out)
            record(f"prefill_L{length}_backend", last_backend("selective_scan"), out)
            if "transformers" in systems and length <= 2048:
                m = systems["transformers"]
                record(f"prefill_L{length}_ms/transformers",
                       round(median_time(lambda: m(x, use_cache=False), repeats=rep) * 1e3, 2), out)
            if "mamba_ssm" in systems:
                m = systems["mamba_ssm"]
                record(f"prefill_L{length}_ms/mamba_ssm", round(median_time(lambda: m(x), repeats=rep) * 1e3, 2), out)
        if args.prefill_only:
            return

        for batch in (1, 16):
            ids = torch.randint(0, 50000, (batch, PROMPT), device="cuda")
            # two warm-up calls: the first sees this prompt shape, the second captures its prefill graph (a shape is
            # captured when seen again); the timed calls replay it, as every later call of a server would
            t = median_time(lambda: ours_generate(ours, ids, True), repeats=5, warmup=2)
            record(f"decode_b{batch}_ms_per_step/ours_cuda_graph", round(t / NEW * 1e3, 3), out)
            # the same with the prompt's prefill run eagerly (ours_cuda_graph replays the prefill from its CUDA graph)
            ours.config.prefill_cuda_graph = False
            t = median_time(lambda: ours_generate(ours, ids, True), repeats=3)
            ours.config.prefill_cuda_graph = True
            record(f"decode_b{batch}_ms_per_step/ours_cuda_graph_eager_prefill", round(t / NEW * 1e3, 3), out)
            t = median_time(lambda: ours_generate(ours, ids, False), repeats=1)
            record(f"decode_b{batch}_ms_per_step/ours_eager", round(t / NEW * 1e3, 3), out)
            if "mamba_ssm" in systems:
                m = systems["mamba_ssm"]
                t = median_time(lambda: m.generate(input_ids=ids, max_length=PROMPT + NEW, cg=True, top_k=1), repeats=3)
                record(f"decode_b{batch}_ms_per_step/mamba_ssm_cg", round(t / NEW * 1e3, 3), out)
            if "transformers" in systems:
                m = systems["transformers"]
                new = NEW if batch == 1 else 64
                t = median_time(lambda: m.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False),
                                repeats=1)
                record(f"decode_b{batch}_ms_per_step/transformers", round(t / new * 1e3, 3), out)
        record("decode_backend", last_backend("selective_state_update"), out)

        # Where a decode step's time goes: graph replays back to back (GPU time per step), and the same steps with
        # a host sync after each (what transformers' generate loop does).
        for batch in (1, 16):
            ids = torch.randint(0, 50000, (batch, PROMPT), device="cuda")
            cache = ours._graph_generation_cache(batch, ids.device)
            ours(ids, cache_params=cache, use_cache=True)
            step = ids[:, -1:]
            ours(step, cache_params=cache, use_cache=True)  # captures
            torch.cuda.synchronize()
            start = time.perf_counter()
            for _ in range(NEW):
                ours(step, cache_params=cache, use_cache=True)
            torch.cuda.synchronize()
            record(f"decode_b{batch}_ms_per_step/graph_replays_back_to_back", round((time.perf_counter() - start) / NEW * 1e3, 3), out)
            start = time.perf_counter()
            for _ in range(NEW):
                logits = ours(step, cache_params=cache, use_cache=True).logits
                step = logits[:, -1].argmax(-1, keepdim=True)
                torch.cuda.synchronize()
            record(f"decode_b{batch}_ms_per_step/graph_replay_argmax_sync", round((time.perf_counter() - start) / NEW * 1e3, 3), out)

        if args.profile:
            x = torch.randint(0, 50000, (1, 2048), device="cuda")
            profile_top(lambda: ours(x, use_cache=True, logits_to_keep=1), "ours_prefill_2048", out)
            import cProfile
            import io
            import pstats

            profiler = cProfile.Profile()
            profiler.enable()
            for _ in range(3):
                ours(x, use_cache=True, logits_to_keep=1)
            torch.cuda.synchronize()
            profiler.disable()
            text = io.StringIO()
            pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(30)
            (out / "cprofile_ours_prefill_2048.txt").write_text(text.getvalue())
            print(text.getvalue()[:6000], flush=True)
            ids = torch.randint(0, 50000, (1, PROMPT), device="cuda")
            cache = ours.allocate_cache(1)
            ours(ids, cache_params=cache, use_cache=True)
            step = ids[:, -1:]
            profile_top(lambda: ours(step, cache_params=cache, use_cache=True), "ours_eager_decode_step", out, rows=30)
    del systems
    torch.cuda.empty_cache()


def bench_vl(args, out):
    from transformers import SiglipVisionConfig

    from multimodal_mamba import VLMambaConfig, VLMambaForConditionalGeneration

    vision = SiglipVisionConfig(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
                                image_size=384, patch_size=14)
    config = VLMambaConfig(vision_config=vision, text_config=MambaConfig(**SHAPE), projector_type="vss_l2",
                           scan_type="bidirectional", image_token_id=50279)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = VLMambaForConditionalGeneration(config).to(torch.bfloat16).eval()
    model.generation_config.pad_token_id = 0
    model.generation_config.eos_token_id = None
    image_tokens = config.image_seq_length
    record("vl_image_tokens", image_tokens, out)
    with torch.no_grad():
        for batch in (1, 16):
            question = torch.randint(0, 50000, (batch, 24), device="cuda")
            ids = torch.cat([torch.full((batch, image_tokens), 50279, device="cuda"), question], dim=1)
            pixels = torch.randn(batch, 3, 384, 384, device="cuda", dtype=torch.bfloat16)

            def run(graph=True):
                return model.generate(input_ids=ids, pixel_values=pixels, max_new_tokens=NEW, min_new_tokens=NEW,
                                      do_sample=False, decode_cuda_graph=graph)

            if batch == 1:
                record("vl_graph_equals_eager", bool(torch.equal(run(True), run(False))), out)
                t = median_time(lambda: run(False), repeats=1)
                record("vl_b1_eager_latency_s", round(t, 4), out)
            t = median_time(run, repeats=3)
            record(f"vl_b{batch}_latency_s", round(t, 4), out)
            record(f"vl_b{batch}_new_tokens_per_s", round(batch * NEW / t, 1), out)
            t_prefill = median_time(lambda: model(input_ids=ids, pixel_values=pixels, use_cache=True, logits_to_keep=1))
            record(f"vl_b{batch}_prefill_s", round(t_prefill, 4), out)


def write_markdown(out):
    """benchmarks/results-style summary of RESULTS (ratios against the anchors re-run in the same command)."""
    r = RESULTS
    lines = ["# generate() on the GPU: CUDA-graph decode vs transformers and mamba-ssm (mamba-2.8b shape, bf16)", "",
             f"Device: {torch.cuda.get_device_name()}; torch {torch.__version__}, transformers {transformers.__version__}."
             " Same random weights in all three systems. Command: `python benchmarks/bench_gpu_generate.py --vl`.", "",
             "| measure | ours | transformers | mamba-ssm | ours / transformers | ours / mamba-ssm | goal |",
             "|---|---|---|---|---|---|---|"]

    def row(label, ours_key, theirs_key, ssm_key, goal):
        ours, theirs, ssm = r.get(ours_key), r.get(theirs_key), r.get(ssm_key)
        fmt = lambda v: "-" if v is None else f"{v:g}"  # noqa: E731
        ratio = lambda a, b: "-" if a is None or b is None else f"{a / b:.3f}"  # noqa: E731
        lines.append(f"| {label} | {fmt(ours)} | {fmt(theirs)} | {fmt(ssm)} | {ratio(ours, theirs)} | "
                     f"{ratio(ours, ssm)} | {goal} |")

    for batch, goal in ((1, "<= 2.5"), (16, "<= 3.0")):
        row(f"decode batch {batch}, ms/step (generate, 128 new tokens)", f"decode_b{batch}_ms_per_step/ours_cuda_graph",
            f"decode_b{batch}_ms_per_step/transformers", f"decode_b{batch}_ms_per_step/mamba_ssm_cg", goal)
    for length in (512, 2048, 8192):
        goal = "<= 45" if length == 2048 else ""
        row(f"prefill L {length}, ms (full logits)", f"prefill_L{length}_ms/ours_full_logits",
            f"prefill_L{length}_ms/transformers", f"prefill_L{length}_ms/mamba_ssm", goal)
    lines += ["", "Ours, in more detail (ms unless stated):", ""]
    lines += [f"- `{k}`: {v}" for k, v in r.items()]
    (out / "gpu_generate.md").write_text("\n".join(lines) + "\n")


def write_plot(out):
    """gpu_generate.png: decode ms/step and prefill ms of the three systems (log scale)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot", flush=True)
        return
    systems = (("ours_cuda_graph", "ours (CUDA-graph decode)"), ("transformers", "transformers"),
               ("mamba_ssm_cg", "mamba-ssm cg=True"))
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    width = 0.27
    for k, (key, label) in enumerate(systems):
        values = [RESULTS.get(f"decode_b{b}_ms_per_step/{key}") for b in (1, 16)]
        left.bar([i + (k - 1) * width for i in range(2)], [v or 0 for v in values], width, label=label)
    left.axhline(2.5, color="gray", ls="--", lw=1)
    left.set_xticks(range(2), ["batch 1", "batch 16"])
    left.set_yscale("log")
    left.set_ylabel("ms per decode step (generate, 128 tokens)")
    left.legend()
    lengths = [L for L in (512, 2048, 8192) if f"prefill_L{L}_ms/ours_full_logits" in RESULTS]
    for k, (key, label) in enumerate((("ours_full_logits", "ours"), ("transformers", "transformers"),
                                      ("mamba_ssm", "mamba-ssm"))):
        values = [RESULTS.get(f"prefill_L{L}_ms/{key}") for L in lengths]
        right.bar([i + (k - 1) * width for i in range(len(lengths))], [v or 0 for v in values], width, label=label)
    right.set_xticks(range(len(lengths)), [f"L {L}" for L in lengths])
    right.set_ylabel("prefill ms (batch 1)")
    right.legend()
    fig.suptitle("mamba-2.8b shape, bf16, one H200")
    fig.tight_layout()
    fig.savefig(out / "gpu_generate.png", dpi=110)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "benchmarks" / "results")
    parser.add_argument("--lengths", type=int, nargs="+", default=[512, 2048, 8192])
    parser.add_argument("--vl", action="store_true")
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--skip-transformers", action="store_true")
    parser.add_argument("--only-vl", action="store_true")
    parser.add_argument("--prefill-only", action="store_true", help="the LM's prefill times only (no decode, no VL)")
    parser.add_argument("--package-root", type=Path, default=None,
                        help="import multimodal_mamba from this checkout instead of this script's")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    print(torch.cuda.get_device_name(), torch.__version__, transformers.__version__, "package from", PACKAGE_ROOT,
          flush=True)
    if not args.only_vl:
        bench_lm(args, args.out)
    if args.vl or args.only_vl:
        bench_vl(args, args.out)
    write_markdown(args.out)
    write_plot(args.out)


if __name__ == "__main__":
    main()
