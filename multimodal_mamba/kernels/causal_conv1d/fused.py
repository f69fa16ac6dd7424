"""Triton causal depthwise conv1d: forward, backward (with the gradient of the carried state), decode update.

References: ``multimodal_mamba.modeling.ops_selective_scan.causal_conv1d_ref`` and ``causal_conv1d_update_ref``
(``naive.py`` beside this file). out[d, s] = act(bias[d] + sum_k w[d, k] xpad[d, s + k]), where xpad is x preceded by
the W - 1 inputs of ``initial_state`` (zeros when None). Tiles (BLOCK_D, BLOCK_T) over any strides (the mixers pass
time-major views). The forward can also write the conv state that a following chunk or decode step reads (the
last W inputs of xpad) and, without autograd, write its output over x (``overwrite_x``: a program then owns a
channel block over the whole sequence and walks its tiles from the last to the first, so that every input is read
before the output overwrites it). The backward computes the gradient of the padded input,
dxpad[p] = sum_k w[k] dpre[p - k], in one pass over p in [0, L + W - 1): its first W - 1 positions are the gradient
of ``initial_state``; dpre is recomputed from x (checkpointing the pre-activation would cost a full extra tensor).
dweight and dbias are reduced per tile and summed after (deterministic, no atomics).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..utils import CachedLaunch, empty_like_layout, interpret_mode, next_pow2, sm_count


@triton.jit
def _xpad(x_base, init_base, q, mask_d, length, stride_x_l, stride_init_w, W: tl.constexpr, HAS_INIT: tl.constexpr):
    """xpad at padded positions q (BLOCK_T,): initial_state for q < W - 1, then x; zeros outside. (BLOCK_D, BLOCK_T)"""
    in_x = (q >= W - 1) & (q < length + W - 1)
    v = tl.load(x_base + (q - (W - 1))[None, :] * stride_x_l, mask=mask_d[:, None] & in_x[None, :], other=0.0)
    v = v.to(tl.float32)
    if HAS_INIT:
        in_init = (q >= 0) & (q < W - 1)
        v += tl.load(init_base + q[None, :] * stride_init_w, mask=mask_d[:, None] & in_init[None, :], other=0.0).to(
            tl.float32
        )
    return v


@triton.jit
def _pre_activation(x_base, init_base, w_base, bias, s, mask_d, length, stride_x_l, stride_init_w, stride_w_k,
                    W: tl.constexpr, HAS_INIT: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_T: tl.constexpr):
    pre = tl.zeros([BLOCK_D, BLOCK_T], dtype=tl.float32) + bias[:, None]
    for k in tl.static_range(W):
        w_k = tl.load(w_base + k * stride_w_k, mask=mask_d, other=0.0).to(tl.float32)
        pre += w_k[:, None] * _xpad(x_base, init_base, s + k, mask_d, length, stride_x_l, stride_init_w, W, HAS_INIT)
    return pre


@triton.jit
def _conv_tile(x_base, init_base, w_base, bias, s0, mask_d, length, stride_x_l, stride_init_w, stride_w_k,
               W: tl.constexpr, HAS_INIT: tl.constexpr, SILU: tl.constexpr, BLOCK_D: tl.constexpr,
               BLOCK_T: tl.constexpr):
    """The activated outputs of steps s0 .. s0 + BLOCK_T - 1 (BLOCK_D, BLOCK_T) float32. Only a tile that starts
    within the first W - 1 steps reads initial_state (the other tiles skip its masked loads)."""
    s = s0 + tl.arange(0, BLOCK_T)
    if HAS_INIT and s0 < W - 1:
        pre = _pre_activation(x_base, init_base, w_base, bias, s, mask_d, length, stride_x_l, stride_init_w,
                              stride_w_k, W, True, BLOCK_D, BLOCK_T)
    else:
        pre = _pre_activation(x_base, init_base, w_base, bias, s, mask_d, length, stride_x_l, stride_init_w,
                              stride_w_k, W, False, BLOCK_D, BLOCK_T)
    if SILU:
        pre = pre * tl.sigmoid(pre)
    return pre


@triton.jit
def _write_conv_state(x_base, init_base, state_base, mask_d, length, stride_x_l, stride_init_w, stride_s_w,
                      W: tl.constexpr, W_PAD: tl.constexpr, HAS_INIT: tl.constexpr):
    """state[:, k] = xpad[L - 1 + k] for k < W: the last W inputs, initial_state's (or zeros) where x is shorter."""
    offs_k = tl.arange(0, W_PAD)
    window = _xpad(x_base, init_base, length - 1 + offs_k, mask_d, length, stride_x_l, stride_init_w, W, HAS_INIT)
    tl.store(state_base + offs_k[None, :] * stride_s_w, window.to(state_base.dtype.element_ty),
             mask=mask_d[:, None] & (offs_k < W)[None, :])


