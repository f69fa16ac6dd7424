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

``linear_one_row``: which implementation is fastest depends on the shape and the GPU, so the first call for a
(device, N, K, dtype, bias) outside CUDA-graph capture times cuBLAS (``F.linear``) and a few kernel configurations
(their GPU time, replayed from a small CUDA graph, as a decode step runs them) and keeps the fastest for the rest of
the process; cuBLAS is a candidate, so the choice is never slower than it inside a graph (up to timing noise).
Outside a graph (``decode_cuda_graph=False``) each Triton call costs ~30-50 us of host time in Triton's launcher
against ~20 us for cuBLAS (``benchmarks/results/gpu_gemv.md``), so eager one-row decoding gets slower: the same
routes are used there so that eager and graph decoding give the same tokens. During capture, before a shape was
measured, it calls ``F.linear``.
"""

from __future__ import annotations

import threading

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ..utils import interpret_mode


@triton.jit
def _gemv_kernel(x_ptr, w_ptr, bias_ptr, out_ptr, N, K, stride_w, stride_split,
                 BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, K_PER_SPLIT: tl.constexpr,
                 HAS_BIAS: tl.constexpr, DIRECT: tl.constexpr):
    """DIRECT (one split): out[n] = sum_k x[k] w[n, k] (+ bias[n]) in out's dtype. Else out[split, n] = the sum over
    this split's K range, float32, for ``_sum_splits_kernel``."""
    pid_n = tl.program_id(0)
    split = tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    w_rows = w_ptr + rows.to(tl.int64)[:, None] * stride_w
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    k_start = split * K_PER_SPLIT
    for k0 in range(0, K_PER_SPLIT, BLOCK_K):
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
    if splits == 1:
        _gemv_kernel[(grid_n, 1)](vector, weight, bias_arg, out, n_out, k_in, weight.stride(0), 0,
                                  BLOCK_N=block_n, BLOCK_K=block_k, K_PER_SPLIT=k_per_split,
                                  HAS_BIAS=bias is not None, DIRECT=True, num_warps=num_warps)
        return out.reshape(*x.shape[:-1], n_out)
    partial = torch.empty(splits, n_out, device=x.device, dtype=torch.float32)
    _gemv_kernel[(grid_n, splits)](vector, weight, bias_arg, partial, n_out, k_in, weight.stride(0),
                                   partial.stride(0), BLOCK_N=block_n, BLOCK_K=block_k, K_PER_SPLIT=k_per_split,
                                   HAS_BIAS=False, DIRECT=False, num_warps=num_warps)
    block = min(1024, triton.next_power_of_2(n_out))
    _sum_splits_kernel[(triton.cdiv(n_out, block),)](
        partial, bias if bias is not None else partial, out, n_out, partial.stride(0),
        SPLITS=splits, HAS_BIAS=bias is not None, BLOCK=block, num_warps=4,
    )
    return out.reshape(*x.shape[:-1], n_out)


