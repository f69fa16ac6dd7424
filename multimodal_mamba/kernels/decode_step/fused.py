"""Triton kernels of the fused Mamba decode step: three small kernels per layer instead of seven.

A decode step of the Mamba LM, per layer and unfused, is: RMSNorm, in_proj, conv update, x_proj (two launches at batch
1: a split-K GEMV and its sum), dt_proj, state update, out_proj, residual add. Inside a CUDA graph each of these small
kernels costs 2-4 us of latency whatever its work, 64 layers over. Here the same math runs as

- ``add_rms_norm``: the residual add of layer i (residual in float32 when ``residual_in_fp32``) and the RMSNorm of
  layer i + 1 (or ``norm_f``) in one program per row;
- ``mixer_decode_step`` = ``_conv_x_proj_kernel`` + ``_ssm_step_kernel``:
  1. conv update + SiLU for a block of channels, and that block's share of x_proj (a split-K GEMV: each program
     writes its partial products of one block of x_proj's outputs into a float32 partials buffer; no atomics, so the
     result does not depend on scheduling and eager and graph decoding give the same tokens);
  2. per block of channels: the sum of the partials in a fixed order (each program sums all of them: cheaper than a
     launch for the sum), dt_proj + bias + softplus, the conv again (its state rolled here, after step 1 read it),
     the state update, the D skip and the silu(z) gate, writing y;
- in_proj and out_proj stay module calls (the one-row GEMV of kernels/gemv at batch 1, cuBLAS above), except at
  ``PROJ_MIN_BATCH`` - ``PROJ_MAX_BATCH`` rows where ``IN_PROJ_CONFIG`` / ``OUT_PROJ_CONFIG`` route them to
  kernels/linear_rows (``in_projection``, ``out_projection``; out_proj then hands float32 split-K partial sums to
  ``add_rms_norm``, which adds them in a fixed order).

From ``ROWS_MIN_BATCH`` rows on, the two mixer kernels are replaced by their ``_rows`` forms (blocks of rows per
program, x_proj and dt_proj by ``tl.dot``); the partials are summed once per step, by the conv kernel's last program
of each output tile (``ROWS_FOLD_REDUCE``) or by a small kernel between the two.

On sm_90+ every kernel here is launched with programmatic dependent launch (kernels/utils ``pdl_available``): it
loads its weights, then waits for the kernel before it, so launch gaps and first loads overlap the previous kernel
(batch-1 GPU step 2.51 -> 2.26 ms on an H200, benchmarks/results/gpu_decode_parts.md); results are unchanged.

Rounding follows the unfused path's steps: the conv output, x_proj's output (time_step, B, C) and dt_proj's output
are rounded to the model dtype where the unfused path stores them in it; only float32 summation orders differ.
Reference: ``naive.py`` (the same steps with the package's existing ops). Inference only (no autograd).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..linear_rows.fused import linear_rows, linear_rows_partials
from ..utils import CachedLaunch, gdc_launch_dependents, gdc_wait, interpret_mode, next_pow2, pdl_available, softplus

_TL_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


# ----------------------------------------------------------------------------------------------------------------
# Residual add + RMSNorm
# ----------------------------------------------------------------------------------------------------------------
@triton.jit
def _add_rms_norm_kernel(res_in_ptr, delta_ptr, res_out_ptr, w_ptr, out_ptr, hidden,
                         stride_in, stride_delta, stride_delta_s, stride_res, stride_out, eps,
                         NORM_DTYPE: tl.constexpr, HAS_DELTA: tl.constexpr, DELTA_SPLITS: tl.constexpr,
                         DELTA_DTYPE: tl.constexpr, BLOCK: tl.constexpr, TRIGGER_AFTER_WAIT: tl.constexpr,
                         PDL: tl.constexpr):
    """res_out = round_res(res_in + delta) (float32 sum); out = w * round_norm(normalize(round_norm(res_out))).
    DELTA_SPLITS > 0: delta is that many float32 partial sums (stride_delta_s apart), added in split order and rounded
    to DELTA_DTYPE (the projection's output dtype) first. PDL: launched with programmatic dependent launch
    (kernels/utils.pdl_available): the norm weight is loaded before waiting for the kernel before; the kernels after
    it may launch from its start, or with TRIGGER_AFTER_WAIT once its wait returned."""
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < hidden
    w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if PDL:
        if not TRIGGER_AFTER_WAIT:
            gdc_launch_dependents()
        gdc_wait()
        if TRIGGER_AFTER_WAIT:
            gdc_launch_dependents()
    res = tl.load(res_in_ptr + row * stride_in + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_DELTA:
        delta_row = delta_ptr + row * stride_delta + offs
        if DELTA_SPLITS > 0:
            delta = tl.load(delta_row, mask=mask, other=0.0)
            for s in tl.static_range(1, DELTA_SPLITS):
                delta += tl.load(delta_row + s * stride_delta_s, mask=mask, other=0.0)
            res += delta.to(DELTA_DTYPE).to(tl.float32)
        else:
            res += tl.load(delta_row, mask=mask, other=0.0).to(tl.float32)
    res = res.to(res_out_ptr.dtype.element_ty)  # the residual's own rounding (bf16 when not residual_in_fp32)
    tl.store(res_out_ptr + row * stride_res + offs, res, mask=mask)
    # MambaRMSNorm(x, input_dtype): x rounded to input_dtype, normalized in float32, rounded again, times the weight
    x = res.to(NORM_DTYPE).to(tl.float32)
    mean_square = tl.sum(x * x, axis=0) / hidden
    normed = (x * tl.rsqrt(mean_square + eps)).to(NORM_DTYPE).to(tl.float32)
    tl.store(out_ptr + row * stride_out + offs, (w * normed).to(out_ptr.dtype.element_ty), mask=mask)


_ADD_NORM = CachedLaunch(_add_rms_norm_kernel)
# From PROJ_MIN_BATCH to PROJ_MAX_BATCH rows (where in_proj may run on kernels/linear_rows, below): add_rms_norm's warps
# per row (None: 4 up to 4096 features, else 8) and where the kernels after it may launch under PDL (False: from its
# start; True: once its wait returned, so the linear_rows in_proj after it does not hold SM resources, waiting, while
# the out_proj before the norm still streams its weights). Other row counts keep None / False. Measured on an H200
# (batch-16 GPU step, benchmarks/results/gpu_decode_parts.md): True 3.161 ms against False 3.199 with both
# projections on linear_rows. 16 warps (branch dec16c, second H200 call): 2.892 ms against 2.920 with 4 (on top of
# ROWS_FOLD_REDUCE and ROWS_PRE_WAIT); 32 warps (session 7, sweep_decode_fold16.py --base-defaults): 2.833-2.842 ms
# against 2.878-2.888 with 16 (8: 2.919). The row's sum of squares is reduced over those warps (another float32 order).
ADD_NORM_WARPS = 32
ADD_NORM_TRIGGER_AFTER_WAIT = True


def add_rms_norm(residual_in, delta, weight, eps, residual_out, out, norm_dtype, delta_dtype=None):
    """residual_out = residual_in + delta (float32 sum, stored in residual_out's dtype), then
    out = ``MambaRMSNorm(residual_out, input_dtype=norm_dtype)`` stored in out's dtype.

    residual_in, delta (optional), residual_out, out: (rows, hidden) with unit stride along hidden (residual_out may be
    residual_in: each element is read before it is written, by the same program); weight (hidden,). delta may also be
    float32 split-K partial sums (splits, rows, hidden) (``out_projection``): added in split order and rounded to
    ``delta_dtype`` (required then: the projection's output dtype) before the residual add. Returns out.
    """
    rows, hidden = residual_out.shape
    splits = 0
    if delta is not None and delta.dim() == 3:
        splits = delta.shape[0]
        if delta.dtype != torch.float32 or splits < 1 or delta_dtype not in _TL_DTYPES:
            raise ValueError("add_rms_norm: partial sums must be float32 (splits, rows, hidden), with delta_dtype, got "
                             f"{tuple(delta.shape)} {delta.dtype}, delta_dtype {delta_dtype}")
    for name, t in (("residual_in", residual_in), ("delta", delta if not splits else delta[0]), ("out", out)):
        if t is not None and (tuple(t.shape) != (rows, hidden) or t.stride(-1) != 1):
            raise ValueError(f"add_rms_norm: {name} must be ({rows}, {hidden}) with unit stride, got {tuple(t.shape)}")
    if tuple(weight.shape) != (hidden,) or residual_out.stride(-1) != 1:
        raise ValueError(f"add_rms_norm: weight must be ({hidden},), got {tuple(weight.shape)}")
    block = next_pow2(hidden)
    if rows:
        pdl = pdl_available(out.device)
        few_rows = PROJ_MIN_BATCH <= rows <= PROJ_MAX_BATCH
        warps = (ADD_NORM_WARPS if few_rows else None) or (4 if block <= 4096 else 8)
        has_delta = delta is not None
        delta_arg = delta if has_delta else residual_in
        stride_delta = delta_arg.stride(1) if splits else delta_arg.stride(0)
        stride_split = delta_arg.stride(0) if splits else 0
        _ADD_NORM((rows, 1, 1), (residual_in, delta_arg, residual_out, weight, out),
                  (hidden, residual_in.stride(0), stride_delta, stride_split, residual_out.stride(0), out.stride(0),
                   float(eps)),
                  (_TL_DTYPES[norm_dtype], has_delta, splits, _TL_DTYPES[delta_dtype or torch.float32], block,
                   bool(ADD_NORM_TRIGGER_AFTER_WAIT and few_rows), pdl),
                  warps, pdl)
    return out


# ----------------------------------------------------------------------------------------------------------------
# Mixer: conv + x_proj partials, then partial sums + dt_proj + state update + gate
# ----------------------------------------------------------------------------------------------------------------
@triton.jit
def _conv_silu(xz_row, state_row, conv_w_ptr, conv_b_ptr, offs_c, mask_c, stride_xz_d, stride_s_d, stride_s_w,
               stride_cw_d, stride_cw_k, W: tl.constexpr, W_PAD: tl.constexpr, HAS_CONV_BIAS: tl.constexpr):
    """The conv update's window (old state shifted by one, the new input last) and silu(conv) rounded to the input
    dtype, for channels ``offs_c`` of one row. Shared by both kernels, so both compute bit-identical x."""
    offs_k = tl.arange(0, W_PAD)
    state_ptrs = state_row + offs_c[:, None] * stride_s_d
    shifted = tl.load(state_ptrs + (offs_k + 1)[None, :] * stride_s_w,
                      mask=mask_c[:, None] & (offs_k < W - 1)[None, :], other=0.0)
    x_in = tl.load(xz_row + offs_c * stride_xz_d, mask=mask_c, other=0.0)
    window = tl.where(offs_k[None, :] == W - 1, x_in.to(shifted.dtype)[:, None], shifted)
    w = tl.load(conv_w_ptr + offs_c[:, None] * stride_cw_d + offs_k[None, :] * stride_cw_k,
                mask=mask_c[:, None] & (offs_k < W)[None, :], other=0.0)
    pre = tl.sum(window.to(tl.float32) * w.to(tl.float32), axis=1)
    if HAS_CONV_BIAS:
        pre += tl.load(conv_b_ptr + offs_c, mask=mask_c, other=0.0).to(tl.float32)
    x = (pre * tl.sigmoid(pre)).to(x_in.dtype).to(tl.float32)
    return x, window, state_ptrs, offs_k


@triton.jit
def _conv_x_proj_kernel(
    xz_ptr, conv_state_ptr, conv_w_ptr, conv_b_ptr, xw_ptr, part_ptr,
    dim, n_proj,
    stride_xz_b, stride_xz_d, stride_s_b, stride_s_d, stride_s_w, stride_cw_d, stride_cw_k,
    stride_xw_n, stride_xw_k, stride_part_s, stride_part_b,
    W: tl.constexpr, W_PAD: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
    HAS_CONV_BIAS: tl.constexpr, PDL: tl.constexpr,
):
    """Program (channel block s, output block p, row b): x = silu(conv) of the block's channels (the conv state is only
    read here), part[s, b, p-block] = x_proj.weight[p-block, channels] @ x (float32). PDL: the x_proj tile is loaded
    before waiting for the kernel before."""
    pid_s = tl.program_id(0)
    pid_p = tl.program_id(1)
    row = tl.program_id(2).to(tl.int64)
    offs_c = pid_s * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = offs_c < dim
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    mask_p = offs_p < n_proj
    xw = tl.load(xw_ptr + offs_p[:, None].to(tl.int64) * stride_xw_n + offs_c[None, :] * stride_xw_k,
                 mask=mask_p[:, None] & mask_c[None, :], other=0.0)
    if PDL:
        gdc_launch_dependents()
        gdc_wait()
    x, _, _, _ = _conv_silu(xz_ptr + row * stride_xz_b, conv_state_ptr + row * stride_s_b, conv_w_ptr, conv_b_ptr,
                            offs_c, mask_c, stride_xz_d, stride_s_d, stride_s_w, stride_cw_d, stride_cw_k,
                            W, W_PAD, HAS_CONV_BIAS)
    partial = tl.sum(xw.to(tl.float32) * x[None, :], axis=1)
    tl.store(part_ptr + pid_s * stride_part_s + row * stride_part_b + offs_p, partial, mask=mask_p)


@triton.jit
def _sum_partials(part_row, stride_part_s, n_splits, start, count, COUNT_PAD: tl.constexpr, SPLIT_BLOCK: tl.constexpr):
    """sum over splits of part[s, start:start + count] (float32, in a fixed order) -> (COUNT_PAD,)."""
    offs = tl.arange(0, COUNT_PAD)
    offs_s = tl.arange(0, SPLIT_BLOCK)
    acc = tl.zeros((SPLIT_BLOCK, COUNT_PAD), dtype=tl.float32)
    for s0 in range(0, n_splits, SPLIT_BLOCK):
        ss = s0 + offs_s
        acc += tl.load(part_row + ss[:, None] * stride_part_s + (start + offs)[None, :],
                       mask=(ss < n_splits)[:, None] & (offs < count)[None, :], other=0.0)
    return tl.sum(acc, axis=0)


@triton.jit
def _ssm_step_kernel(
    part_ptr, xz_ptr, conv_state_ptr, conv_w_ptr, conv_b_ptr, dtw_ptr, dtb_ptr, A_log_ptr, D_ptr, ssm_state_ptr, y_ptr,
    dim, rank, n_splits,
    stride_part_s, stride_part_b, stride_xz_b, stride_xz_d, stride_s_b, stride_s_d, stride_s_w,
    stride_cw_d, stride_cw_k, stride_dtw_d, stride_dtw_r, stride_A_d, stride_A_n,
    stride_h_b, stride_h_d, stride_h_n, stride_y_b, stride_y_d,
    N: tl.constexpr, N_PAD: tl.constexpr, R_PAD: tl.constexpr, W: tl.constexpr, W_PAD: tl.constexpr,
    BLOCK_D: tl.constexpr, SPLIT_BLOCK: tl.constexpr, HAS_CONV_BIAS: tl.constexpr, HAS_DT_BIAS: tl.constexpr,
    HAS_D: tl.constexpr, PDL: tl.constexpr,
):
    """Program (channel block, row b): time_step, B, C = sums of the x_proj partials (rounded to the model dtype, as
    x_proj's output is); dt = softplus(round(dt_proj(time_step) + bias)); x = silu(conv) with the conv state rolled;
    h = exp(dt A) h + dt B x with A = -exp(A_log); y = (<C, h> + D x) * silu(z). PDL: the dt_proj tile and A_log are
    loaded before waiting for the kernel before."""
    pid_d = tl.program_id(0)
    row = tl.program_id(1).to(tl.int64)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = offs_d < dim
    dtype = y_ptr.dtype.element_ty
    offs_r = tl.arange(0, R_PAD)
    dtw = tl.load(dtw_ptr + offs_d[:, None] * stride_dtw_d + offs_r[None, :] * stride_dtw_r,
                  mask=mask_d[:, None] & (offs_r < rank)[None, :], other=0.0)
    offs_n = tl.arange(0, N_PAD)
    mask_h = mask_d[:, None] & (offs_n < N)[None, :]
    A_log = tl.load(A_log_ptr + offs_d[:, None] * stride_A_d + offs_n[None, :] * stride_A_n, mask=mask_h, other=0.0)
    if PDL:
        gdc_launch_dependents()
        gdc_wait()
    part_row = part_ptr + row * stride_part_b
    time_step = _sum_partials(part_row, stride_part_s, n_splits, 0, rank, R_PAD, SPLIT_BLOCK).to(dtype).to(tl.float32)
    Bv = _sum_partials(part_row, stride_part_s, n_splits, rank, N, N_PAD, SPLIT_BLOCK).to(dtype).to(tl.float32)
    Cv = _sum_partials(part_row, stride_part_s, n_splits, rank + N, N, N_PAD, SPLIT_BLOCK).to(dtype).to(tl.float32)

    dt = tl.sum(dtw.to(tl.float32) * time_step[None, :], axis=1)
    if HAS_DT_BIAS:
        dt += tl.load(dtb_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    dt = softplus(dt.to(dtype).to(tl.float32))

    xz_row = xz_ptr + row * stride_xz_b
    x, window, state_ptrs, offs_k = _conv_silu(
        xz_row, conv_state_ptr + row * stride_s_b, conv_w_ptr, conv_b_ptr, offs_d, mask_d, stride_xz_d, stride_s_d,
        stride_s_w, stride_cw_d, stride_cw_k, W, W_PAD, HAS_CONV_BIAS)
    # roll the conv state here, not in the first kernel: there other programs (other output blocks) read it too
    tl.store(state_ptrs + offs_k[None, :] * stride_s_w, window, mask=mask_d[:, None] & (offs_k < W)[None, :])

    A = -tl.exp(A_log.to(tl.float32))
    h_ptrs = ssm_state_ptr + row * stride_h_b + offs_d[:, None] * stride_h_d + offs_n[None, :] * stride_h_n
    h = tl.load(h_ptrs, mask=mask_h, other=0.0).to(tl.float32)
    h = tl.exp(dt[:, None] * A) * h + (dt * x)[:, None] * Bv[None, :]
    tl.store(h_ptrs, h.to(ssm_state_ptr.dtype.element_ty), mask=mask_h)
    y = tl.sum(h * Cv[None, :], axis=1)
    if HAS_D:
        y += x * tl.load(D_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    z = tl.load(xz_row + (dim + offs_d) * stride_xz_d, mask=mask_d, other=0.0).to(tl.float32)
    y = y * z * tl.sigmoid(z)
    tl.store(y_ptr + row * stride_y_b + offs_d * stride_y_d, y.to(dtype), mask=mask_d)


# ----------------------------------------------------------------------------------------------------------------
# The mixer for several rows per program (batch >= ROWS_MIN_BATCH): weight tiles read once for BLOCK_B rows, tl.dot
# ----------------------------------------------------------------------------------------------------------------
@triton.jit
def _conv_silu_rows(xz_ptr, state_ptr, conv_w_ptr, conv_b_ptr, offs_b, mask_b, offs_c, mask_c,
                    stride_xz_b, stride_xz_d, stride_s_b, stride_s_d, stride_s_w, stride_cw_d, stride_cw_k,
                    W: tl.constexpr, HAS_CONV_BIAS: tl.constexpr, ROLL: tl.constexpr):
    """silu(conv update) for rows ``offs_b`` x channels ``offs_c`` -> (rows, channels) in the input dtype, 0 where
    masked. The window's taps are added in order (old state, then the new input). With ROLL the conv state is shifted
    by one and the new input stored last (each element is read before this program overwrites it)."""
    mask = mask_b[:, None] & mask_c[None, :]
    rows = offs_b.to(tl.int64)[:, None]
    state_ptrs = state_ptr + rows * stride_s_b + offs_c[None, :] * stride_s_d
    x_in = tl.load(xz_ptr + rows * stride_xz_b + offs_c[None, :] * stride_xz_d, mask=mask, other=0.0)
    pre = tl.zeros(x_in.shape, dtype=tl.float32)
    for k in tl.static_range(W - 1):
        tap = tl.load(state_ptrs + (k + 1) * stride_s_w, mask=mask, other=0.0)
        if ROLL:
            tl.store(state_ptrs + k * stride_s_w, tap, mask=mask)
        w = tl.load(conv_w_ptr + offs_c * stride_cw_d + k * stride_cw_k, mask=mask_c, other=0.0).to(tl.float32)
        pre += tap.to(tl.float32) * w[None, :]
    if ROLL:
        tl.store(state_ptrs + (W - 1) * stride_s_w, x_in.to(state_ptr.dtype.element_ty), mask=mask)
    w = tl.load(conv_w_ptr + offs_c * stride_cw_d + (W - 1) * stride_cw_k, mask=mask_c, other=0.0).to(tl.float32)
    pre += x_in.to(tl.float32) * w[None, :]
    if HAS_CONV_BIAS:
        pre += tl.load(conv_b_ptr + offs_c, mask=mask_c, other=0.0).to(tl.float32)[None, :]
    x = tl.where(mask, pre * tl.sigmoid(pre), 0.0)
    return x.to(x_in.dtype)


@triton.jit
def _roll_conv_rows(xz_ptr, state_ptr, offs_b, mask_b, offs_c, mask_c, stride_xz_b, stride_xz_d, stride_s_b,
                    stride_s_d, stride_s_w, W: tl.constexpr, W_PAD: tl.constexpr):
    """The conv state's roll of ``_conv_silu_rows(..., ROLL=True)`` alone (shifted by one, the new input last), as one
    (rows, channels, W_PAD) load and store."""
    mask = mask_b[:, None] & mask_c[None, :]
    rows = offs_b.to(tl.int64)[:, None]
    offs_k = tl.arange(0, W_PAD)[None, None, :]
    state_ptrs = (state_ptr + rows * stride_s_b + offs_c[None, :] * stride_s_d)[:, :, None] + offs_k * stride_s_w
    shifted = tl.load(state_ptrs + stride_s_w, mask=mask[:, :, None] & (offs_k < W - 1), other=0.0)
    x_in = tl.load(xz_ptr + rows * stride_xz_b + offs_c[None, :] * stride_xz_d, mask=mask, other=0.0)
    window = tl.where(offs_k == W - 1, x_in.to(state_ptr.dtype.element_ty)[:, :, None], shifted)
    tl.store(state_ptrs, window, mask=mask[:, :, None] & (offs_k < W))


@triton.jit
def _conv_x_proj_rows_kernel(
    xz_ptr, conv_state_ptr, conv_w_ptr, conv_b_ptr, xw_ptr, part_ptr, counter_ptr,
    batch, dim, n_proj,
    stride_xz_b, stride_xz_d, stride_s_b, stride_s_d, stride_s_w, stride_cw_d, stride_cw_k,
    stride_xw_n, stride_xw_k, stride_part_s, stride_part_b,
    W: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_P: tl.constexpr,
    HAS_CONV_BIAS: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr, TRIGGER_AFTER_WAIT: tl.constexpr,
    FOLD_SPLITS: tl.constexpr, PDL: tl.constexpr,
):
    """Program (channel block s, output block p, row block): part[s, rows, p-block] = x[rows, channels] @
    x_proj.weight[p-block, channels]^T (float32), x = silu(conv) (the conv state only read). PDL: waits for the
    kernel before first; with TRIGGER_AFTER_WAIT the kernels after it may launch only once that wait returned
    (``_ssm_step_rows_kernel``'s EARLY_H relies on it).
    FOLD_SPLITS > 0 (= the number of channel blocks): the partial sums are also reduced here, in place into split 0:
    each program counts itself in at counter[p-block, row block] (int32, zero before the launch), and the one that
    arrives last, when every split of its (rows, p-block) tile is stored, adds them in split order (as
    ``_reduce_partials_kernel``) and sets the counter back to 0. The counter only elects that program; the sums do not
    depend on the arrival order (no atomics in them)."""
    if PDL:
        if TRIGGER_AFTER_WAIT:
            gdc_wait()
            gdc_launch_dependents()
        else:
            gdc_launch_dependents()
            gdc_wait()
    pid_s = tl.program_id(0)
    pid_p = tl.program_id(1)
    offs_b = tl.program_id(2) * BLOCK_B + tl.arange(0, BLOCK_B)
    mask_b = offs_b < batch
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    mask_p = offs_p < n_proj
    acc = tl.zeros((BLOCK_B, BLOCK_P), dtype=tl.float32)
    for c0 in tl.static_range(0, BLOCK_C, BLOCK_K):
        offs_c = pid_s * BLOCK_C + c0 + tl.arange(0, BLOCK_K)
        mask_c = offs_c < dim
        x = _conv_silu_rows(xz_ptr, conv_state_ptr, conv_w_ptr, conv_b_ptr, offs_b, mask_b, offs_c, mask_c,
                            stride_xz_b, stride_xz_d, stride_s_b, stride_s_d, stride_s_w, stride_cw_d, stride_cw_k,
                            W, HAS_CONV_BIAS, False)
        xw = tl.load(xw_ptr + offs_p.to(tl.int64)[None, :] * stride_xw_n + offs_c[:, None] * stride_xw_k,
                     mask=mask_c[:, None] & mask_p[None, :], other=0.0)
        xw = xw.to(x.dtype)
        if UPCAST:  # Triton's interpreter computes 16-bit tl.dot wrong (seen with 3.9): exact float32 products there
            x = x.to(tl.float32)
            xw = xw.to(tl.float32)
        acc = tl.dot(x, xw, acc, input_precision=PRECISION)
    tile = part_ptr + offs_b.to(tl.int64)[:, None] * stride_part_b + offs_p[None, :]
    mask_tile = mask_b[:, None] & mask_p[None, :]
    tl.store(tile + pid_s * stride_part_s, acc, mask=mask_tile)
    if FOLD_SPLITS > 0:
        counter = counter_ptr + pid_p * tl.num_programs(2) + tl.program_id(2)
        tl.debug_barrier()  # every thread's store of this program is issued before the release below
        arrived = tl.atomic_add(counter, 1, sem="acq_rel", scope="gpu")
        if arrived == FOLD_SPLITS - 1:  # the last of this tile's programs: every split is stored and visible
            total = tl.load(tile, mask=mask_tile, other=0.0, cache_modifier=".cg")
            for s in tl.static_range(1, FOLD_SPLITS):
                total += tl.load(tile + s * stride_part_s, mask=mask_tile, other=0.0, cache_modifier=".cg")
            tl.store(tile, total, mask=mask_tile)
            tl.atomic_xchg(counter, 0, sem="relaxed", scope="gpu")  # (read again only by a later launch)


@triton.jit
def _reduce_partials_kernel(part_ptr, n_proj, n_splits, stride_part_s, stride_part_b, BLOCK: tl.constexpr,
                            PDL: tl.constexpr):
    """part[0, row, cols] = sum over splits of part[s, row, cols] (float32, in split order), in place: each program
    reads only the columns it writes. PDL: waits for the kernel before first."""
    if PDL:
        gdc_launch_dependents()
        gdc_wait()
    row = tl.program_id(1).to(tl.int64)
    cols = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = cols < n_proj
    ptrs = part_ptr + row * stride_part_b + cols
    total = tl.zeros((BLOCK,), dtype=tl.float32)
    for s in range(n_splits):
        total += tl.load(ptrs + s * stride_part_s, mask=ok, other=0.0)
    tl.store(ptrs, total, mask=ok)


@triton.jit
def _sum_partials_rows(part_rows, row_ok, stride_part_s, n_splits, cols, col_ok):
    """sum over splits of part[s, rows, cols] (float32, in split order) -> (rows, cols)."""
    ptrs = part_rows + cols[None, :]
    mask = row_ok[:, None] & col_ok[None, :]
    total = tl.load(ptrs, mask=mask, other=0.0)
    for s in range(1, n_splits):
        total += tl.load(ptrs + s * stride_part_s, mask=mask, other=0.0)
    return total


@triton.jit
def _ssm_step_rows_kernel(
    part_ptr, xz_ptr, conv_state_ptr, conv_w_ptr, conv_b_ptr, dtw_ptr, dtb_ptr, A_log_ptr, D_ptr, ssm_state_ptr, y_ptr,
    batch, dim, rank, n_splits,
    stride_part_s, stride_part_b, stride_xz_b, stride_xz_d, stride_s_b, stride_s_d, stride_s_w,
    stride_cw_d, stride_cw_k, stride_dtw_d, stride_dtw_r, stride_A_d, stride_A_n,
    stride_h_b, stride_h_d, stride_h_n, stride_y_b, stride_y_d,
    N: tl.constexpr, N_PAD: tl.constexpr, W: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_R: tl.constexpr, HAS_CONV_BIAS: tl.constexpr, HAS_DT_BIAS: tl.constexpr, HAS_D: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr, EARLY_H: tl.constexpr, PRE_WAIT: tl.constexpr,
    R_PAD: tl.constexpr, R_LO: tl.constexpr, W_PAD: tl.constexpr, PDL: tl.constexpr,
):
    """``_ssm_step_kernel`` for a block of rows: dt = time_step[rows] @ dt_proj.weight[channels]^T by tl.dot in
    BLOCK_R chunks of the rank (time_step = the partial sums, rounded to the model dtype), the state update on
    (rows, channels, N) tiles; the conv state rolled here. PDL: A_log (and with EARLY_H the state tile h) is loaded
    before waiting for the kernel before. PRE_WAIT (only with EARLY_H's launch condition): the dt_proj tile, the conv
    and z too, and dt_proj as tl.dot over the rank in two power-of-2 parts (R_PAD, then R_LO if > 0; padded, masked);
    after the wait only the sums' loads, those dots, the state update and the stores remain."""
    pid_d = tl.program_id(0)
    offs_b = tl.program_id(1) * BLOCK_B + tl.arange(0, BLOCK_B)
    mask_b = offs_b < batch
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = offs_d < dim
    dtype = y_ptr.dtype.element_ty
    rows = offs_b.to(tl.int64)
    part_rows = part_ptr + rows[:, None] * stride_part_b
    offs_n = tl.arange(0, N_PAD)
    mask_n = offs_n < N
    mask_dn = mask_d[:, None] & mask_n[None, :]
    A_log = tl.load(A_log_ptr + offs_d[:, None] * stride_A_d + offs_n[None, :] * stride_A_n, mask=mask_dn, other=0.0)
    h_ptrs = (ssm_state_ptr + rows[:, None, None] * stride_h_b + offs_d[None, :, None] * stride_h_d
              + offs_n[None, None, :] * stride_h_n)
    mask_h = mask_b[:, None, None] & mask_dn[None, :, :]
    if EARLY_H:
        # h is written only by this kernel (an earlier step). With EARLY_H the conv kernel lets this one launch only
        # after its own wait, when every kernel before it has finished (each PDL kernel here waits for the one before
        # it), so no earlier step's write is pending, and neither kernel in between touches h: it may be read before
        # the wait, its 5 MB (batch 16, d_inner 5120) streaming while the conv kernel and the reduction run.
        h_old = tl.load(h_ptrs, mask=mask_h, other=0.0)
    mask = mask_b[:, None] & mask_d[None, :]
    if PRE_WAIT:
        # Everything that does not depend on the x_proj sums, before the wait (safe under the same condition as
        # EARLY_H: in_proj, which writes xz, has finished when this kernel launches, and the conv state is written
        # only by this kernel, its roll stored after the wait): the whole dt_proj tile (rank padded to R_PAD), the conv
        # and silu(x) (the conv state only read here, rolled below), z and silu(z)'s sigmoid, D and dt_proj's bias.
        offs_rp = tl.arange(0, R_PAD)
        mask_rp = offs_rp < rank
        dtw_all = tl.load(dtw_ptr + offs_d[None, :] * stride_dtw_d + offs_rp[:, None] * stride_dtw_r,
                          mask=mask_rp[:, None] & mask_d[None, :], other=0.0).to(dtype)
        if R_LO > 0:  # the rank as R_PAD + R_LO (160 = 128 + 32): no padded rows of the tile in registers
            offs_rl = R_PAD + tl.arange(0, R_LO)
            mask_rl = offs_rl < rank
            dtw_lo = tl.load(dtw_ptr + offs_d[None, :] * stride_dtw_d + offs_rl[:, None] * stride_dtw_r,
                             mask=mask_rl[:, None] & mask_d[None, :], other=0.0).to(dtype)
        x = _conv_silu_rows(xz_ptr, conv_state_ptr, conv_w_ptr, conv_b_ptr, offs_b, mask_b, offs_d, mask_d,
                            stride_xz_b, stride_xz_d, stride_s_b, stride_s_d, stride_s_w, stride_cw_d, stride_cw_k,
                            W, HAS_CONV_BIAS, False).to(tl.float32)
        z = tl.load(xz_ptr + rows[:, None] * stride_xz_b + (dim + offs_d)[None, :] * stride_xz_d, mask=mask,
                    other=0.0).to(tl.float32)
        z_sig = tl.sigmoid(z)
        if HAS_DT_BIAS:
            dt_bias = tl.load(dtb_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
        if HAS_D:
            D_vec = tl.load(D_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    if PDL:
        gdc_launch_dependents()
        gdc_wait()

    if PRE_WAIT:
        time_step = _sum_partials_rows(part_rows, mask_b, stride_part_s, n_splits, offs_rp, mask_rp).to(dtype)
        if R_LO > 0:
            time_lo = _sum_partials_rows(part_rows, mask_b, stride_part_s, n_splits, offs_rl, mask_rl).to(dtype)
        Bv = _sum_partials_rows(part_rows, mask_b, stride_part_s, n_splits, rank + offs_n, mask_n)
        Cv = _sum_partials_rows(part_rows, mask_b, stride_part_s, n_splits, rank + N + offs_n, mask_n)
        if UPCAST:  # (as in _conv_x_proj_rows_kernel)
            dt = tl.dot(time_step.to(tl.float32), dtw_all.to(tl.float32), input_precision=PRECISION)
            if R_LO > 0:
                dt = tl.dot(time_lo.to(tl.float32), dtw_lo.to(tl.float32), dt, input_precision=PRECISION)
        else:
            dt = tl.dot(time_step, dtw_all, input_precision=PRECISION)
            if R_LO > 0:
                dt = tl.dot(time_lo, dtw_lo, dt, input_precision=PRECISION)
        if HAS_DT_BIAS:
            dt += dt_bias[None, :]
        _roll_conv_rows(xz_ptr, conv_state_ptr, offs_b, mask_b, offs_d, mask_d, stride_xz_b, stride_xz_d,
                        stride_s_b, stride_s_d, stride_s_w, W, W_PAD)
    else:
        offs_r = tl.arange(0, BLOCK_R)
        dt = tl.zeros((BLOCK_B, BLOCK_D), dtype=tl.float32)
        for r0 in range(0, rank, BLOCK_R):
            rr = r0 + offs_r
            mask_r = rr < rank
            time_step = _sum_partials_rows(part_rows, mask_b, stride_part_s, n_splits, rr, mask_r).to(dtype)
            dtw = tl.load(dtw_ptr + offs_d[None, :] * stride_dtw_d + rr[:, None] * stride_dtw_r,
                          mask=mask_r[:, None] & mask_d[None, :], other=0.0)
            dtw = dtw.to(dtype)
            if UPCAST:  # (as in _conv_x_proj_rows_kernel)
                time_step = time_step.to(tl.float32)
                dtw = dtw.to(tl.float32)
            dt = tl.dot(time_step, dtw, dt, input_precision=PRECISION)
        if HAS_DT_BIAS:
            dt += tl.load(dtb_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)[None, :]
        Bv = _sum_partials_rows(part_rows, mask_b, stride_part_s, n_splits, rank + offs_n, mask_n)
        Cv = _sum_partials_rows(part_rows, mask_b, stride_part_s, n_splits, rank + N + offs_n, mask_n)
        x = _conv_silu_rows(xz_ptr, conv_state_ptr, conv_w_ptr, conv_b_ptr, offs_b, mask_b, offs_d, mask_d,
                            stride_xz_b, stride_xz_d, stride_s_b, stride_s_d, stride_s_w, stride_cw_d, stride_cw_k,
                            W, HAS_CONV_BIAS, True).to(tl.float32)
    dt = softplus(dt.to(dtype).to(tl.float32))
    Bv = Bv.to(dtype).to(tl.float32)
    Cv = Cv.to(dtype).to(tl.float32)

    A = -tl.exp(A_log.to(tl.float32))
    if not EARLY_H:
        h_old = tl.load(h_ptrs, mask=mask_h, other=0.0)
    h = tl.exp(dt[:, :, None] * A[None, :, :]) * h_old.to(tl.float32) + (dt * x)[:, :, None] * Bv[:, None, :]
    tl.store(h_ptrs, h.to(ssm_state_ptr.dtype.element_ty), mask=mask_h)
    y = tl.sum(h * Cv[:, None, :], axis=2)
    if PRE_WAIT:
        if HAS_D:
            y += x * D_vec[None, :]
        y = y * z * z_sig
    else:
        if HAS_D:
            y += x * tl.load(D_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)[None, :]
        z = tl.load(xz_ptr + rows[:, None] * stride_xz_b + (dim + offs_d)[None, :] * stride_xz_d, mask=mask,
                    other=0.0).to(tl.float32)
        y = y * z * tl.sigmoid(z)
    tl.store(y_ptr + rows[:, None] * stride_y_b + offs_d[None, :] * stride_y_d, y.to(dtype), mask=mask)


_CONV_X_PROJ = CachedLaunch(_conv_x_proj_kernel)
_SSM_STEP = CachedLaunch(_ssm_step_kernel)
_CONV_X_PROJ_ROWS = CachedLaunch(_conv_x_proj_rows_kernel)
_REDUCE_PARTIALS = CachedLaunch(_reduce_partials_kernel)
_SSM_STEP_ROWS = CachedLaunch(_ssm_step_rows_kernel)

# (block_c, block_p, warps) of the conv + x_proj kernel, (block_d, split_block, warps) of the state-update kernel.
# Measured on an H200 with the mamba-2.8b shape (benchmarks/results/gpu_decode_parts.md): block_c = 512 (10 partial
# sums per output, which every program of the second kernel adds up) was the fastest of 128-1024 at batch 1 and 16.
# Loading the weight tiles once for several rows per program by a static loop over rows made batch 16 slower (8.9 ms
# per step against 3.9); the ROWS_* kernels below do it with tl.dot on (rows, K) tiles instead (batch 16: 3.52 ms).
CONV_X_PROJ_CONFIG = (512, 32, 4)
SSM_STEP_CONFIG = (32, 8, 4)

# From ROWS_MIN_BATCH rows on, the mixer runs on blocks of rows instead (``_conv_x_proj_rows_kernel``,
# ``_ssm_step_rows_kernel``): each program reads its x_proj / dt_proj weight tile once for BLOCK_B rows (tl.dot; rows
# past the batch are masked). ROWS_CONV_X_PROJ_CONFIG: (block_b, block_c, block_k, block_p, warps);
# ROWS_SSM_STEP_CONFIG: (block_d, block_r, warps); ROWS_REDUCE: sum the x_proj partials once per step in a small
# kernel (in place, into split 0) instead of in every state-update program.
# Measured on an H200, mamba-2.8b shape, batch 16 (benchmarks/results/sweep_decode_rows.json): GPU step 3.97 -> 3.52
# ms, the mixer 27.2 -> 18.3 us per layer. Batch 8 - 15 takes this path unmeasured (its weight-tile reads are the same).
# ROWS_EARLY_H: the state-update kernel loads its float32 state tile before waiting for the kernel before it (PDL).
# Batch 16 GPU step, same device call (benchmarks/results/gpu_decode_parts.md, session 6): 3.334 - 3.339 ms off,
# 3.308 - 3.309 on.
ROWS_MIN_BATCH = 8
ROWS_CONV_X_PROJ_CONFIG = (16, 128, 128, 64, 4)
ROWS_SSM_STEP_CONFIG = (16, 32, 4)
ROWS_REDUCE = True
ROWS_EARLY_H = True
# ROWS_FOLD_REDUCE: with ROWS_REDUCE, the x_proj partials are summed by the last-arriving conv + x_proj program of each
# output tile (a per-tile int32 counter elects it; the sums keep split order, so they equal the reduction kernel's
# bit for bit) instead of by the reduction kernel: one kernel less per layer. ROWS_PRE_WAIT: the state-update kernel
# computes everything that does not need the x_proj sums (conv, z, the dt_proj tile) before its PDL wait (only
# together with ROWS_EARLY_H, whose launch condition makes that safe), so after the wait only the sums' loads, dt_proj's
# dot, the state update and the stores remain.
# Batch-16 GPU step on an H200 (benchmarks/results/gpu_decode_parts.md, branch dec16c, first call): 3.147 ms with both
# off, 3.087 fold, 2.952 pre-wait, 2.919 both.
ROWS_FOLD_REDUCE = True
ROWS_PRE_WAIT = True


def _uses_rows(batch) -> bool:
    return batch is not None and batch >= ROWS_MIN_BATCH


def split_count(dim: int, batch=None) -> int:
    """Number of partial x_proj sums ``mixer_decode_step`` writes per row (the first dim of its partials buffer) at
    this batch size; without a batch, enough for any batch."""
    one_row = triton.cdiv(dim, CONV_X_PROJ_CONFIG[0])
    rows = triton.cdiv(dim, ROWS_CONV_X_PROJ_CONFIG[1])
    if batch is None:
        return max(one_row, rows)
    return rows if _uses_rows(batch) else one_row


def counter_count(n_proj: int, batch: int) -> int:
    """How many int32 counters ``mixer_decode_step`` may use for an x_proj of ``n_proj`` outputs at this batch size
    (its ``counters`` workspace: zeros, and left zero by every call)."""
    return triton.cdiv(n_proj, ROWS_CONV_X_PROJ_CONFIG[3]) * triton.cdiv(max(batch, 1), ROWS_CONV_X_PROJ_CONFIG[0])


def mixer_decode_step(xz, conv_state, ssm_state, conv_weight, conv_bias, x_proj_weight, dt_proj_weight, dt_proj_bias,
                      A_log, D, partials=None, out=None, counters=None):
    """One decode step of a Mamba mixer between in_proj and out_proj, the states updated in place.

    xz: (batch, 2 * dim) in_proj's output (x, then the gate z); conv_state: (batch, dim, W) in xz's dtype;
    ssm_state: (batch, dim, N) float32; conv_weight: (dim, W); conv_bias: (dim,) or None; x_proj_weight:
    (rank + 2N, dim); dt_proj_weight: (dim, rank); dt_proj_bias: (dim,) or None; A_log: (dim, N) float32
    (A = -exp(A_log)); D: (dim,) or None. partials: optional float32 (>= split_count(dim, batch), >= batch, >= rank + 2N)
    workspace; out: optional (batch, dim) in xz's dtype; counters: optional int32 (>= counter_count(rank + 2N, batch),)
    workspace, zeros (each call leaves it zero; allocated per call when needed and not given). Returns y (batch, dim) in
    xz's dtype, gated by silu(z).

    With programmatic dependent launch the kernels may still run when this returns, and a kernel launched after them
    may start before they end: buffers allocated here when not given are freed (to the caching allocator) while they
    may still be in use, so a following PDL kernel that writes memory before its wait (kernels/linear_rows' TMA
    descriptors) could get and overwrite them. Pass the workspaces (the model's decode step does).
    """
    batch, two_dim = xz.shape
    dim = two_dim // 2
    width = conv_weight.shape[-1]
    n_proj = x_proj_weight.shape[0]
    state_size = ssm_state.shape[-1]
    rank = n_proj - 2 * state_size
    if (two_dim != 2 * dim or tuple(conv_state.shape) != (batch, dim, width)
            or tuple(ssm_state.shape) != (batch, dim, state_size) or tuple(conv_weight.shape) != (dim, width)
            or tuple(x_proj_weight.shape) != (n_proj, dim) or rank < 1 or tuple(dt_proj_weight.shape) != (dim, rank)
            or tuple(A_log.shape) != (dim, state_size)):
        raise ValueError(
            "mixer_decode_step: expected xz (batch, 2 * dim), conv_state (batch, dim, W), ssm_state (batch, dim, N), "
            "conv_weight (dim, W), x_proj_weight (rank + 2N, dim), dt_proj_weight (dim, rank), A_log (dim, N); got "
            f"{[tuple(t.shape) for t in (xz, conv_state, ssm_state, conv_weight, x_proj_weight, dt_proj_weight, A_log)]}")
    for name, vec in (("conv_bias", conv_bias), ("dt_proj_bias", dt_proj_bias), ("D", D)):
        if vec is not None and tuple(vec.shape) != (dim,):
            raise ValueError(f"mixer_decode_step: {name} must be ({dim},), got {tuple(vec.shape)}")
    if ssm_state.dtype != torch.float32:
        raise ValueError(f"mixer_decode_step: ssm_state must be float32, got {ssm_state.dtype}")
    splits = split_count(dim, batch)
    if partials is None:
        partials = torch.empty(splits, batch, n_proj, device=xz.device, dtype=torch.float32)
    elif (partials.dim() != 3 or partials.shape[0] < splits or partials.shape[1] < batch or partials.shape[2] < n_proj
          or partials.dtype != torch.float32 or partials.stride(-1) != 1):
        raise ValueError(f"mixer_decode_step: partials must be float32 (>= {splits}, >= {batch}, >= {n_proj}), "
                         f"got {tuple(partials.shape)} {partials.dtype}")
    if out is None:
        out = torch.empty(batch, dim, device=xz.device, dtype=xz.dtype)
    if batch == 0:
        return out
    conv_b = conv_bias if conv_bias is not None else conv_weight
    pdl = pdl_available(xz.device)
    if _uses_rows(batch):
        fold = bool(ROWS_REDUCE and ROWS_FOLD_REDUCE and splits > 1)
        if fold:
            needed = counter_count(n_proj, batch)
            if counters is None:
                counters = torch.zeros(needed, device=xz.device, dtype=torch.int32)
            elif counters.dtype != torch.int32 or counters.dim() != 1 or counters.numel() < needed:
                raise ValueError(f"mixer_decode_step: counters must be int32 (>= {needed},), got "
                                 f"{tuple(counters.shape)} {counters.dtype}")
        _mixer_rows(xz, conv_state, ssm_state, conv_weight, conv_bias, conv_b, x_proj_weight, dt_proj_weight,
                    dt_proj_bias, A_log, D, partials, out, splits, rank, state_size, pdl,
                    counters if fold else None)
        return out
    block_c, block_p, warps_1 = CONV_X_PROJ_CONFIG
    block_d, split_block, warps_2 = SSM_STEP_CONFIG
    w_pad = next_pow2(width)
    _CONV_X_PROJ(
        (splits, triton.cdiv(n_proj, block_p), batch),
        (xz, conv_state, conv_weight, conv_b, x_proj_weight, partials),
        (dim, n_proj, *xz.stride(), *conv_state.stride(), *conv_weight.stride(), *x_proj_weight.stride(),
         partials.stride(0), partials.stride(1)),
        (width, w_pad, block_c, block_p, conv_bias is not None, pdl), warps_1, pdl)
    _SSM_STEP(
        (triton.cdiv(dim, block_d), batch, 1),
        (partials, xz, conv_state, conv_weight, conv_b, dt_proj_weight,
         dt_proj_bias if dt_proj_bias is not None else conv_weight, A_log, D if D is not None else conv_weight,
         ssm_state, out),
        (dim, rank, splits, partials.stride(0), partials.stride(1), *xz.stride(), *conv_state.stride(),
         *conv_weight.stride(), *dt_proj_weight.stride(), *A_log.stride(), *ssm_state.stride(), *out.stride()),
        (state_size, next_pow2(state_size), next_pow2(rank), width, w_pad, block_d, split_block,
         conv_bias is not None, dt_proj_bias is not None, D is not None, pdl), warps_2, pdl)
    return out


def _mixer_rows(xz, conv_state, ssm_state, conv_weight, conv_bias, conv_b, x_proj_weight, dt_proj_weight,
                dt_proj_bias, A_log, D, partials, out, splits, rank, state_size, pdl, counters):
    """``mixer_decode_step`` on blocks of rows (checked arguments; see ROWS_MIN_BATCH); pdl: launch with programmatic
    dependent launch; counters: the zeroed int32 workspace when the partials' reduction is folded into the conv
    kernel (ROWS_FOLD_REDUCE), else None."""
    batch, two_dim = xz.shape
    dim = two_dim // 2
    width = conv_weight.shape[-1]
    n_proj = x_proj_weight.shape[0]
    block_b, block_c, block_k, block_p, warps_1 = ROWS_CONV_X_PROJ_CONFIG
    block_d, block_r, warps_2 = ROWS_SSM_STEP_CONFIG
    early_h = bool(ROWS_EARLY_H)
    pre_wait = bool(ROWS_PRE_WAIT and early_h)
    fold = counters is not None
    upcast = interpret_mode()  # (see _conv_x_proj_rows_kernel)
    precision = "ieee" if xz.dtype == torch.float32 or upcast else "tf32"  # (only float32 operands read it)
    row_blocks = triton.cdiv(batch, block_b)
    _CONV_X_PROJ_ROWS(
        (splits, triton.cdiv(n_proj, block_p), row_blocks),
        (xz, conv_state, conv_weight, conv_b, x_proj_weight, partials, counters if fold else partials),
        (batch, dim, n_proj, *xz.stride(), *conv_state.stride(), *conv_weight.stride(), *x_proj_weight.stride(),
         partials.stride(0), partials.stride(1)),
        (width, block_b, block_c, min(block_k, block_c), block_p, conv_bias is not None, precision, upcast, early_h,
         splits if fold else 0, pdl),
        warps_1, pdl)
    summed_splits = splits
    if fold:
        summed_splits = 1
    elif ROWS_REDUCE and splits > 1:
        block = min(256, next_pow2(n_proj))
        _REDUCE_PARTIALS((triton.cdiv(n_proj, block), batch, 1), (partials,),
                         (n_proj, splits, partials.stride(0), partials.stride(1)), (block, pdl), 4, pdl)
        summed_splits = 1
    _SSM_STEP_ROWS(
        (triton.cdiv(dim, block_d), row_blocks, 1),
        (partials, xz, conv_state, conv_weight, conv_b, dt_proj_weight,
         dt_proj_bias if dt_proj_bias is not None else conv_weight, A_log, D if D is not None else conv_weight,
         ssm_state, out),
        (batch, dim, rank, summed_splits, partials.stride(0), partials.stride(1), *xz.stride(), *conv_state.stride(),
         *conv_weight.stride(), *dt_proj_weight.stride(), *A_log.stride(), *ssm_state.stride(), *out.stride()),
        (state_size, next_pow2(state_size), width, block_b, block_d, block_r, conv_bias is not None,
         dt_proj_bias is not None, D is not None, precision, upcast, early_h, pre_wait, *_rank_parts(rank),
         next_pow2(width), pdl), warps_2, pdl)


def _rank_parts(rank):
    """(R_PAD, R_LO) of ``_ssm_step_rows_kernel``'s PRE_WAIT: the largest power of 2 <= rank, then the rest padded
    to a power of 2 (0 if none), each at least 16 (tl.dot's K on a GPU): 160 -> (128, 32), 48 -> (32, 16), 20 ->
    (16, 16), 6 -> (16, 0)."""
    high = max(16, 1 << (rank.bit_length() - 1))
    return high, (max(16, next_pow2(rank - high)) if rank > high else 0)


# ----------------------------------------------------------------------------------------------------------------
# in_proj / out_proj at a few rows
# ----------------------------------------------------------------------------------------------------------------
# From PROJ_MIN_BATCH to PROJ_MAX_BATCH rows in a 16-bit dtype, in_proj and out_proj (plain nn.Linear modules: the
# model takes this fused path only then, see MambaBackbone._fused_decode_ops) run on kernels/linear_rows instead of
# their module call (cuBLAS, launched without PDL; out_proj as cuBLAS's split-K GEMM plus its separate reduce kernel):
# a PDL-launched GEMM that loads the first columns of its weight tile before waiting for the kernel before it.
# out_proj then writes float32 split-K partial sums, which ``add_rms_norm`` adds in split order (no reduce kernel, no
# atomics). IN_PROJ_CONFIG / OUT_PROJ_CONFIG: kernels/linear_rows configurations (block_n, block_k, k_split, pre_k,
# swap, warps, stages), or None for the module call.
# Measured on an H200, mamba-2.8b shape, batch 16 (benchmarks/results/gpu_decode_parts.md, sweep_decode_proj16.py),
# GPU step 3.300 ms with both on cuBLAS: out_proj alone on (32, 128, 1024, 512, swapped, 4 warps, 3 stages) 3.197;
# in_proj alone on (128, 64, 0, 0, swapped, 4 warps, 6 stages, TMA, launching the next kernels after its K loop)
# 3.238; both (out_proj as below: TMA tiles, 5 partial sums), with add_rms_norm triggering after its wait: 3.149.
# Each projection alone reads its weight more slowly than cuBLAS does (in_proj 15.9 us against 15.2, out_proj 9.9
# against 11.6 with cuBLAS's reduce, back to back in a graph); the step gains from the PDL overlap around them.
# Retuned once the step's other kernels had changed (session 7, sweep_decode_fold16.py --base-defaults, 32-warp norms):
# in_proj on K tiles of 128 with 4 stages 2.809-2.818 ms against 2.828-2.842 with (64, 6 stages); other in_proj and
# out_proj settings (stages 4 / 8, launch points, block_n 32 / 64 / 128, 4 or 8 out_proj splits) level or slower.
PROJ_MIN_BATCH = 8
PROJ_MAX_BATCH = 32
IN_PROJ_CONFIG = (128, 128, 0, 0, True, 4, 4, True, 2)
OUT_PROJ_CONFIG = (64, 64, 1024, 0, True, 4, 8, True)


def _projection_config(x, linear, config):
    if (config is None or not PROJ_MIN_BATCH <= x.shape[0] <= PROJ_MAX_BATCH or x.dim() != 2
            or x.dtype not in (torch.float16, torch.bfloat16) or linear.weight.dtype != x.dtype
            or x.stride(-1) != 1 or linear.weight.stride(-1) != 1):
        return None
    return config


def in_projection(x, linear):
    """in_proj of a decode step: x (rows, hidden) -> (rows, 2 * intermediate) = ``linear(x)`` (the module call, or
    ``linear_rows`` on its weight where ``IN_PROJ_CONFIG`` applies)."""
    config = _projection_config(x, linear, IN_PROJ_CONFIG)
    if config is None:
        return linear(x)
    return linear_rows(x, linear.weight, linear.bias, config)


def out_projection(y, linear):
    """out_proj of a decode step: y (rows, intermediate) -> ``linear(y)`` (rows, hidden), or where ``OUT_PROJ_CONFIG``
    applies (and the module has no bias) its float32 split-K partial sums (splits, rows, hidden) for ``add_rms_norm``
    (with ``delta_dtype`` = y's dtype)."""
    config = _projection_config(y, linear, OUT_PROJ_CONFIG)
    if config is None or linear.bias is not None:
        return linear(y)
    return linear_rows_partials(y, linear.weight, config)