@triton.jit
def _causal_conv1d_fwd_kernel(
    x_ptr, w_ptr, bias_ptr, init_ptr, out_ptr, state_ptr,
    dim, length,
    stride_x_b, stride_x_d, stride_x_l, stride_w_d, stride_w_k,
    stride_init_b, stride_init_d, stride_init_w, stride_out_b, stride_out_d, stride_out_l,
    stride_s_b, stride_s_d, stride_s_w,
    W: tl.constexpr, W_PAD: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_T: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_INIT: tl.constexpr, SILU: tl.constexpr, WRITE_STATE: tl.constexpr,
    IN_PLACE: tl.constexpr,
):
    """Grid (time tiles, channel blocks, batch); IN_PLACE: (1, channel blocks, batch), each program walking its
    tiles from the last to the first (out == x: a tile's inputs are all read before its outputs are stored, and the
    earlier tiles read only inputs before it)."""
    pid_d = tl.program_id(1)
    pid_b = tl.program_id(2).to(tl.int64)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = offs_d < dim
    x_base = x_ptr + pid_b * stride_x_b + offs_d[:, None] * stride_x_d
    init_base = init_ptr + pid_b * stride_init_b + offs_d[:, None] * stride_init_d
    out_base = out_ptr + pid_b * stride_out_b + offs_d[:, None] * stride_out_d
    w_base = w_ptr + offs_d * stride_w_d
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    else:
        bias = tl.zeros([BLOCK_D], dtype=tl.float32)
    n_tiles = tl.cdiv(length, BLOCK_T)
    if IN_PLACE:
        if WRITE_STATE:  # before any output overwrites the last inputs
            _write_conv_state(x_base, init_base, state_ptr + pid_b * stride_s_b + offs_d[:, None] * stride_s_d,
                              mask_d, length, stride_x_l, stride_init_w, stride_s_w, W, W_PAD, HAS_INIT)
        for back in range(0, n_tiles):
            s0 = (n_tiles - 1 - back) * BLOCK_T
            out = _conv_tile(x_base, init_base, w_base, bias, s0, mask_d, length, stride_x_l, stride_init_w,
                             stride_w_k, W, HAS_INIT, SILU, BLOCK_D, BLOCK_T)
            s = s0 + tl.arange(0, BLOCK_T)
            tl.debug_barrier()  # every thread's reads of this tile's inputs come before any thread's store
            tl.store(out_base + s[None, :] * stride_out_l, out.to(out_ptr.dtype.element_ty),
                     mask=mask_d[:, None] & (s < length)[None, :])
    else:
        pid_t = tl.program_id(0)
        s0 = pid_t * BLOCK_T
        out = _conv_tile(x_base, init_base, w_base, bias, s0, mask_d, length, stride_x_l, stride_init_w, stride_w_k,
                         W, HAS_INIT, SILU, BLOCK_D, BLOCK_T)
        s = s0 + tl.arange(0, BLOCK_T)
        tl.store(out_base + s[None, :] * stride_out_l, out.to(out_ptr.dtype.element_ty),
                 mask=mask_d[:, None] & (s < length)[None, :])
        if WRITE_STATE:
            if pid_t == n_tiles - 1:
                _write_conv_state(x_base, init_base, state_ptr + pid_b * stride_s_b + offs_d[:, None] * stride_s_d,
                                  mask_d, length, stride_x_l, stride_init_w, stride_s_w, W, W_PAD, HAS_INIT)


