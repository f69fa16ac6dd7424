"""Triton GEMM for projections of a few rows (a decode step at batch 8 - 32): ``linear_rows`` and its split-K form
``linear_rows_partials``.

At batch 16 a decode step's in_proj and out_proj are weight streams: 16 rows against 52 MB (in_proj) and 26 MB
(out_proj) of a mamba-2.8b layer's bf16 weights, ~0.8 GFLOP each, far below the tensor cores' rate. What decides their
time is how fast and how early the weight bytes come in. This kernel

- takes ``BLOCK_N`` weight rows and one K range per program and multiplies them with the rows' (K range, BLOCK_B)
  tile by ``tl.dot`` (SWAP: the weight rows are the MMA's M dimension, the 16 activation rows its N dimension; else
  the other way round);
- loads the first ``PRE_K`` columns of its weight tile before waiting for the kernel before it (programmatic
  dependent launch, kernels/utils ``pdl_available``): the weights do not depend on that kernel, only the activation
  rows do, so the first part of the weight stream overlaps the previous kernel; the rest of K is a pipelined loop;
- with ``K_SPLIT`` shorter than K (``linear_rows_partials``) writes float32 partial sums per K range,
  (splits, rows, N), which its reader adds in a fixed order (the decode step's ``add_rms_norm`` reads out_proj's
  output anyway): no atomics and no reduction kernel, the result does not depend on scheduling, so eager and graph
  decoding give the same tokens.

Configurations: ``(block_n, block_k, k_split, pre_k, swap, warps, stages[, tma[, trigger]])``; k_split 0 = all of K
in one program; tma: the loop's weight tiles through a device-side tensor descriptor (TMA); trigger: where the kernels
after it may launch under PDL (0: at the start, 1: after the wait, 2: after the K loop).
Reference: ``naive.py``. Inference only (no autograd).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..utils import CachedLaunch, gdc_launch_dependents, gdc_wait, interpret_mode, pdl_available


@triton.jit
def _dot(a, b, acc, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    if UPCAST:  # Triton's interpreter computes 16-bit tl.dot wrong (seen with 3.9): exact float32 products there
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=PRECISION)


@triton.jit
def _linear_rows_kernel(x_ptr, w_ptr, bias_ptr, out_ptr, rows, n_out, k_in, stride_x, stride_w, stride_os, stride_ob,
                        BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, K_SPLIT: tl.constexpr,
                        PRE_K: tl.constexpr, SWAP: tl.constexpr, HAS_BIAS: tl.constexpr, PARTIAL: tl.constexpr,
                        PRECISION: tl.constexpr, UPCAST: tl.constexpr, TMA: tl.constexpr, TRIGGER: tl.constexpr,
                        PDL: tl.constexpr):
    """Program (output block, K split, row block): acc = x[rows, K range] @ w[n-block, K range]^T in float32 (K in
    BLOCK_K steps after a first PRE_K-wide step whose weight tile is loaded before the PDL wait). PARTIAL: stored as
    out[split, rows, n-block] (float32); else (one split) + bias, stored as out[rows, n-block] in out's dtype.
    TMA: the loop's weight tiles come through a tensor descriptor (Hopper's bulk tensor copies). TRIGGER: where the
    kernels after it may launch (PDL): 0 at the start, 1 after the wait, 2 after the K loop (kernels launched early
    hold SM resources while they wait)."""
    pid_n = tl.program_id(0)
    split = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < n_out
    offs_b = tl.program_id(2) * BLOCK_B + tl.arange(0, BLOCK_B)
    mask_b = offs_b < rows
    k_lo = split * K_SPLIT
    w_rows = w_ptr + offs_n.to(tl.int64) * stride_w
    x_rows = x_ptr + offs_b.to(tl.int64) * stride_x
    if SWAP:
        acc = tl.zeros((BLOCK_N, BLOCK_B), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_B, BLOCK_N), dtype=tl.float32)
    if TMA:
        w_desc = tl.make_tensor_descriptor(w_ptr, shape=[n_out, k_in], strides=[stride_w, 1],
                                           block_shape=[BLOCK_N, BLOCK_K])
    if PRE_K > 0:
        offs_p = k_lo + tl.arange(0, PRE_K)
        mask_p = (offs_p < k_in) & (tl.arange(0, PRE_K) < K_SPLIT)  # (PRE_K may pass the split's end)
        if SWAP:  # (BLOCK_N, PRE_K)
            wp = tl.load(w_rows[:, None] + offs_p[None, :], mask=mask_n[:, None] & mask_p[None, :], other=0.0)
        else:  # (PRE_K, BLOCK_N)
            wp = tl.load(w_rows[None, :] + offs_p[:, None], mask=mask_p[:, None] & mask_n[None, :], other=0.0)
    if PDL:
        if TRIGGER == 0:
            gdc_launch_dependents()
        gdc_wait()
        if TRIGGER == 1:
            gdc_launch_dependents()
    if PRE_K > 0:
        if SWAP:
            xp = tl.load(x_rows[None, :] + offs_p[:, None], mask=mask_p[:, None] & mask_b[None, :], other=0.0)
            acc = _dot(wp, xp.to(wp.dtype), acc, UPCAST, PRECISION)
        else:
            xp = tl.load(x_rows[:, None] + offs_p[None, :], mask=mask_b[:, None] & mask_p[None, :], other=0.0)
            acc = _dot(xp.to(wp.dtype), wp, acc, UPCAST, PRECISION)
    for k0 in range(PRE_K, K_SPLIT, BLOCK_K):
        offs_k = k_lo + k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < k_in
        if SWAP:
            if TMA:  # (zeros past N and K)
                w = w_desc.load([pid_n * BLOCK_N, k_lo + k0])
            else:
                w = tl.load(w_rows[:, None] + offs_k[None, :], mask=mask_n[:, None] & mask_k[None, :], other=0.0)
            x = tl.load(x_rows[None, :] + offs_k[:, None], mask=mask_k[:, None] & mask_b[None, :], other=0.0)
            acc = _dot(w, x.to(w.dtype), acc, UPCAST, PRECISION)
        else:
            if TMA:
                w = tl.trans(w_desc.load([pid_n * BLOCK_N, k_lo + k0]))
            else:
                w = tl.load(w_rows[None, :] + offs_k[:, None], mask=mask_k[:, None] & mask_n[None, :], other=0.0)
            x = tl.load(x_rows[:, None] + offs_k[None, :], mask=mask_b[:, None] & mask_k[None, :], other=0.0)
            acc = _dot(x.to(w.dtype), w, acc, UPCAST, PRECISION)
    if PDL:
        if TRIGGER == 2:
            gdc_launch_dependents()
    if SWAP:
        offs_out = offs_b.to(tl.int64)[None, :] * stride_ob + offs_n[:, None]
        mask_out = mask_n[:, None] & mask_b[None, :]
    else:
        offs_out = offs_b.to(tl.int64)[:, None] * stride_ob + offs_n[None, :]
        mask_out = mask_b[:, None] & mask_n[None, :]
    if PARTIAL:
        tl.store(out_ptr + split * stride_os + offs_out, acc, mask=mask_out)
    else:
        if HAS_BIAS:
            bias = tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
            if SWAP:
                acc += bias[:, None]
            else:
                acc += bias[None, :]
        tl.store(out_ptr + offs_out, acc.to(out_ptr.dtype.element_ty), mask=mask_out)


_LINEAR_ROWS = CachedLaunch(_linear_rows_kernel)


def _check(x, weight, name):
    if x.dim() != 2 or weight.dim() != 2 or x.shape[1] != weight.shape[1]:
        raise ValueError(f"{name}: x must be (rows, K) and weight (N, K), got {tuple(x.shape)} and "
                         f"{tuple(weight.shape)}")
    if x.dtype != weight.dtype or x.stride(-1) != 1 or weight.stride(-1) != 1:
        raise ValueError(f"{name}: x and weight must share a dtype and have unit stride along K")


def _blocks(config, k_in):
    """(block_n, block_k, K per split, pre_k, swap, warps, stages, tma, trigger) with K per split a multiple of
    block_k and pre_k a power of 2 multiple of block_k, at most the power of 2 that covers the split (0: nothing
    loaded before the wait); tma and trigger: optional 8th and 9th entries of config (default off, 0); tma only where
    the weight's rows are 16-byte aligned."""
    block_n, block_k, k_split, pre_k, swap, warps, stages = config[:7]
    tma = bool(config[7]) if len(config) > 7 else False
    trigger = int(config[8]) if len(config) > 8 else 0
    k_full = triton.cdiv(k_in, block_k) * block_k
    k_split = k_full if not k_split else min(triton.cdiv(k_split, block_k) * block_k, k_full)
    pre_k = min(pre_k, triton.next_power_of_2(k_split))
    if pre_k and (pre_k & (pre_k - 1) or pre_k % block_k):
        raise ValueError(f"linear_rows: pre_k must be a power of 2 and a multiple of block_k, got {config}")
    return block_n, block_k, k_split, pre_k, bool(swap), warps, stages, tma, trigger