# Configurations tried per shape: (block_n, block_k, split_k, num_warps). Few enough to compile in seconds.
CANDIDATES = (
    (8, 256, 1, 4),
    (16, 256, 1, 8),
    (4, 512, 1, 4),
    (2, 1024, 1, 4),
    (4, 256, 4, 4),
    (8, 128, 8, 4),
    (1, 512, 8, 4),
    (32, 64, 1, 4),
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


def _measure(x, weight, bias):
    """The fastest of F.linear and the candidate configurations for this shape: None (F.linear) or a config."""
    try:
        timer = _graph_time_ms
        best, best_ms = None, timer(lambda: F.linear(x, weight, bias))
    except Exception:  # capture impossible here: compare eager times
        timer = _time_ms
        best, best_ms = None, timer(lambda: F.linear(x, weight, bias))
    reference = F.linear(x.float(), weight.float(), None if bias is None else bias.float())
    scale = reference.abs().max().item() + 1e-6
    for config in CANDIDATES:
        try:
            out = gemv_triton(x, weight, bias, *config)
            if not (out.float() - reference).abs().max().item() <= 2e-2 * scale:
                continue  # never pick a configuration that computes something else
            ms = timer(lambda: gemv_triton(x, weight, bias, *config))
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


# ----------------------------------------------------------------------------------------------------------------
# A few rows (a decode step at batch 2 - 32): (rows, K) x (K, BLOCK_N) tiles by tl.dot, each weight tile read once
# ----------------------------------------------------------------------------------------------------------------
MAX_FEW_ROWS = 32


@triton.jit
def _few_rows_kernel(x_ptr, w_ptr, bias_ptr, out_ptr, M, N, K, stride_xm, stride_w, stride_om,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, HAS_BIAS: tl.constexpr,
                     PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """out[m, n] = sum_k x[m, k] w[n, k] (+ bias[n]) for all M rows (<= BLOCK_M, masked) and BLOCK_N outputs;
    float32 accumulation over K in order, one program per output block (no split-K: no atomics, no second pass)."""
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_k = tl.arange(0, BLOCK_K)
    mask_n = offs_n < N
    mask_m = offs_m < M
    x_ptrs = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm + offs_k[None, :]
    w_ptrs = w_ptr + offs_n.to(tl.int64)[None, :] * stride_w + offs_k[:, None]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        mask_k = k0 + offs_k < K
        x = tl.load(x_ptrs + k0, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        w = tl.load(w_ptrs + k0, mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        if UPCAST:  # Triton's interpreter computes 16-bit tl.dot wrong (seen with 3.9): exact float32 products there
            x = x.to(tl.float32)
            w = w.to(tl.float32)
        acc = tl.dot(x, w, acc, input_precision=PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + offs_m.to(tl.int64)[:, None] * stride_om + offs_n[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=mask_m[:, None] & mask_n[None, :])


def linear_few_rows_triton(x: torch.Tensor, weight: torch.Tensor, bias=None, block_n: int = 64, block_k: int = 128,
                           num_warps: int = 4) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` for x (..., K) holding 1 - MAX_FEW_ROWS rows, weight (N, K) with unit stride
    along K, x's dtype = weight's dtype."""
    n_out, k_in = weight.shape
    rows = x.numel() // k_in if k_in else 0
    if x.shape[-1] != k_in or not 1 <= rows <= MAX_FEW_ROWS:
        raise ValueError(f"linear_few_rows_triton: x must hold 1 - {MAX_FEW_ROWS} rows of {k_in} features, "
                         f"got shape {tuple(x.shape)}")
    if weight.stride(-1) != 1:
        raise ValueError("linear_few_rows_triton: the weight must be contiguous along its input features")
    if x.dtype != weight.dtype:
        raise ValueError(f"linear_few_rows_triton: x ({x.dtype}) and weight ({weight.dtype}) must have the same dtype")
    matrix = x.reshape(rows, k_in)
    if matrix.stride(-1) != 1:
        matrix = matrix.contiguous()
    out = torch.empty(rows, n_out, device=x.device, dtype=x.dtype)
    block_m = max(16, triton.next_power_of_2(rows))
    _few_rows_kernel[(triton.cdiv(n_out, block_n),)](
        matrix, weight, bias if bias is not None else weight, out, rows, n_out, k_in, matrix.stride(0),
        weight.stride(0), out.stride(0), BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
        HAS_BIAS=bias is not None, PRECISION="ieee" if x.dtype == torch.float32 or interpret_mode() else "tf32",
        UPCAST=interpret_mode(), num_warps=num_warps)
    return out.reshape(*x.shape[:-1], n_out)


# (block_n, block_k, num_warps) tried per (shape, rows)
FEW_ROWS_CANDIDATES = (
    (16, 256, 4),
    (32, 256, 4),
    (32, 128, 4),
    (64, 128, 4),
    (64, 64, 4),
    (16, 512, 4),
    (128, 64, 8),
)
_few_choices = {}


def _measure_few_rows(x, weight, bias):
    """The fastest of F.linear and the few-rows candidates for this (shape, rows): None (F.linear) or a config."""
    try:
        timer = _graph_time_ms
        best, best_ms = None, timer(lambda: F.linear(x, weight, bias))
    except Exception:  # capture impossible here: compare eager times
        timer = _time_ms
        best, best_ms = None, timer(lambda: F.linear(x, weight, bias))
    reference = F.linear(x.float(), weight.float(), None if bias is None else bias.float())
    scale = reference.abs().max().item() + 1e-6
    for config in FEW_ROWS_CANDIDATES:
        try:
            out = linear_few_rows_triton(x, weight, bias, *config)
            if not (out.float() - reference).abs().max().item() <= 2e-2 * scale:
                continue  # never pick a configuration that computes something else
            ms = timer(lambda: linear_few_rows_triton(x, weight, bias, *config))
        except Exception:  # a configuration this GPU / Triton cannot compile: skip it
            continue
        if ms < best_ms:
            best, best_ms = config, ms
    return best


def linear_few_rows(x: torch.Tensor, weight: torch.Tensor, bias=None) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` for x holding 2 - MAX_FEW_ROWS rows on CUDA, by the fastest measured route for
    its (shape, rows): cuBLAS or ``linear_few_rows_triton`` (measured once per process, as ``linear_one_row``)."""
    rows = x.numel() // weight.shape[1]
    key = (x.device.index, tuple(weight.shape), weight.dtype, bias is not None, bias.dtype if bias is not None else None,
           rows)
    choice = _few_choices.get(key, False)
    if choice is False:
        if interpret_mode() or torch.cuda.is_current_stream_capturing():
            return F.linear(x, weight, bias)
        with _lock:
            choice = _few_choices.get(key, False)
            if choice is False:
                choice = _few_choices[key] = _measure_few_rows(x.reshape(rows, -1), weight, bias)
    if choice is None:
        return F.linear(x, weight, bias)
    return linear_few_rows_triton(x, weight, bias, *choice)


def measured_few_rows_choices() -> dict:
    """{(device index, (N, K), dtype, has bias, bias dtype, rows): None (F.linear) or (block_n, block_k, warps)}."""
    return dict(_few_choices)