@triton.jit
def _causal_conv1d_bwd_kernel(
    x_ptr, w_ptr, bias_ptr, init_ptr, dout_ptr, dx_ptr, dinit_ptr, dw_ptr, dbias_ptr,
    dim, length, n_tiles,
    stride_x_b, stride_x_d, stride_x_l, stride_w_d, stride_w_k,
    stride_init_b, stride_init_d, stride_init_w, stride_dout_b, stride_dout_d, stride_dout_l,
    stride_dx_b, stride_dx_d, stride_dx_l,
    W: tl.constexpr, W_PAD: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_T: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_INIT: tl.constexpr, SILU: tl.constexpr,
):
    pid_t = tl.program_id(0)
    pid_d = tl.program_id(1)
    pid_b = tl.program_id(2).to(tl.int64)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = offs_d < dim
    p = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)  # padded positions, [0, L + W - 1)
    x_base = x_ptr + pid_b * stride_x_b + offs_d[:, None] * stride_x_d
    init_base = init_ptr + pid_b * stride_init_b + offs_d[:, None] * stride_init_d
    dout_base = dout_ptr + pid_b * stride_dout_b + offs_d[:, None] * stride_dout_d
    w_base = w_ptr + offs_d * stride_w_d
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    else:
        bias = tl.zeros([BLOCK_D], dtype=tl.float32)

    dxp = tl.zeros([BLOCK_D, BLOCK_T], dtype=tl.float32)
    dpre_own = tl.zeros([BLOCK_D, BLOCK_T], dtype=tl.float32)
    for k in tl.static_range(W):
        s = p - k  # output positions that read xpad[p] through tap k
        valid = (s >= 0) & (s < length)
        dpre = tl.load(dout_base + s[None, :] * stride_dout_l, mask=mask_d[:, None] & valid[None, :], other=0.0)
        dpre = dpre.to(tl.float32)
        if SILU:
            pre = _pre_activation(x_base, init_base, w_base, bias, s, mask_d, length, stride_x_l, stride_init_w,
                                  stride_w_k, W, HAS_INIT, BLOCK_D, BLOCK_T)
            sig = tl.sigmoid(pre)
            dpre = dpre * sig * (1.0 + pre * (1.0 - sig))
        w_k = tl.load(w_base + k * stride_w_k, mask=mask_d, other=0.0).to(tl.float32)
        dxp += w_k[:, None] * dpre
        if k == 0:
            dpre_own = dpre
    # dx for p >= W - 1, the initial state's gradient for p < W - 1
    in_x = (p >= W - 1) & (p < length + W - 1)
    dx_ptrs = dx_ptr + pid_b * stride_dx_b + offs_d[:, None] * stride_dx_d + (p - (W - 1))[None, :] * stride_dx_l
    tl.store(dx_ptrs, dxp.to(dx_ptr.dtype.element_ty), mask=mask_d[:, None] & in_x[None, :])
    if HAS_INIT:
        in_init = p < W - 1
        dinit_ptrs = dinit_ptr + (pid_b * dim + offs_d[:, None]) * (W - 1) + p[None, :]
        tl.store(dinit_ptrs, dxp, mask=mask_d[:, None] & in_init[None, :])
    # dweight[d, k] = sum_s dpre[s] xpad[s + k], dbias[d] = sum_s dpre[s], over this tile's s = p (< L)
    offs_k = tl.arange(0, W_PAD)
    dw = tl.zeros([BLOCK_D, W_PAD], dtype=tl.float32)
    for k in tl.static_range(W):
        xk = _xpad(x_base, init_base, p + k, mask_d, length, stride_x_l, stride_init_w, W, HAS_INIT)
        dw = tl.where(offs_k[None, :] == k, tl.sum(dpre_own * xk, axis=1)[:, None], dw)
    part = (pid_b * n_tiles + pid_t) * dim + offs_d
    tl.store(dw_ptr + part[:, None] * W + offs_k[None, :], dw, mask=mask_d[:, None] & (offs_k[None, :] < W))
    tl.store(dbias_ptr + part, tl.sum(dpre_own, axis=1), mask=mask_d)