def _scratch(size, alignment, stream):
    """Triton's global scratch for device-side tensor descriptors (the TMA configurations). The kernel writes its
    descriptors there at its start, before its PDL wait: with PDL this memory must not be in use by a kernel that may
    still run, i.e. no tensor that such a kernel reads or writes may be freed before this launch (a block freed to the
    caching allocator is handed out again at once). In branch dec16c, out_proj's split-K partials freed as soon as
    its launch returned, then taken as the next in_proj's scratch while out_proj still wrote them, ended in an
    illegal instruction (gpu_decode_parts.md)."""
    return torch.empty(size, dtype=torch.int8, device=torch.cuda.current_device())  # (where the kernel runs)


def split_count(k_in: int, config) -> int:
    """How many K ranges (partial sums) ``linear_rows_partials`` writes for K = ``k_in`` with ``config``."""
    return triton.cdiv(k_in, _blocks(config, k_in)[2])


def _launch(x, weight, bias, out, config, partial):
    rows, k_in = x.shape
    n_out = weight.shape[0]
    block_n, block_k, k_split, pre_k, swap, warps, stages, tma, trigger = _blocks(config, k_in)
    # TMA needs Hopper (sm_90) or later and 16-byte aligned rows; elsewhere the same tiles come through pointers
    tma = (tma and weight.stride(0) * weight.element_size() % 16 == 0 and weight.data_ptr() % 16 == 0
           and (interpret_mode() or torch.cuda.get_device_capability(weight.device) >= (9, 0)))
    if tma:  # (a context variable: set on every call, so a launch from another thread finds it too)
        triton.set_allocator(_scratch)
    block_b = 16 if rows <= 16 else 32
    upcast = interpret_mode()
    precision = "ieee" if x.dtype == torch.float32 or upcast else "tf32"  # (only float32 operands read it)
    pdl = pdl_available(x.device)
    splits = triton.cdiv(k_in, k_split)
    stride_os = out.stride(0) if partial else 0
    stride_ob = out.stride(1) if partial else out.stride(0)
    _LINEAR_ROWS((triton.cdiv(n_out, block_n), splits, triton.cdiv(rows, block_b)),
                 (x, weight, bias if bias is not None else weight, out),
                 (rows, n_out, k_in, x.stride(0), weight.stride(0), stride_os, stride_ob),
                 (block_b, block_n, block_k, k_split, pre_k, swap, bias is not None, partial, precision, upcast, tma,
                  trigger, pdl),
                 warps, pdl, num_stages=stages)
    return out


