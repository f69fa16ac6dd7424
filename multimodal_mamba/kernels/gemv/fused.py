"""Triton GEMV for one-row projections (a decode step at batch 1), with a dispatch that measures itself.

At batch 1 a Mamba decode step is a chain of matrix-vector products that only have to read each weight once. Measured
inside CUDA graphs on an H200 (``benchmarks/results/gpu_gemv.md``, mamba-2.8b shapes, bf16): cuBLAS reads in_proj at
86% of the copy bandwidth, but takes 6.0 us for x_proj (5120 -> 192, 2 MB), 2.8 us for dt_proj (160 -> 5120) and
8.8 us for out_proj (5120 -> 2560), where the Triton kernel below takes 3.1, 1.8 and 5.4 us: 0.47 ms less per
64-layer step (2.12 -> 1.66 ms of projections; the weight-read floor is 1.33 ms).

``gemv_triton``: each program owns ``BLOCK_N`` output features and reads their rows of the weight in ``BLOCK_K``
tiles, float32 products accumulated in a (BLOCK_N, BLOCK_K) register tile and summed once at the end; with
``SPLIT_K > 1`` the K range is cut into that many programs per output block, whose partial sums (float32) are added
by a second, tiny launch in a fixed order (no atomics: the result does not depend on scheduling, so a decode step
replayed from a CUDA graph gives the same tokens as the eager one).

On sm_90+ the kernel is launched with programmatic dependent launch (kernels/utils ``pdl_available``): it loads its
first weight tile before waiting for the kernel that writes x.

``linear_one_row``: which implementation is fastest depends on the shape and the GPU, so the first call for a
(device, N, K, dtype, bias) outside CUDA-graph capture times cuBLAS (``F.linear``) and a few kernel configurations
(their GPU time, replayed from a small CUDA graph, as a decode step runs them) and keeps the fastest for the rest of
the process; cuBLAS is a candidate, so the choice is never slower than it inside a graph (up to timing noise). The
timed calls rotate over distinct copies of the weight, together several times the L2 cache, so each call reads its
weight from HBM as every layer of a decode step does (16 calls on one weight timed L2 hits instead: out_proj's 26 MB
stayed L2-resident and "read" at 1.16x the copy bandwidth, and configurations were ranked by L2 speed).
Outside a graph (``decode_cuda_graph=False``) each Triton call costs ~30-50 us of host time in Triton's launcher
against ~20 us for cuBLAS (``benchmarks/results/gpu_gemv.md``), so eager one-row decoding gets slower: the same
routes are used there so that eager and graph decoding give the same tokens. During capture, before a shape was
measured, it calls ``F.linear``.
"""

from __future__ import annotations

import itertools
import threading

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ..utils import gdc_launch_dependents, gdc_wait, interpret_mode, pdl_available