@triton.jit
def _causal_conv1d_update_kernel(
    x_ptr, state_ptr, w_ptr, bias_ptr, out_ptr,
    dim,
    stride_x_b, stride_x_d, stride_s_b, stride_s_d, stride_s_w, stride_w_d, stride_w_k, stride_out_b, stride_out_d,
    W: tl.constexpr, W_PAD: tl.constexpr, BLOCK_D: tl.constexpr, HAS_BIAS: tl.constexpr, SILU: tl.constexpr,
):
    pid_d = tl.program_id(0)
    pid_b = tl.program_id(1).to(tl.int64)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_k = tl.arange(0, W_PAD)
    mask_d = offs_d < dim
    state_base = state_ptr + pid_b * stride_s_b + offs_d[:, None] * stride_s_d
    # rolled window: positions 0..W-2 are the old state's 1..W-1, position W-1 is the new input
    shifted = tl.load(state_base + (offs_k + 1)[None, :] * stride_s_w, mask=mask_d[:, None] & (offs_k < W - 1)[None, :],
                      other=0.0)
    x = tl.load(x_ptr + pid_b * stride_x_b + offs_d * stride_x_d, mask=mask_d, other=0.0)
    window = tl.where(offs_k[None, :] == W - 1, x.to(shifted.dtype)[:, None], shifted)
    tl.store(state_base + offs_k[None, :] * stride_s_w, window, mask=mask_d[:, None] & (offs_k < W)[None, :])
    w = tl.load(w_ptr + offs_d[:, None] * stride_w_d + offs_k[None, :] * stride_w_k,
                mask=mask_d[:, None] & (offs_k < W)[None, :], other=0.0)
    out = tl.sum(window.to(tl.float32) * w.to(tl.float32), axis=1)
    if HAS_BIAS:
        out += tl.load(bias_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    if SILU:
        out = out * tl.sigmoid(out)
    tl.store(out_ptr + pid_b * stride_out_b + offs_d * stride_out_d, out.to(out_ptr.dtype.element_ty), mask=mask_d)


def _silu(activation):
    if activation is None:
        return False
    if activation in ("silu", "swish"):
        return True
    raise ValueError(f"causal_conv1d: unsupported activation {activation!r} (expected None, 'silu' or 'swish')")


def _blocks(x):
    """(block_d, block_t): wide along the contiguous axis of x."""
    if x.stride(-1) != 1 and x.shape[-1] > 1:  # time-major: channels contiguous
        return 64, 32
    return 16, 128


_FWD = CachedLaunch(_causal_conv1d_fwd_kernel)


# The in-place program's tile: a channel block narrower than the parallel kernel's 64, for more (channel block,
# batch) programs (a Coupled Mamba chunk at batch 32, dim 512: 512 of them), rows of 32 contiguous channels. Measured
# on an H200 (benchmarks/bench_gpu_conv_variants.py, results/gpu_conv_variants.json): (32, 64, 4 warps) 11.0 / 12.8 /
# 16.0 us at L 125 / 167 / 500, against 16.7 / 20.4 / 17.5 for (32, 128, 8) and 8.9 / 11.5 / 17.1 for the parallel
# kernel's (64, 32, 4) writing a new tensor.
IN_PLACE_BLOCK_D, IN_PLACE_BLOCK_T, IN_PLACE_WARPS = 32, 64, 4


def _in_place_applies(x) -> bool:
    """Whether the conv may write over x: time-major x (the in-place program walks a channel block's tiles in
    order) with enough (channel block, batch) programs to fill the GPU without the time axis (2 per SM)."""
    batch, dim, length = x.shape
    if x.stride(-1) == 1 and length > 1:
        return False
    if interpret_mode():
        return True
    return triton.cdiv(dim, IN_PLACE_BLOCK_D) * batch >= 2 * sm_count(x.device)


def causal_conv1d_fwd(x, weight, bias=None, initial_state=None, activation=None, conv_state_out=None,
                      overwrite_x=False, config=None):
    """The conv's forward (see ``causal_conv1d``); conv_state_out (batch, dim, W) or None receives the last W
    inputs of xpad; overwrite_x: the output may be x itself (see ``_in_place_applies``). config: (block_d, block_t,
    num_warps) instead of the defaults (benchmarks)."""
    batch, dim, length = x.shape
    width = weight.shape[1]
    silu = _silu(activation)
    in_place = bool(overwrite_x) and length > 0 and _in_place_applies(x)
    if config is not None:
        block_d, block_t, num_warps = config
    elif in_place:
        block_d, block_t, num_warps = IN_PLACE_BLOCK_D, IN_PLACE_BLOCK_T, IN_PLACE_WARPS
    else:
        (block_d, block_t), num_warps = _blocks(x), 4
    out = x if in_place else empty_like_layout(x)
    init = initial_state if initial_state is not None else x
    init_strides = initial_state.stride() if initial_state is not None else (0, 0, 0)
    state = conv_state_out if conv_state_out is not None else x
    state_strides = conv_state_out.stride() if conv_state_out is not None else (0, 0, 0)
    if x.numel():
        grid = (1 if in_place else triton.cdiv(length, block_t), triton.cdiv(dim, block_d), batch)
        _FWD(grid, (x, weight, bias if bias is not None else weight, init, out, state),
             (dim, length) + x.stride() + weight.stride() + init_strides + out.stride() + state_strides,
             (width, next_pow2(width), block_d, block_t, bias is not None, initial_state is not None, silu,
              conv_state_out is not None, in_place), num_warps)
    elif conv_state_out is not None:  # no step: the state is initial_state's last inputs (or zeros)
        from ...modeling.ops_selective_scan import write_conv_state

        write_conv_state(conv_state_out, x, initial_state)
    return out


def causal_conv1d_bwd(x, weight, bias, initial_state, activation, dout):
    batch, dim, length = x.shape
    width = weight.shape[1]
    silu = _silu(activation)
    block_d, block_t = _blocks(x)
    n_tiles = triton.cdiv(length + width - 1, block_t)
    dx = empty_like_layout(x)
    dinit = (
        torch.empty(batch, dim, width - 1, device=x.device, dtype=torch.float32) if initial_state is not None else None
    )
    dw_part = torch.empty(batch, n_tiles, dim, width, device=x.device, dtype=torch.float32)
    dbias_part = torch.empty(batch, n_tiles, dim, device=x.device, dtype=torch.float32)
    init = initial_state if initial_state is not None else x
    init_strides = initial_state.stride() if initial_state is not None else (0, 0, 0)
    grid = (n_tiles, triton.cdiv(dim, block_d), batch)
    _causal_conv1d_bwd_kernel[grid](
        x, weight, bias if bias is not None else weight, init, dout, dx, dinit if dinit is not None else dbias_part,
        dw_part, dbias_part,
        dim, length, n_tiles, *x.stride(), *weight.stride(), *init_strides, *dout.stride(), *dx.stride(),
        W=width, W_PAD=next_pow2(width), BLOCK_D=block_d, BLOCK_T=block_t, HAS_BIAS=bias is not None,
        HAS_INIT=initial_state is not None, SILU=silu, num_warps=4,
    )
    dweight = dw_part.sum((0, 1)).to(weight.dtype)
    dbias = dbias_part.sum((0, 1)).to(bias.dtype) if bias is not None else None
    return dx, dweight, dbias, (dinit.to(initial_state.dtype) if dinit is not None else None)


class CausalConv1dFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, initial_state, activation):
        ctx.activation = activation
        ctx.save_for_backward(x, weight, bias, initial_state)
        return causal_conv1d_fwd(x, weight, bias, initial_state, activation)

    @staticmethod
    def backward(ctx, dout):
        x, weight, bias, initial_state = ctx.saved_tensors
        dx, dweight, dbias, dinit = causal_conv1d_bwd(x, weight, bias, initial_state, ctx.activation, dout)
        return dx, dweight, dbias, dinit, None