def linear_rows(x, weight, bias=None, config=(64, 128, 0, 0, True, 4, 4), out=None):
    """x (rows, K), weight (N, K), bias (N,) or None -> out (rows, N) in x's dtype: ``F.linear`` with float32 sums
    (one rounding), all of K in each program (``config``'s k_split is ignored)."""
    _check(x, weight, "linear_rows")
    rows, n_out = x.shape[0], weight.shape[0]
    if bias is not None and tuple(bias.shape) != (n_out,):
        raise ValueError(f"linear_rows: bias must be ({n_out},), got {tuple(bias.shape)}")
    if out is None:
        out = torch.empty(rows, n_out, device=x.device, dtype=x.dtype)
    elif tuple(out.shape) != (rows, n_out) or out.stride(-1) != 1:
        raise ValueError(f"linear_rows: out must be ({rows}, {n_out}) with unit stride, got {tuple(out.shape)}")
    if rows and n_out:
        _launch(x, weight, bias, out, (config[0], config[1], 0, *config[3:]), False)
    return out


def linear_rows_partials(x, weight, config=(64, 128, 512, 512, True, 4, 2), out=None):
    """x (rows, K), weight (N, K) -> out (split_count(K, config), rows, N) float32: out[s] = x[:, K range s] @
    weight[:, K range s]^T, each K range config's k_split long (rounded up to block_k). No bias (add it where the
    partials are summed)."""
    _check(x, weight, "linear_rows_partials")
    rows, k_in = x.shape
    n_out = weight.shape[0]
    splits = split_count(k_in, config)
    if out is None:
        out = torch.empty(splits, rows, n_out, device=x.device, dtype=torch.float32)
    elif (out.dim() != 3 or tuple(out.shape) != (splits, rows, n_out) or out.stride(-1) != 1
          or out.dtype != torch.float32):
        raise ValueError(f"linear_rows_partials: out must be float32 ({splits}, {rows}, {n_out}) with unit stride, "
                         f"got {tuple(out.shape)} {out.dtype}")
    if rows and n_out and k_in:
        _launch(x, weight, None, out, config, True)
    return out