@triton.jit
def _gemv_kernel(x_ptr, w_ptr, bias_ptr, out_ptr, N, K, stride_w, stride_split,
                 BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, K_PER_SPLIT: tl.constexpr,
                 HAS_BIAS: tl.constexpr, DIRECT: tl.constexpr, PDL: tl.constexpr):
    """DIRECT (one split): out[n] = sum_k x[k] w[n, k] (+ bias[n]) in out's dtype. Else out[split, n] = the sum over
    this split's K range, float32, for ``_sum_splits_kernel``. PDL (launched with programmatic dependent launch): the
    first weight tile is loaded before waiting for the kernel that writes x (the same sums in the same order)."""
    pid_n = tl.program_id(0)
    split = tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    w_rows = w_ptr + rows.to(tl.int64)[:, None] * stride_w
    k_start = split * K_PER_SPLIT
    cols = k_start + tl.arange(0, BLOCK_K)
    col_ok = (cols < K) & (tl.arange(0, BLOCK_K) < K_PER_SPLIT)
    w = tl.load(w_rows + cols[None, :], mask=row_ok[:, None] & col_ok[None, :], other=0.0).to(tl.float32)
    if PDL:
        gdc_launch_dependents()
        gdc_wait()
    x = tl.load(x_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    acc = w * x[None, :]
    for k0 in range(BLOCK_K, K_PER_SPLIT, BLOCK_K):
        cols = k_start + k0 + tl.arange(0, BLOCK_K)
        col_ok = (cols < K) & (k0 + tl.arange(0, BLOCK_K) < K_PER_SPLIT)
        x = tl.load(x_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
        w = tl.load(w_rows + cols[None, :], mask=row_ok[:, None] & col_ok[None, :], other=0.0).to(tl.float32)
        acc += w * x[None, :]
    total = tl.sum(acc, axis=1)
    if DIRECT:
        if HAS_BIAS:
            total += tl.load(bias_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
        tl.store(out_ptr + rows, total.to(out_ptr.dtype.element_ty), mask=row_ok)
    else:
        tl.store(out_ptr + split * stride_split + rows, total, mask=row_ok)


@triton.jit
def _sum_splits_kernel(part_ptr, bias_ptr, out_ptr, N, stride_split,
                       SPLITS: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr):
    """out[n] = sum_s part[s, n] (+ bias[n]), in split order, cast to out's dtype."""
    cols = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = cols < N
    total = tl.zeros((BLOCK,), dtype=tl.float32)
    for s in tl.static_range(SPLITS):
        total += tl.load(part_ptr + s * stride_split + cols, mask=ok, other=0.0)
    if HAS_BIAS:
        total += tl.load(bias_ptr + cols, mask=ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + cols, total.to(out_ptr.dtype.element_ty), mask=ok)


def gemv_triton(x: torch.Tensor, weight: torch.Tensor, bias=None, block_n: int = 8, block_k: int = 256,
                split_k: int = 1, num_warps: int = 4) -> torch.Tensor:
    """x (K,) or (1, ..., 1, K), weight (N, K) with unit stride along K, bias (N,) or None -> x's shape with N.

    Output dtype as ``F.linear`` gives for x's and weight's dtype (they must match, as for ``F.linear``).
    """
    n_out, k_in = weight.shape
    if x.shape[-1] != k_in or x.numel() != k_in:
        raise ValueError(f"gemv_triton: x must hold one row of {k_in} features, got shape {tuple(x.shape)}")
    if weight.stride(-1) != 1:
        raise ValueError("gemv_triton: the weight must be contiguous along its input features")
    if x.dtype != weight.dtype:
        raise ValueError(f"gemv_triton: x ({x.dtype}) and weight ({weight.dtype}) must have the same dtype")
    vector = x.reshape(k_in)
    if vector.stride(0) != 1:
        vector = vector.contiguous()
    out = torch.empty(n_out, device=x.device, dtype=x.dtype)
    k_per_split = triton.cdiv(triton.cdiv(k_in, split_k), block_k) * block_k
    splits = triton.cdiv(k_in, k_per_split)
    grid_n = triton.cdiv(n_out, block_n)
    bias_arg = bias if bias is not None else weight  # not read without HAS_BIAS
    pdl = pdl_available(x.device)
    launch = {"launch_pdl": True} if pdl else {}  # (see kernels/utils.pdl_available)
    if splits == 1:
        _gemv_kernel[(grid_n, 1)](vector, weight, bias_arg, out, n_out, k_in, weight.stride(0), 0,
                                  BLOCK_N=block_n, BLOCK_K=block_k, K_PER_SPLIT=k_per_split,
                                  HAS_BIAS=bias is not None, DIRECT=True, PDL=pdl, num_warps=num_warps, **launch)
        return out.reshape(*x.shape[:-1], n_out)
    partial = torch.empty(splits, n_out, device=x.device, dtype=torch.float32)
    _gemv_kernel[(grid_n, splits)](vector, weight, bias_arg, partial, n_out, k_in, weight.stride(0),
                                   partial.stride(0), BLOCK_N=block_n, BLOCK_K=block_k, K_PER_SPLIT=k_per_split,
                                   HAS_BIAS=False, DIRECT=False, PDL=pdl, num_warps=num_warps, **launch)
    block = min(1024, triton.next_power_of_2(n_out))
    _sum_splits_kernel[(triton.cdiv(n_out, block),)](
        partial, bias if bias is not None else partial, out, n_out, partial.stride(0),
        SPLITS=splits, HAS_BIAS=bias is not None, BLOCK=block, num_warps=4,
    )
    return out.reshape(*x.shape[:-1], n_out)


@triton.jit
def _rewrite_kernel(x_ptr, n, BLOCK: tl.constexpr, PDL: tl.constexpr):
    """x[:n] = x[:n], one program: the chooser's stand-in for the small kernel that writes a decode step's GEMV input
    (the norm before in_proj, the state update before out_proj)."""
    if PDL:
        gdc_launch_dependents()
        gdc_wait()
    offs = tl.arange(0, BLOCK)
    mask = offs < n
    tl.store(x_ptr + offs, tl.load(x_ptr + offs, mask=mask), mask=mask)


def _rewrite(x_row):
    """Launch ``_rewrite_kernel`` on x_row (K,) as the decode step's kernels are launched (PDL where available)."""
    pdl = pdl_available(x_row.device)
    _rewrite_kernel[(1,)](x_row, x_row.numel(), BLOCK=triton.next_power_of_2(x_row.numel()), PDL=pdl, num_warps=4,
                          **({"launch_pdl": True} if pdl else {}))


# Configurations tried per shape: (block_n, block_k, split_k, num_warps). Few enough to compile in seconds. The wide
# tiles (block_k 2048 - 8192) load a program's whole row range in 1 - 3 steps: more bytes in flight per SM, fewer
# latencies in a row, for the layer-sized weights (26 - 52 MB) that read at only 3.0 - 3.5 TB/s with block_k 1024
# against 4.06 for the LM head (benchmarks/results/gpu_decode_parts.md).
CANDIDATES = (
    (8, 256, 1, 4),
    (16, 256, 1, 8),
    (4, 512, 1, 4),
    (2, 1024, 1, 4),
    (4, 256, 4, 4),
    (8, 128, 8, 4),
    (1, 512, 8, 4),
    (32, 64, 1, 4),
    (2, 2048, 1, 4),
    (2, 4096, 1, 8),
    (4, 2048, 1, 8),
    (1, 4096, 1, 4),
    (1, 8192, 1, 8),
)
_choices = {}
_lock = threading.Lock()


def _time_ms(fn, repeats=25):
    fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(repeats):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / repeats


def _graph_time_ms(fn, calls=16, replays=5):
    """GPU time per call of ``calls`` back-to-back calls replayed from a CUDA graph: what a decode step costs inside
    its graph. (Timing eager calls would measure host launch overhead instead: the Triton launcher's is larger than
    cuBLAS's, and these kernels run for only a few microseconds.)"""
    fn()  # compile and warm up outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    ms = _time_ms(graph.replay, repeats=replays) / calls
    del graph
    return ms


# The chooser times each candidate over distinct copies of the weight, COLD_FACTOR L2 caches (H200: 50 MiB) of them in
# all, so that no copy is still cached when it is read again, as in a decode step (each layer reads its own weights
# once). At most MAX_COLD_COPIES tensors: weights so small that 64 copies fit in L2 are timed from L2, as a model of
# such weights would mostly read them there too.
COLD_FACTOR = 4
MAX_COLD_COPIES = 64


def _cold_copies(weight) -> list:
    """[weight] + copies of it: ``COLD_FACTOR`` L2 caches of bytes in all, 1 to ``MAX_COLD_COPIES`` tensors (fewer
    when memory is short: the timing is then partly L2 hits, as before)."""
    l2_bytes = getattr(torch.cuda.get_device_properties(weight.device), "L2_cache_size", 0) or (50 << 20)
    count = -(-COLD_FACTOR * l2_bytes // max(1, weight.numel() * weight.element_size()))
    count = max(1, min(MAX_COLD_COPIES, count))
    copies = [weight]
    try:
        while len(copies) < count:
            copies.append(weight.clone())
    except torch.cuda.OutOfMemoryError:
        pass
    return copies


def _measure(x, weight, bias):
    """The fastest of F.linear and the candidate configurations for this shape: None (F.linear) or a config. Each is
    timed over ``_cold_copies`` of the weight (its reads from HBM, as in a decode step), every call right after a
    one-program kernel that rewrites x (``_rewrite_kernel``), as a decode step's GEMV follows the small kernel that
    writes its input: with programmatic dependent launch a Triton route starts loading its weights during that kernel
    and lets the next kernel start during its own last programs, which calls timed back to back do not show (batch
    1, H200: timed back to back, in_proj picked (2, 1024, 1, 4), GPU step 2.255 ms, where (16, 256, 1, 8) gave 2.199;
    timed after the stand-in, it picks (16, 256, 1, 8): 2.204 ms; benchmarks/results/gpu_decode_parts.md)."""
    weights = _cold_copies(weight)
    calls = max(16, len(weights))
    x = x.clone()  # rewritten in place by the stand-in producer kernel (same values)
    x_row = x.reshape(-1)
    try:
        def timer(fn):
            rotation = itertools.cycle(weights)  # the captured calls read the copies in turn

            def producer_then_call():
                _rewrite(x_row)
                fn(next(rotation))

            return _graph_time_ms(producer_then_call, calls=calls)

        best, best_ms = None, timer(lambda w: F.linear(x, w, bias))
    except Exception:  # capture impossible here: compare eager times
        def timer(fn):
            return _time_ms(lambda: fn(weight))

        best, best_ms = None, timer(lambda w: F.linear(x, w, bias))
    reference = F.linear(x.float(), weight.float(), None if bias is None else bias.float())
    scale = reference.abs().max().item() + 1e-6
    for config in CANDIDATES:
        try:
            out = gemv_triton(x, weight, bias, *config)
            if not (out.float() - reference).abs().max().item() <= 2e-2 * scale:
                continue  # never pick a configuration that computes something else
            ms = timer(lambda w: gemv_triton(x, w, bias, *config))
        except Exception:  # a configuration this GPU / Triton cannot compile: skip it
            continue
        if ms < best_ms:
            best, best_ms = config, ms
    return best


def linear_one_row(x: torch.Tensor, weight: torch.Tensor, bias=None) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` for a single row x (1, ..., 1, K) on CUDA, by the fastest measured route."""
    key = (x.device.index, tuple(weight.shape), weight.dtype, bias is not None, bias.dtype if bias is not None else None)
    choice = _choices.get(key, False)
    if choice is False:
        if interpret_mode() or torch.cuda.is_current_stream_capturing():
            return F.linear(x, weight, bias)
        with _lock:
            choice = _choices.get(key, False)
            if choice is False:
                choice = _choices[key] = _measure(x.reshape(1, -1), weight, bias)
    if choice is None:
        return F.linear(x, weight, bias)
    return gemv_triton(x, weight, bias, *choice)


def measured_choices() -> dict:
    """{(device index, (N, K), dtype, has bias, bias dtype): None (F.linear) or (block_n, block_k, split_k, warps)}."""
    return dict(_choices)