def causal_conv1d_triton(x, weight, bias=None, initial_state=None, activation=None, conv_state_out=None,
                         overwrite_x=False):
    """Causal depthwise conv on the Triton kernels (backend "triton"); same contract as ``causal_conv1d``:
    x (batch, dim, L); weight (dim, W); bias (dim,); initial_state (batch, dim, W - 1); conv_state_out (batch, dim,
    W) or None; overwrite_x honoured without autograd (see ``causal_conv1d_fwd``)."""
    _silu(activation)
    if not (torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias, initial_state))):
        # (no autograd node: less host time)
        return causal_conv1d_fwd(x, weight, bias, initial_state, activation, conv_state_out, overwrite_x)
    if conv_state_out is not None:  # (a copy of inputs: nothing to differentiate)
        with torch.no_grad():
            from ...modeling.ops_selective_scan import write_conv_state

            write_conv_state(conv_state_out, x, initial_state)
    return CausalConv1dFn.apply(x, weight, bias, initial_state, activation)


def causal_conv1d_update_triton(x, conv_state, weight, bias=None, activation=None):
    """Decode step of the conv (backend "triton"); same contract as ``causal_conv1d_update``: x (batch, dim);
    conv_state (batch, dim, W) rolled in place. Inference only."""
    batch, dim = x.shape
    width = weight.shape[1]
    silu = _silu(activation)
    out = torch.empty(batch, dim, device=x.device, dtype=x.dtype)
    block_d = 128
    grid = (triton.cdiv(dim, block_d), batch)
    _causal_conv1d_update_kernel[grid](
        x, conv_state, weight, bias if bias is not None else weight, out,
        dim, *x.stride(), *conv_state.stride(), *weight.stride(), *out.stride(),
        W=width, W_PAD=next_pow2(width), BLOCK_D=block_d, HAS_BIAS=bias is not None, SILU=silu, num_warps=4,
    )
    return out
